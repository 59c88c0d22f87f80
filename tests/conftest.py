"""Shared builders for the tests: tiny configs and small random transformers checkpoints saved locally."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen before triton decorates the
# kernels, i.e. before anything imports bigbird_ja_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:  # decorate the kernels now, whatever a later test does to the environment
    import bigbird_ja_kernels  # noqa: F401
except ImportError:
    pass

import bigbird_ja  # noqa: E402


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test sees the environment the session started with: the launcher code under test writes RANK,
    WORLD_SIZE, MASTER_ADDR, ... into os.environ itself, where monkeypatch cannot undo it (WORLD_SIZE=16 from a launcher
    test once made a later fine-tuning test refuse to run as "one of 16 processes")."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module of its own (the folder is not a package), for testing a script's functions."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> bigbird_ja.BigBirdJaConfig:
    values = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=1024, position_buckets=16, max_relative_positions=128, block_size=8,
                  num_window_blocks=3, num_global_blocks=1, num_random_blocks=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, attention_backend="blocked")
    values.update(overrides)
    return bigbird_ja.BigBirdJaConfig(**values)


def deberta_config(**overrides):
    from transformers import DebertaV2Config

    values = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=512, relative_attention=True, position_buckets=16,
                  max_relative_positions=128, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                  position_biased_input=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  type_vocab_size=0, pad_token_id=0)
    values.update(overrides)
    return DebertaV2Config(**values)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh random values everywhere (LayerNorms and biases included), so no parameter is a no-op."""
    # Values come from a CPU generator whatever the model's device (and any torch.device context: a CPU generator
    # cannot fill a CUDA tensor), so a model randomised on a GPU holds the same values as on the CPU.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=gen, device="cpu")
            param.copy_(1 + 0.2 * values if "LayerNorm.weight" in name else 0.2 * values)
    return model


def random_batch(batch: int, length: int, vocab: int, seed: int, pad_rows: bool = True):
    """Random ids and a padding mask: row 1 padded from a random point, the last row holds a single token."""
    gen = torch.Generator().manual_seed(seed)  # CPU tensors whatever the torch.device context: callers move them
    ids = torch.randint(1, vocab, (batch, length), generator=gen, device="cpu")
    mask = torch.ones(batch, length, dtype=torch.long, device="cpu")
    if pad_rows and batch > 1 and length > 1:
        mask[1, int(torch.randint(1, length, (1,), generator=gen, device="cpu")):] = 0
    if pad_rows and batch > 2:
        mask[-1, 1:] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# Real multi-process runs of the CLI (DeepSpeed's launcher, gloo on CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def cli_command(nprocs: int, args: list[str]) -> list[str]:
    """`bigbird-ja ARGS` as one process, or as `nprocs` processes under DeepSpeed's launcher."""
    if nprocs == 1:
        return [sys.executable, "-m", "bigbird_ja.cli", *args]
    return [*_deepspeed_launcher(), "--num_gpus", str(nprocs), "--master_port", str(_free_port()), "--module",
            "bigbird_ja.cli", *args]


def subprocess_env() -> dict:
    # One thread per process: on a shared 2-core runner, two OpenMP threads that spin-wait for a busy core make a
    # step 50x slower (measured: 0.04 s -> 3 s), and the two-process runs have one core each anyway.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env
