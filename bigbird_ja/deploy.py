"""Deploy outside Python and with compilers: torch.export and ONNX graphs with a dynamic batch and sequence length.

One exported graph serves every batch size and every length from `length_range(config)[0]` (one token more than
the global blocks hold, so there is a sparse block to trace; for full attention 1) to `max_position_embeddings`.
What makes that possible (and torch.compile(dynamic=True) serve new lengths without recompiling):

* the layout is built by integer tensor ops on the symbolic number of blocks (`attention/layout.py`: the random
  blocks are a counter-based hash, not a generator's draw), so nothing in Python depends on the length's value;
* the encoder pads once to whole blocks, so no branch asks whether the length is a multiple of the block size;
* tracing treats sizes 0 and 1 like any other (`backed_size_oblivious`), so a graph traced at batch 2 also runs
  batch 1.

Shorter inputs than the minimum: pad them (with attention_mask 0) to the minimum; by batch invariance the real
tokens' outputs are those of the unpadded input. The exported model runs the blocked PyTorch backend.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .common.atomic_io import temp_path

# The outputs a deployed head returns (in this order); losses and hidden states stay out of the graph.
_SKIPPED_OUTPUTS = ("loss", "hidden_states", "attentions")


def length_range(config) -> tuple[int, int]:
    """(shortest, longest) sequence one exported graph takes for this config."""
    shortest = 1 if config.attention_type == "full" else config.num_global_blocks * config.block_size + 1
    return shortest, config.max_position_embeddings


class _TensorOutputs(nn.Module):
    """The model with tensor inputs and a tuple of tensor outputs: what exporters and ONNX Runtime see."""

    def __init__(self, model: nn.Module, output_names: list[str]):
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, input_ids, attention_mask):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def _example_inputs(model, batch: int = 2, length: int | None = None) -> dict:
    shortest, longest = length_range(model.config)
    length = length or min(longest, max(shortest + 3, 2 * model.config.block_size + 5))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length - length // 3:] = 0  # one padded row, so padding is part of the traced graph
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def output_names(model) -> list[str]:
    """The tensor outputs of `model`'s forward that a deployed graph returns."""
    with torch.no_grad():
        outputs = model(**_example_inputs(model, batch=1), return_dict=True)
    return [name for name in outputs.keys() if name not in _SKIPPED_OUTPUTS]


def _check_deployable(model) -> None:
    if not hasattr(model, "config") or getattr(model.config, "model_type", None) != "bigbird-ja":
        raise TypeError(f"expected a bigbird-ja model; got {type(model).__name__}.")
    if type(model).__name__.endswith("ForMultipleChoice"):
        raise ValueError("multiple-choice models take [batch, choices, length] inputs; export the encoder "
                         "(model.bigbird_ja) and score the choices outside the graph.")


@contextlib.contextmanager
def _size_oblivious_tracing():
    # Sizes 0/1 are not special-cased while tracing, so the graph is not specialised to batch >= 2.
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield


def dynamic_shapes(model) -> dict:
    """torch.export's dynamic shapes: any batch, and lengths in `length_range`."""
    shortest, longest = length_range(model.config)
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=shortest, max=longest)
    return {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}


def export_program(model) -> torch.export.ExportedProgram:
    """`torch.export` of `model` (eval mode, blocked backend) with a dynamic batch and sequence length."""
    return _export(model)[0]


