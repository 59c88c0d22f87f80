"""A stable hash of a tokenizer, so that token ids are never read with a tokenizer they were not made with.

Packed shards hold bare ids; the same ids mean different text under another vocabulary, and nothing at training
time would notice. `prepare` stores `tokenizer_fingerprint(tokenizer)` in every shard's metadata and the manifest;
`check_tokenizer(data_dir, tokenizer)` (called by the loader when given a tokenizer) raises
`TokenizerMismatchError` when they differ.

The hash is sha256 over the canonical JSON (sorted keys) of the fast tokenizer's backend (`tokenizer.json`:
normalizer, pre-tokenizer, model with its vocabulary and scores, post-processor, decoder, added tokens) plus the
special-token ids and the vocabulary size. Left out on purpose: the backend's `truncation` and `padding` settings
(transformers rewrites them on every call with `truncation=`/`padding=`, they do not change ids) and the
serialisation `version` string.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .format import read_manifest

SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
_IGNORED_BACKEND_KEYS = ("truncation", "padding", "version")


class TokenizerMismatchError(ValueError):
    """The data was prepared with another tokenizer than the one given."""


def load_tokenizer(tokenizer_or_dir):
    """A transformers fast tokenizer from a folder (or the object itself); an error names the folder and the fix."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        from transformers import AutoTokenizer

        path = Path(tokenizer_or_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist: pass a folder written by "
                                    f"tokenizer.save_pretrained() (with tokenizer.json)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        tokenizer = tokenizer_or_dir
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer): save it with "
                         f"tokenizer.json, e.g. convert it with transformers' PreTrainedTokenizerFast")
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_NAMES}


def tokenizer_fingerprint(tokenizer) -> str:
    """``"sha256:<hex>"`` of the tokenizer's canonical JSON, special ids and vocab size (a folder is loaded first)."""
    tokenizer = load_tokenizer(tokenizer)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in _IGNORED_BACKEND_KEYS:
        backend.pop(key, None)
    payload = {"backend": backend, "special_token_ids": special_token_ids(tokenizer), "vocab_size": len(tokenizer)}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_tokenizer(data_dir: str | os.PathLike, tokenizer) -> str:
    """Raise `TokenizerMismatchError` unless ``tokenizer`` is the one the data in ``data_dir`` was prepared with.

    Returns the (matching) fingerprint.
    """
    manifest = read_manifest(data_dir)
    expected = manifest["tokenizer_fingerprint"]
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise TokenizerMismatchError(
            f"tokenizer fingerprint {actual} does not match the one {str(data_dir)!r} was prepared with "
            f"({expected}): the ids would be read as different text. Use the tokenizer the data was prepared with, "
            f"or re-run `bigbird-ja prepare` with this tokenizer")
    return actual
