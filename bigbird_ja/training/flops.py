"""Model FLOPs of one MLM training step, counted for the block-sparse pattern, and the peak of known devices.

Glossary: N tokens per sequence, E hidden size, E' embedding size, I intermediate size, L layers, V vocabulary,
D head dim, bs block size, S relative span (2S relative embeddings), r = number of relative terms (c2p, p2c).

Forward FLOPs of one sequence (a multiply-add is 2 FLOPs):

    projections   L * N * 2 * (4 E^2 + 2 E I)                      Q, K, V, output; the two FFN matrices
    attention     sum over layers of P_l * bs^2 * D * 2 * (2 + r)  P_l = attended (query block, key block) pairs
                                                                   summed over heads (layout.attended_blocks()):
                                                                   QK^T, PV and one score term per relative term
    MLM head      N * 2 * (E E' + E' V)                            transform and decoder, every position

and once per forward call (not per sequence), the relative embeddings through the key / query projections:
L * r * 2 * 2S * E^2. Training = 3 x forward (the backward pass costs twice the forward). Recomputation by
activation checkpointing is not counted: these are model FLOPs (MFU), not hardware FLOPs. Padding tokens count (the
sequence length is fixed). Layer norms, softmax, GELU and the loss are left out (well under 1%).
"""

from __future__ import annotations

from ..attention import layout_for

# Peak dense TFLOP/s per device: (bf16 tensor cores, fp32 without TF32). Longest name first when matching.
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "GH200": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "H800": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A800": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
    "V100": (125.0, 15.7),  # fp16 tensor cores; V100 has no bf16
}


def forward_flops_per_sequence(config, seq_len: int) -> float:
    E, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    Ee = config.embedding_size or E
    D = config.hidden_size // config.num_attention_heads
    r = len(config.pos_att_type) if config.relative_attention else 0
    N = seq_len
    projections = L * N * 2 * (4 * E * E + 2 * E * I)
    attention = 0
    for layer in range(L):
        layout = layout_for(config, layer, N)
        attention += layout.attended_blocks() * layout.block_size ** 2 * D * 2 * (2 + r)
    head = N * 2 * (E * Ee + Ee * V)
    return float(projections + attention + head)


def forward_flops_per_call(config) -> float:
    if not config.relative_attention:
        return 0.0
    r = len(config.pos_att_type)
    return float(config.num_hidden_layers * r * 2 * (2 * config.relative_span) * config.hidden_size ** 2)


def training_flops(config, seq_len: int, micro_batch_size: int, micro_batches: int = 1) -> float:
    """Model FLOPs of ``micro_batches`` forward+backward passes of ``micro_batch_size`` sequences on one device."""
    per_micro = micro_batch_size * forward_flops_per_sequence(config, seq_len) + forward_flops_per_call(config)
    return 3.0 * per_micro * micro_batches


def hardware_training_flops(config, seq_len: int, micro_batch_size: int, micro_batches: int = 1,
                            activation_checkpointing: bool = False) -> float:
    """FLOPs the device executes: the model FLOPs, plus one more forward when activation checkpointing recomputes
    every layer in the backward pass (4 forwards' worth instead of 3; the MLM head is not recomputed, counted
    anyway: it is small). What a step's compute time is made of (`planner`); MFU still divides model FLOPs."""
    factor = 4.0 / 3.0 if activation_checkpointing else 1.0
    return factor * training_flops(config, seq_len, micro_batch_size, micro_batches)


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Peak dense TFLOP/s of a known GPU for "bf16" or "fp32", or None (CPU, unknown device)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            bf16, fp32 = PEAK_TFLOPS[key]
            return bf16 if precision == "bf16" else fp32
    return None
