"""bigbird-ja: long-context Japanese encoders (BigBird block-sparse x DeBERTa-v2 disentangled attention)."""

from setuptools import find_packages, setup

setup(
    name="bigbird-ja",
    version="0.1.0",
    description="Long-context Japanese encoder: BigBird block-sparse attention with DeBERTa-v2 disentangled "
                "relative positions, drop-in for transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bigbird_ja", "bigbird_ja.*"]),
    package_data={"bigbird_ja": ["py.typed"]},
    install_requires=[
        # Install torch first (the CPU build on machines without a GPU): a bare requirement pulls a CUDA build.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "matplotlib>=3.7", "sentencepiece>=0.2"],
    },
    entry_points={"console_scripts": ["bigbird-ja=bigbird_ja.cli:main"]},
)
