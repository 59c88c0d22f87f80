"""The small Japanese corpus shipped with the package, so examples and CI run without any download.

``bigbird_ja/resources/sample_corpus/ja_sample.txt``: original short articles and essays written for this project
(everyday life, science, nature, technology, food, history of ideas), one document per blank-line-separated
block, UTF-8. It is far too small to pretrain anything useful; it exists to exercise the pipeline end to end.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_CORPUS = "resources/sample_corpus/ja_sample.txt"


def sample_corpus_path() -> Path:
    """Path of the bundled sample corpus (a real file: the package is installed unzipped)."""
    path = Path(str(resources.files("bigbird_ja").joinpath(SAMPLE_CORPUS)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall bigbird-ja (setup.py ships it as package_data)")
    return path


def sample_documents() -> list[str]:
    """The sample corpus as a list of documents (blocks joined with newlines, surrounding whitespace stripped)."""
    text = sample_corpus_path().read_text(encoding="utf-8")
    docs, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs
