"""Every Python example in README.md and docs/*.md runs as written, on tiny models (issue 30).

The examples name the main job's folders (runs/tiny-cpu-model, runs/jsquad-tiny-cpu/model) and the JGLUE copy
beside the repository (../shared/data/jglue). The fixture builds a working folder with tiny stand-ins of those
folders (the project's tokenizer trained on the bundled corpus, random weights) and a link to the JGLUE copy, and
each example runs there, in a fresh namespace. An example that needs a file only a long run or the network makes
carries `<!-- example: skip (reason) -->` on the line above its fence; those are listed and kept rare.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import bigbird_ja

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SKIP = re.compile(r"<!-- example: skip \((.+)\) -->\n$")
MAX_SKIPPED = 4  # what the docs may leave unrun: network, and files that take a minute to make


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _examples() -> list[tuple[str, str, str | None]]:
    """(page:line, code, skip reason or None) of every ```python block."""
    found = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            before = text[:match.start()]
            line = before.count("\n") + 1
            skipped = SKIP.search(before)
            reason = skipped.group(1) if skipped and skipped.end() == len(before) else None
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1), reason))
    return found


EXAMPLES = _examples()


def test_examples_are_found_and_few_are_skipped():
    pages = {name.split(":")[0] for name, _, _ in EXAMPLES}
    assert {"README.md", "docs/embeddings.md", "docs/finetuning.md", "docs/deploy.md"} <= pages
    skipped = [(name, reason) for name, _, reason in EXAMPLES if reason]
    print("skipped:", skipped)
    assert len(skipped) <= MAX_SKIPPED and all(reason.strip() for _, reason in skipped)


LOADS = re.compile(r"\b(from_pretrained|pipeline|SentenceTransformer)\(")


@pytest.mark.parametrize("name, code, reason", EXAMPLES, ids=[name for name, _, _ in EXAMPLES])
def test_an_example_that_loads_a_folder_imports_bigbird_ja_or_trusts_the_folders_code(name, code, reason):
    """The examples run in this process, where bigbird_ja is imported already, so an example that forgot `import
    bigbird_ja` would pass here and fail for a user (the old LoRA example did): checked by reading it."""
    if LOADS.search(code):
        assert re.search(r"^import bigbird_ja\b|^import .*\bbigbird_ja\b|^from bigbird_ja\b", code, flags=re.M) \
            or "trust_remote_code=True" in code, f"{name}: add `import bigbird_ja` (or trust_remote_code=True)"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """<tmp>/repo holding runs/tiny-cpu-model (masked LM) and runs/jsquad-tiny-cpu/model (QA, with its window
    settings), and <tmp>/shared -> the JGLUE copy beside the repository."""
    from transformers import AutoTokenizer

    from bigbird_ja.configuration import build_model_config
    from bigbird_ja.qa.settings import QASettings, write_qa_settings
    from bigbird_ja.tokenization import train_tokenizer
    from conftest import randomize_

    top = tmp_path_factory.mktemp("readme")
    repo = top / "repo"
    corpus = Path(bigbird_ja.__file__).parent / "resources" / "sample_corpus" / "ja_sample.txt"
    train_tokenizer([corpus], top / "tokenizer", 2000, shrink_vocab=True, model_max_length=256, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(top / "tokenizer"))
    config = build_model_config(ROOT / "configs" / "model" / "tiny-cpu.yaml", {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "max_position_embeddings": 256,
        "vocab_size": len(tokenizer)})
    runs = repo / "runs"
    for model, folder in ((bigbird_ja.BigBirdJaForMaskedLM(config), runs / "tiny-cpu-model"),
                          (bigbird_ja.BigBirdJaForQuestionAnswering(config), runs / "jsquad-tiny-cpu" / "model")):
        randomize_(model, seed=0)
        if isinstance(model, bigbird_ja.BigBirdJaForQuestionAnswering):
            write_qa_settings(model.config, QASettings(max_length=256, doc_stride=64, max_query_length=64))
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    if SHARED.is_dir():
        (top / "shared").symlink_to(SHARED, target_is_directory=True)
    return repo


@pytest.mark.parametrize("name, code, reason", EXAMPLES, ids=[name for name, _, _ in EXAMPLES])
def test_example_runs_as_written(workspace, monkeypatch, name, code, reason):
    if reason:
        pytest.skip(reason)
    if "../shared/" in code and not SHARED.is_dir():
        pytest.skip("JGLUE data not found beside the repository")
    monkeypatch.chdir(workspace)
    torch.manual_seed(0)
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})
