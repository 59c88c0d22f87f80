"""Shared builders for the tests: tiny configs and small random transformers checkpoints saved locally."""

from __future__ import annotations

import os

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
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def random_batch(batch: int, length: int, vocab: int, seed: int, pad_rows: bool = True):
    """Random ids and a padding mask: row 1 padded from a random point, the last row holds a single token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_rows and batch > 1 and length > 1:
        mask[1, int(torch.randint(1, length, (1,), generator=gen)):] = 0
    if pad_rows and batch > 2:
        mask[-1, 1:] = 0
    return ids, mask