def _export(model) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The exported program and the names of its outputs (in order)."""
    _check_deployable(model)
    model = model.eval()
    backend = model.config.attention_backend
    if backend not in ("auto", "blocked", "reference"):
        raise ValueError(f"attention_backend={backend!r} cannot be exported; set "
                         "model.config.attention_backend = 'blocked'.")
    # The graph is traced on the blocked backend; the caller's model keeps its own setting afterwards.
    model.config.attention_backend = "blocked"
    try:
        names = output_names(model)
        with _size_oblivious_tracing(), torch.no_grad():
            program = torch.export.export(_TensorOutputs(model, names), (), _example_inputs(model),
                                          dynamic_shapes=dynamic_shapes(model))
    finally:
        model.config.attention_backend = backend
    return program, names


def export_onnx(model, path: str | os.PathLike, *, opset: int | None = None) -> dict:
    """Write `model` as one ONNX graph with dynamic batch and length to `path` (atomically).

    Returns the graph's description (inputs, outputs, length range), which is also stored in the file's metadata
    under "bigbird_ja"."""
    program, names = _export(model)
    shortest, longest = length_range(model.config)
    description = {
        "inputs": ["input_ids", "attention_mask"],
        "outputs": names,
        "min_length": shortest,
        "max_length": longest,
        "block_size": model.config.block_size,
        "architecture": type(model).__name__,
        "shorter_inputs": f"pad to {shortest} tokens with attention_mask 0 (the outputs of the real tokens do not "
                          "change)",
    }
    kwargs = {} if opset is None else {"opset_version": opset}
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=description["inputs"], output_names=names,
                                     verbose=False, **kwargs)
    onnx_program.model.metadata_props["bigbird_ja"] = json.dumps(description)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temp_path(path)
    try:
        onnx_program.save(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return description


def onnx_session(path: str | os.PathLike):
    """An ONNX Runtime session on the CPU for a graph written by `export_onnx`."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("running an ONNX graph needs onnxruntime: pip install onnxruntime") from error
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.to(input_ids.dtype).numpy()}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def compare_with_eager(model, session, lengths=(None,), batch: int = 2) -> list[dict]:
    """Max |ONNX - eager| per output at each length (None: the example length), with a padded row in every batch."""
    rows = []
    for length in lengths:
        inputs = _example_inputs(model, batch=batch, length=length)
        with torch.no_grad():
            eager = model(**inputs, return_dict=True)
        got = run_onnx(session, inputs["input_ids"], inputs["attention_mask"])
        names = [name for name in eager.keys() if name not in _SKIPPED_OUTPUTS]
        mask = inputs["attention_mask"].bool()
        for name, value in zip(names, got):
            expected = eager[name]
            # Rows of padding tokens are not outputs anyone reads; compare the real tokens (per-token outputs).
            keep = mask if expected.dim() >= 2 and expected.shape[:2] == mask.shape else None
            difference = (value - expected).abs()
            difference = difference[keep] if keep is not None else difference
            rows.append({"length": inputs["input_ids"].shape[1], "output": name,
                         "max_abs_diff": float(difference.max())})
    return rows


def load_model(folder: str | os.PathLike):
    """The model a `save_pretrained` folder holds, with its head (`config.architectures`), in eval mode on the CPU."""
    from . import modeling
    from .configuration import BigBirdJaConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: give a save_pretrained folder (bigbird-ja export, "
                                "convert, or a fine-tuned run's model/).")
    config = BigBirdJaConfig.from_pretrained(folder)
    name = (config.architectures or ["BigBirdJaModel"])[0]
    model_class = getattr(modeling, name, None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json names the architecture {name!r}, which bigbird_ja.modeling does not "
                         "have.")
    return model_class.from_pretrained(folder).eval()


def export_onnx_folder(model_dir, out, *, check_lengths=None, opset: int | None = None) -> tuple[dict, list[dict]]:
    """`bigbird-ja export-onnx`: write the folder's model as ONNX and, with onnxruntime installed, compare it with
    eager PyTorch at `check_lengths` (default: three lengths that are not multiples of the block size)."""
    model = load_model(model_dir)
    description = export_onnx(model, out, opset=opset)
    try:
        session = onnx_session(out)
    except ImportError:
        return description, []
    if check_lengths is None:
        shortest, longest = description["min_length"], description["max_length"]
        block = description["block_size"]
        check_lengths = sorted({min(longest, shortest + block // 2 + 1), min(longest, (shortest + longest) // 2 | 1),
                                longest - 1 if longest % block == 0 else longest})
    return description, compare_with_eager(model, session, lengths=check_lengths)
