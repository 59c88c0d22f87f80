"""What the memory model needs to know about one model: its parameters and activation bytes, counted on meta tensors.

Activations (per GPU): not a formula guessed beside the code but the code itself, run: one forward + backward of
the model on the meta device (no memory, no FLOPs) under `LiveBytes`, a TorchDispatchMode that counts every
storage an op creates until it is freed, and takes the peak. That is the saved activations plus what the
backward holds at its peak beside them: the gradients of the attention scores in the blocked backend, the MLM
head's three fp32 buffers of N x V (log-softmax output, its incoming gradient, the gradient it makes: 12 bytes a
logit, the loss being taken in fp32), with activation checkpointing the recompute of a layer (counted, not
estimated). It is counted at micro-batch 1 and 2 (c0 + c1 x b: the relative-position embeddings and the model's
caches are per call, the rest per sequence), once with the weights' gradients made by the moment of the peak
(held whole, as ZeRO-0's .grad) and once without (held in memory counted elsewhere: ZeRO-3's partition, a GPU's
reduction buckets). It follows the code: a change to a backend's backward changes the count. In closed form, per
layer and sequence the saved part is ~ N (alpha E + beta I) bytes for the projections, norms, GELU and dropout
masks plus gamma x (attended score elements) for the attention (`layout.attended_blocks`, the same count as the
FLOPs; full attention N^2 per head).

Counted for the backend the run uses, named in the counted model's config (`attention_backend`): "auto" is planned
as the fused Triton kernels (a GPU run; their custom ops, forward and backward, have meta implementations, and they
keep q, k, v, the output and the log-sum-exp, no score matrix), "blocked" / "reference" as themselves (the CPU runs
of the benchmark). Not counted: the weights' .grad while one is being accumulated into (momentary), the data
loader's batches, and on a GPU the caching allocator's rounding and fragmentation (the memory model's allowance).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPeak:
    """Peak live bytes of one forward + backward of b sequences: per_call + b x per_sequence (counted at b = 1 and
    2; per_call: what does not grow with the batch, e.g. relative-position embeddings and the model's caches)."""

    per_call: float
    per_sequence: float

    def at(self, micro_batch: int) -> float:
        return self.per_call + micro_batch * self.per_sequence


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about one model at one sequence length and precision."""

    num_params: int
    largest_layer_params: int  # DeepSpeed's model_to_params: the largest module's own parameters
    persistent_params: int  # parameters in tensors below stage3_param_persistence_threshold (ZeRO-3 keeps whole)
    gathered_modules: int  # modules whose own weights ZeRO-3 gathers (one all-gather each per pass)
    num_layers: int
    # peak live bytes of forward + backward, (checkpointing, with the weights' gradients made so far) -> c0 + c1 x b
    activations: dict[tuple[bool, bool], StepPeak]


class LiveBytes:
    """Bytes of the tensor storages that ops create while it is active, alive now and at their peak.

    A TorchDispatchMode (every aten op passes through it, forward and backward): each new output storage is
    counted when it is made and uncounted when it is freed (a weakref finalizer on the storage). Storages made
    before it started (weights, inputs) are not counted; neither are views (they share a counted storage). Works
    on real and meta tensors alike (on meta the sizes are real, nothing is allocated)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                tracker._count(torch.utils._pytree.tree_leaves(out), {t.untyped_storage()._cdata for t in inputs})
                return out

        self.mode, self.now, self.peak, self._alive = _Mode(), 0, 0, set()
        self.grads = 0  # bytes of the weights' gradients (set by the caller): peak_without_grads leaves them out
        self.peak_without_grads = 0

    def _count(self, outputs, input_storages: set) -> None:
        import weakref

        import torch

        for t in outputs:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            # a view or an in-place result shares its input's storage: nothing new (and a weight's view is no
            # activation)
            if key in self._alive or key in input_storages:
                continue
            size = storage.nbytes()
            self._alive.add(key)
            self.now += size
            self.peak = max(self.peak, self.now)
            self.peak_without_grads = max(self.peak_without_grads, self.now - self.grads)
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.now -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _step_peak_bytes(model, input_ids) -> tuple[int, int, int]:
    """Peak live bytes of one forward + backward on the device of ``input_ids``: saved activations, the
    temporaries of each op (the softmax and score gradients of the attention, the gradient of the MLM logits, ...),
    the recompute under activation checkpointing. Returns (peak with the weights' gradients made so far, peak
    without them, bytes still alive after the step: what the model caches, e.g. layouts). The gradients are kept
    whole as autograd makes them (ZeRO-0's .grad); without them is the peak where something else holds them
    (ZeRO-3's partition, a GPU's reduction buckets: counted by the model states)."""
    counted = set()

    def count(p):
        if id(p) not in counted:  # tied weights accumulate twice into one gradient
            counted.add(id(p))
            live.grads += p.grad.untyped_storage().nbytes()

    hooks = [p.register_post_accumulate_grad_hook(count) for p in model.parameters() if p.requires_grad]
    try:
        with LiveBytes() as live:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            for p in model.parameters():
                p.grad = None
            live.grads = 0
    finally:
        for h in hooks:
            h.remove()
    return live.peak, live.peak_without_grads, live.now


def planned_backend(requested: str) -> str:
    """The attention backend a run with ``requested`` uses on its GPUs: "auto" is the fused Triton kernels there."""
    return "triton" if requested == "auto" else requested


def model_facts(config, seq_len: int, precision: str, persistence_threshold: int = 100_000) -> ModelFacts:
    """Count parameters and activation bytes of ``config`` at ``seq_len`` (no memory used: meta tensors)."""
    import torch

    from ...modeling import BigBirdJaForMaskedLM

    # a copy that names the backend to count: the model dispatches on it, and a meta tensor runs any backend (the
    # Triton custom ops have meta implementations)
    config = config.__class__.from_dict({**config.to_dict(),
                                         "attention_backend": planned_backend(config.attention_backend)})
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings}: plan a model preset made for that length")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = BigBirdJaForMaskedLM(config).to(dtype).train()
    params = {p.data_ptr() if p.device.type != "meta" else id(p): p for p in model.parameters()}
    num_params = sum(p.numel() for p in params.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = sum(p.numel() for p in params.values() if p.numel() < persistence_threshold)
    gathered = sum(1 for m in model.modules()
                   if any(p.numel() >= persistence_threshold for p in m.parameters(recurse=False)))

    activations = {}
    for ckpt in (False, True):
        if ckpt:
            model.activation_checkpointing_enable()
        ids = {b: torch.zeros(b, seq_len, dtype=torch.long, device="meta") for b in (1, 2)}
        # the first call fills the model's caches (block layouts, relative positions): alive through every later
        # step, so counted once beside the batch-independent part; the linear fit is made on warm calls
        cached = _step_peak_bytes(model, ids[1])[2]
        one, two = (_step_peak_bytes(model, ids[b]) for b in (1, 2))
        for with_grads in (True, False):
            i = 0 if with_grads else 1
            activations[ckpt, with_grads] = StepPeak(float(2 * one[i] - two[i] + cached), float(two[i] - one[i]))
    return ModelFacts(num_params, largest, persistent, gathered, config.num_hidden_layers, activations)
