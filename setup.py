"""bigbird-ja: long-context Japanese encoders (BigBird block-sparse x DeBERTa-v2 disentangled attention)."""

import os
import re

from setuptools import Extension, find_packages, setup

# one home for the version: bigbird_ja/version.py (read as text: importing the package needs its dependencies)
VERSION = re.search(r'__version__ = "([^"]+)"', open("bigbird_ja/version.py", encoding="utf-8").read()).group(1)

# The CPU kernels of the relative terms and of attention dropout (bigbird_ja/attention/csrc/*.c, one library): plain
# C (pthreads, or torch's OpenMP team handed over at load), no torch headers, so no torch is needed to build it and
# pip's isolated build needs nothing beyond setuptools. Loaded with ctypes and registered as torch ops by
# bigbird_ja/attention/cpu_kernels.py and dropout.py.
# Optional: where it cannot be built (no C compiler) the install goes on and the pure-PyTorch paths run;
# BIGBIRD_JA_NO_NATIVE=1 skips it.
NATIVE = [] if os.environ.get("BIGBIRD_JA_NO_NATIVE", "0") not in ("", "0") else [Extension(
    "bigbird_ja.attention._relative_terms",
    ["bigbird_ja/attention/csrc/relative_terms.c", "bigbird_ja/attention/csrc/dropout.c",
     "bigbird_ja/attention/csrc/threads.c"],
    depends=["bigbird_ja/attention/csrc/shared.h"],  # rebuilt when it changes, and shipped in the sdist
    extra_compile_args=["-O3", "-pthread"], extra_link_args=["-pthread"], optional=True)]

setup(
    name="bigbird-ja",
    version=VERSION,
    description="Long-context Japanese encoder: BigBird block-sparse attention with DeBERTa-v2 disentangled "
                "relative positions, drop-in for transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bigbird_ja", "bigbird_ja.*"])
    + find_packages("kernels", include=["bigbird_ja_kernels", "bigbird_ja_kernels.*"]),
    package_dir={"bigbird_ja_kernels": "kernels/bigbird_ja_kernels"},
    # the sample corpus lets `bigbird-ja prepare` and the examples run on a fresh machine without downloads
    package_data={"bigbird_ja": ["py.typed", "resources/sample_corpus/*.txt"]},
    ext_modules=NATIVE,
    install_requires=[
        # Install torch first (the CPU build on machines without a GPU): a bare requirement pulls a CUDA build.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "numpy",
        "tqdm>=4.60",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "triton": ["triton>=3.2"],
        # bigbird-ja export-onnx and running its graphs (torch's dynamo exporter needs onnx and onnxscript)
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        # Arrow (datasets.save_to_disk) and Parquet inputs of `bigbird-ja prepare`; text and JSON lines need neither
        "data": ["datasets>=2.14", "pyarrow>=12"],
        # training a tokenizer (bigbird-ja train-tokenizer); a trained tokenizer loads with transformers alone
        "tokenizer": ["sentencepiece>=0.2", "fugashi>=1.3", "unidic-lite>=1.0.8"],
        # bigbird-ja pretrain / export (DeepSpeed; tested with 0.19.8, no op needs building) and the tokenizer the
        # tiny preset trains; TensorBoard logging is used when `tensorboard` is installed
        "train": ["deepspeed>=0.14", "sentencepiece>=0.2", "fugashi>=1.3", "unidic-lite>=1.0.8"],
        # triton in the tests: the kernels run under TRITON_INTERPRET=1 on CPU and compile ahead of time for sm_80/90
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7", "sentencepiece>=0.2", "triton>=3.2", "fugashi>=1.3",
                 "unidic-lite>=1.0.8", "datasets>=2.14", "pyarrow>=12", "deepspeed>=0.14", "onnx>=1.16",
                 "onnxscript>=0.2", "onnxruntime>=1.18", "sentence-transformers>=3.0", "peft>=0.10"],
    },
    entry_points={"console_scripts": ["bigbird-ja=bigbird_ja.cli:main"]},
)
