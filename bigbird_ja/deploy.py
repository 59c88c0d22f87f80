"""Deploy outside Python and with compilers: torch.export and ONNX graphs with a dynamic batch and sequence length.

One exported graph serves every batch size and every length from 1 token to `max_position_embeddings`
(`length_range`). What makes that possible (and torch.compile(dynamic=True) serve new lengths without recompiling):

* the layout is built by integer tensor ops on the symbolic number of blocks (`attention/layout.py`: the random
  blocks are a counter-based hash, not a generator's draw), so nothing in Python depends on the length's value;
* the encoder pads once to whole blocks, so no branch asks whether the length is a multiple of the block size;
* tracing treats sizes 0 and 1 like any other (`backed_size_oblivious`), so a graph traced at batch 2 also runs
  batch 1;
* the graph pads inputs shorter than `traced_length` (one token more than the global blocks hold, so every input
  has a sparse block; 1 for full attention) up to it with attention_mask 0 and cuts the outputs back. The real
  tokens of such an input all lie in the global blocks, which attend to every token, so their outputs are those of
  the unpadded input.

Bounds are part of the graph. A torch.export program refuses longer inputs through its range constraints. An ONNX
graph refuses in onnxruntime itself the inputs the model cannot take: more tokens than `max_position_embeddings`, an
empty input, a mask of another shape, ids outside the vocabulary (ONNX's Gather would wrap a negative id). ONNX has
no assert op, so each refusal is a Reshape of the input to its own shape with a -2 (which Reshape rejects) in place
of a dimension that breaks the rule; onnxruntime's error names the failing node, and the node's name is the message.
`run_onnx` refuses the same inputs in Python first, with the same words. The exported model runs the blocked
PyTorch backend.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common.atomic_io import temp_path

# The outputs a deployed head returns (in this order); losses and hidden states stay out of the graph.
_SKIPPED_OUTPUTS = ("loss", "hidden_states", "attentions")
# `bigbird-ja export-onnx` keeps a graph only if onnxruntime agrees with PyTorch this closely (measured: below 1e-6).
ONNX_TOLERANCE = 1e-4
_INT64_MAX = 2**63 - 1


def traced_length(config) -> int:
    """The shortest input an exported graph runs the model on; shorter inputs are padded up to it in the graph."""
    return 1 if config.attention_type == "full" else config.num_global_blocks * config.block_size + 1


def length_range(config) -> tuple[int, int]:
    """(shortest, longest) sequence one exported graph takes for this config."""
    return 1, config.max_position_embeddings


class _TensorOutputs(nn.Module):
    """The model with tensor inputs and a tuple of tensor outputs: what exporters and ONNX Runtime see. Inputs shorter
    than `traced_length` are padded up to it (attention_mask 0) and the per-token outputs cut back to the input."""

    def __init__(self, model: nn.Module, outputs: dict[str, bool]):
        super().__init__()
        self.model = model
        self.outputs = outputs  # name -> whether it is per token ([batch, length, ...])
        self.traced_length = traced_length(model.config)
        self.pad_token_id = model.config.pad_token_id or 0

    def forward(self, input_ids, attention_mask):
        length = input_ids.shape[1]
        padded = torch.sym_max(length, self.traced_length)  # a symbolic max, not a branch: one graph for every length
        input_ids = F.pad(input_ids, (0, padded - length), value=self.pad_token_id)
        attention_mask = F.pad(attention_mask, (0, padded - length), value=0)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        # index_select, not a slice: whether a view is contiguous would depend on the length (see the encoder's end).
        keep = torch.arange(length, device=input_ids.device)
        return tuple(outputs[name].index_select(1, keep) if per_token else outputs[name]
                     for name, per_token in self.outputs.items())


def _example_length(config) -> int:
    return min(config.max_position_embeddings, max(traced_length(config) + 3, 2 * config.block_size + 5))


def _example_inputs(model, batch: int = 2, length: int | None = None) -> dict:
    length = _example_length(model.config) if length is None else length
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length - length // 3:] = 0  # one padded row, so padding is part of the traced graph
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _deployed_outputs(model) -> dict[str, bool]:
    """The tensor outputs of `model`'s forward that a deployed graph returns, in order, each with whether it is per
    token: its second dimension is the length, at two lengths (at one, a head's number of labels could match)."""
    length = _example_length(model.config)
    lengths = (length, length + 1 if length < model.config.max_position_embeddings else length - 1)
    with torch.no_grad():
        runs = [(n, model(**_example_inputs(model, batch=1, length=n), return_dict=True)) for n in lengths]
    names = [name for name in runs[0][1].keys() if name not in _SKIPPED_OUTPUTS]
    return {name: all(out[name].dim() >= 2 and out[name].shape[1] == n for n, out in runs) for name in names}


def output_names(model) -> list[str]:
    """The tensor outputs of `model`'s forward that a deployed graph returns."""
    return list(_deployed_outputs(model))


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
        outputs = _deployed_outputs(model)
        with _size_oblivious_tracing(), torch.no_grad():
            program = torch.export.export(_TensorOutputs(model, outputs), (), _example_inputs(model),
                                          dynamic_shapes=dynamic_shapes(model))
    finally:
        model.config.attention_backend = backend
    return program, list(outputs)


def _refusal_messages(description: dict) -> dict[str, str]:
    """What the graph and `run_onnx` say when they refuse an input (one home for the words)."""
    longest, vocab = description["max_length"], description["vocab_size"]
    return {
        "length": f"input_ids must be [batch >= 1, 1 to {longest} tokens] (max_position_embeddings={longest}); "
                  "truncate or window longer inputs (e.g. the tokenizer's max_length / stride)",
        "mask": "attention_mask must have the shape of input_ids, [batch, length] (1 = token, 0 = padding)",
        "vocab": f"input_ids must be token ids in [0, {vocab}) (vocab_size={vocab}); encode text with the model's "
                 "tokenizer",
    }


def _refuse_out_of_bounds(graph, description: dict) -> None:
    """Put the input checks at the head of an ONNX graph (onnx_ir), each feeding the rest of it (see the module
    docstring): the checked tensors replace the inputs everywhere, so no optimiser can drop a check."""
    import numpy as np
    import onnx_ir as ir

    messages = _refusal_messages(description)
    tape = ir.tape.Tape()

    def constant(values):
        return tape.op("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})

    def refuse_unless(value, ok, message):
        # Reshape to its own shape, with -2 (refused by Reshape) wherever `ok` (per dimension, or one bool) is false.
        target = tape.op("Where", [ok, tape.op("Shape", [value]), constant([-2, -2])])
        return tape.op("Reshape", [value, target], name=f"bigbird_ja refuses the input: {message}")

    inputs = {value.name: value for value in graph.inputs}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    uses = {name: list(value.uses()) for name, value in inputs.items()}
    ids_shape = tape.op("Shape", [ids])  # [batch, length]
    in_range = tape.op("And", [tape.op("GreaterOrEqual", [ids_shape, constant([1, 1])]),
                               tape.op("LessOrEqual", [ids_shape, constant([_INT64_MAX, description["max_length"]])])])
    checked_ids = refuse_unless(ids, in_range, messages["length"])
    checked_mask = refuse_unless(mask, tape.op("Equal", [tape.op("Shape", [mask]), ids_shape]), messages["mask"])
    # Not empty here (the length check ran first), so the reductions are defined.
    in_vocab = tape.op("And", [
        tape.op("GreaterOrEqual", [tape.op("ReduceMin", [checked_ids], {"keepdims": 0}), constant(0)]),
        tape.op("Less", [tape.op("ReduceMax", [checked_ids], {"keepdims": 0}), constant(description["vocab_size"])])])
    checked_ids = refuse_unless(checked_ids, in_vocab, messages["vocab"])
    graph.insert_before(graph.node(0), tape.nodes)
    for name, checked in (("input_ids", checked_ids), ("attention_mask", checked_mask)):
        for node, index in uses[name]:
            node.replace_input_with(index, checked)


def _onnx_program(model, opset: int | None):
    """The ONNX program of `model` (bounds checked in the graph, description in its metadata) and the description."""
    if opset is not None and opset < 18:
        raise ValueError(f"--opset {opset}: the exporter writes opset 18 and newer; leave --opset out or give 18 or "
                         "more")
    program, names = _export(model)
    shortest, longest = length_range(model.config)
    padded_to = traced_length(model.config)
    description = {
        "inputs": ["input_ids", "attention_mask"],
        "outputs": names,
        "min_length": shortest,
        "max_length": longest,
        "padded_to": padded_to,
        "vocab_size": model.config.vocab_size,
        "block_size": model.config.block_size,
        "architecture": type(model).__name__,
        "shorter_inputs": f"inputs shorter than {padded_to} tokens are padded inside the graph to {padded_to} with "
                          "attention_mask 0 (the real tokens' outputs do not change)",
        "longer_inputs": f"inputs longer than {longest} tokens (max_position_embeddings) are refused by the graph",
    }
    kwargs = {} if opset is None else {"opset_version": opset}
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=description["inputs"], output_names=names,
                                     verbose=False, **kwargs)
    _refuse_out_of_bounds(onnx_program.model.graph, description)
    onnx_program.model.metadata_props["bigbird_ja"] = json.dumps(description)
    return onnx_program, description


def _onnx_destination(path: str | os.PathLike) -> Path:
    """`path` if a file can be written there; refused before the minutes of an export otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"out {path} is a directory; give the .onnx file to write, e.g. {path / 'model.onnx'}")
    existing = next(parent for parent in path.parents if parent.exists())  # the root always exists
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder; give the .onnx file another path")
    return path


def _save_onnx(onnx_program, path: Path, check=None) -> None:
    """Write the graph to a temporary name beside `path`, run `check(temporary)`, then rename it into place: a failed
    check or a killed process leaves no .onnx that looks good."""
    partial = temp_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx_program.save(str(partial))
        except OSError as error:  # a read-only folder, a full disk: about the user's path, not the temporary one
            raise ValueError(f"cannot write {path}: {error.strerror or error}; give the .onnx file another path") \
                from error
        if check is not None:
            check(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export_onnx(model, path: str | os.PathLike, *, opset: int | None = None) -> dict:
    """Write `model` as one ONNX graph with dynamic batch and length to `path` (atomically).

    Returns the graph's description (inputs, outputs, length range and what happens outside it), which is also
    stored in the file's metadata under "bigbird_ja"."""
    path = _onnx_destination(path)
    onnx_program, description = _onnx_program(model, opset)
    _save_onnx(onnx_program, path)
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


def onnx_description(session) -> dict:
    """The description `export_onnx` stored in a graph's metadata ({} for a graph written by something else)."""
    text = session.get_modelmeta().custom_metadata_map.get("bigbird_ja")
    return json.loads(text) if text else {}


def _check_onnx_inputs(description: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Refuse, in Python and with the graph's words, an input the graph would refuse."""
    messages = _refusal_messages(description)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; {messages['length']}")
    batch, length = input_ids.shape
    if batch < 1 or not 1 <= length <= description["max_length"]:
        raise ValueError(f"input_ids has {batch} rows of {length} tokens; {messages['length']}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; {messages['mask']}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= description["vocab_size"]:
        raise ValueError(f"input_ids holds {low if low < 0 else high}; {messages['vocab']}")


def run_onnx(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of a graph written by `export_onnx` (in its description's order), after refusing in Python what
    the graph would refuse."""
    description = onnx_description(session)
    if description:
        _check_onnx_inputs(description, input_ids, attention_mask)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.to(input_ids.dtype).numpy()}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def compare_with_eager(model, session, lengths=(None,), batch: int = 2) -> list[dict]:
    """Max |ONNX - eager| per output at each length (None: the example length), with a padded row in every batch;
    `eager_finite` says whether PyTorch's own outputs were finite there."""
    outputs = _deployed_outputs(model)
    rows = []
    for length in lengths:
        inputs = _example_inputs(model, batch=batch, length=length)
        with torch.no_grad():
            eager = model(**inputs, return_dict=True)
        got = run_onnx(session, inputs["input_ids"], inputs["attention_mask"])
        mask = inputs["attention_mask"].bool()
        for (name, per_token), value in zip(outputs.items(), got):
            expected = eager[name]
            # Rows of padding tokens are not outputs anyone reads; compare the real tokens (per-token outputs).
            difference = (value - expected).abs()
            difference = difference[mask] if per_token else difference
            rows.append({"length": inputs["input_ids"].shape[1], "output": name,
                         "max_abs_diff": float(difference.max()),
                         "eager_finite": bool(torch.isfinite(expected[mask] if per_token else expected).all())})
    return rows


class OnnxCheckError(RuntimeError):
    """onnxruntime disagrees with PyTorch on a graph just exported (a bug: the message asks for a report)."""


def _require_agreement(rows: list[dict], path: Path) -> None:
    """Raise unless every row is within `ONNX_TOLERANCE`; NaN and inf fail (`not diff <= tol`, not `diff > tol`)."""
    for row in rows:
        if not row["eager_finite"]:
            raise ValueError(f"PyTorch's own {row['output']} at {row['length']} tokens is not finite (NaN or inf): "
                             f"the weights are damaged or training diverged; {path} was not written. Export an "
                             "earlier checkpoint or copy the folder again")
    bad = [row for row in rows if not row["max_abs_diff"] <= ONNX_TOLERANCE]
    if bad:
        row = next((row for row in bad if math.isnan(row["max_abs_diff"])),  # a NaN first, else the worst
                   max(bad, key=lambda row: row["max_abs_diff"]))
        raise OnnxCheckError(f"onnxruntime differs from PyTorch at {row['length']} tokens ({row['output']}: max "
                             f"|diff| {row['max_abs_diff']:.2e}, allowed {ONNX_TOLERANCE:g}) in {len(bad)} of "
                             f"{len(rows)} checks; {path} was not written. Please report it (with the model's "
                             "config.json)")


def _weights_file(folder: Path) -> Path:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return next((folder / name for name in names if (folder / name).exists()), folder / names[0])


def load_model(folder: str | os.PathLike):
    """The model a `save_pretrained` folder holds, with its head (`config.architectures`), in eval mode on the CPU;
    the folder checked against its checksums.json first and the weights checked to be finite."""
    from safetensors import SafetensorError

    from . import modeling
    from .common.checksums import verify_model_folder
    from .configuration import BigBirdJaConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: give a save_pretrained folder (bigbird-ja export, "
                                "convert, or a fine-tuned run's model/).")
    verify_model_folder(folder)
    refetch = "copy the folder again or re-run the export or fine-tuning that wrote it"
    try:
        config = BigBirdJaConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}/config.json cannot be read ({error}); {refetch}") from error
    name = (config.architectures or ["BigBirdJaModel"])[0]
    model_class = getattr(modeling, name, None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json names the architecture {name!r}, which bigbird_ja.modeling does not "
                         "have.")
    weights = _weights_file(folder)
    try:
        model = model_class.from_pretrained(folder, verify_checksums=False).eval()  # verified above
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights} cannot be read ({type(error).__name__}: {error}): it is missing, cut short or "
                         f"not a weights file; {refetch}") from error
    for tensor_name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "inf"
            raise ValueError(f"{weights}: {tensor_name} holds {kind}: the weights are damaged (a bad copy, a flipped "
                             f"bit) or training diverged; {refetch}, or export an earlier checkpoint")
    return model


def _default_check_lengths(description: dict) -> list[int]:
    """One length padded inside the graph, then three that are not multiples of the block size."""
    shortest, longest, block = description["padded_to"], description["max_length"], description["block_size"]
    return sorted({max(1, shortest // 2), min(longest, shortest + block // 2 + 1),
                   min(longest, (shortest + longest) // 2 | 1), longest - 1 if longest % block == 0 else longest})


def export_onnx_folder(model_dir, out, *, check_lengths=None, opset: int | None = None) -> tuple[dict, list[dict]]:
    """`bigbird-ja export-onnx`: write the folder's model as ONNX and, with onnxruntime installed, compare it with
    eager PyTorch at `check_lengths` (default: `_default_check_lengths`) before it is renamed into place; a graph
    that disagrees (NaN included) is not written. Returns the description and the comparisons."""
    out = _onnx_destination(out)
    model = load_model(model_dir)
    shortest, longest = length_range(model.config)
    for length in check_lengths or ():
        if not shortest <= length <= longest:
            raise ValueError(f"--check-lengths {length}: the graph takes {shortest}-{longest} tokens "
                             f"(max_position_embeddings={longest}); give lengths in that range")
    onnx_program, description = _onnx_program(model, opset)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _save_onnx(onnx_program, out)
        return description, []
    rows = []

    def check(partial: Path) -> None:
        rows.extend(compare_with_eager(model, onnx_session(partial),
                                       lengths=check_lengths or _default_check_lengths(description)))
        _require_agreement(rows, out)

    _save_onnx(onnx_program, out, check)
    return description, rows
