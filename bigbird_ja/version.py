"""The package's version: its one home, below everything that names it (`bigbird_ja.__version__`, the header of
the code `bigbird_ja.hub` writes into saved model folders)."""

__version__ = "0.1.0"
