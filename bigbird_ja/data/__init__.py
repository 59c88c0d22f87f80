"""Pretraining data for bigbird-ja: packed, resumable, reproducible.

Modules, one concept each:

* `preparation`  text/JSON lines/Parquet/`datasets` -> tokenised, packed shards (`bigbird-ja prepare`)
* `sources`        streaming readers for every input format, in constant memory
* `cleaning`       decoding (UTF-8 or ``--encoding``) and cleaning of bad input, every change counted with file and
                   line; input in another encoding than the one it is read with is refused (`EncodingError`)
* `format`         the shard format, atomic writes, the manifest, `check_shard_files` (manifest against every
                   shard's own metadata; a disagreement is a `CorruptDataError`)
* `fingerprint`    `tokenizer_fingerprint` / `check_tokenizer`: shards are only read with their own tokenizer
* `dataset`        `PackedDataset`: lazy O(1)-descriptor loading, global shuffle, rank sharding, resume cursor
* `masking`        `MLMCollator`: span masking, deterministic
* `corpus`         the bundled sample corpus

Importing this package imports torch and numpy but neither `datasets` nor `pyarrow` (only Arrow/Parquet inputs
need them).
"""

from .cleaning import CleaningOptions, EncodingError
from .corpus import sample_corpus_path, sample_documents
from .dataset import FeistelPermutation, PackedDataset
from .fingerprint import TokenizerMismatchError, check_tokenizer, tokenizer_fingerprint
from .format import FORMAT_VERSION, CorruptDataError, read_manifest
from .masking import IGNORE_INDEX, MaskingOptions, MLMCollator
from .preparation import PrepareOptions, PrepareReport, prepare
from .sources import SourceOptions

__all__ = [
    "CleaningOptions", "CorruptDataError", "EncodingError", "FORMAT_VERSION", "FeistelPermutation", "IGNORE_INDEX",
    "MLMCollator", "MaskingOptions", "PackedDataset", "PrepareOptions", "PrepareReport", "SourceOptions",
    "TokenizerMismatchError", "check_tokenizer", "prepare", "read_manifest", "sample_corpus_path",
    "sample_documents", "tokenizer_fingerprint",
]
