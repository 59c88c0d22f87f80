"""`bigbird-ja export CKPT OUT`: a training checkpoint as a `save_pretrained` folder (safetensors + tokenizer).

The weights are the fp32 master weights: gathered from the ZeRO partitions with DeepSpeed's `zero_to_fp32` (stages
1-3), or the module weights of a stage-0 checkpoint (cast to fp32). Every key of the model must be found (the MLM
decoder is tied to the word embeddings and may be absent); anything left over is an error. The folder appears under
its name only when complete (written beside it, then renamed), with checksums.json (every file's size and sha256)
written last. The checkpoint is verified before anything is read (a damaged one is refused, naming the file). Given a
run folder (or its checkpoints/), the newest checkpoint of that folder's run is exported: a step folder of another
run copied in, or renamed, is named and passed over (`checkpoint.identify_run`).
`AutoModelForMaskedLM.from_pretrained(OUT)` loads it after `import bigbird_ja`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.checksums import save_model_folder
from .checkpoint import (
    ENGINE_TAG, META, checked_step_folder, engine_load_dir, identify_run, list_checkpoints, newest_of_run, read_meta,
    step_of, unusable_message, warn,
)


@dataclass
class ExportReport:
    checkpoint: str
    out_dir: str
    step: int
    num_parameters: int

    def summary(self) -> str:
        return (f"exported {self.checkpoint} (step {self.step}, {self.num_parameters / 1e6:,.1f} M parameters) to "
                f"{self.out_dir} (safetensors, tokenizer and the model's code: AutoModelForMaskedLM loads it after "
                f"`import bigbird_ja`, or with trust_remote_code=True where the package is not installed)")


def _find_checkpoint(path: Path, log) -> Path:
    """A step folder itself, verified; or the newest one of the folder's run that verifies under a checkpoint folder
    or a run folder (each newer one skipped, and each other run's, is named to ``log``). Raises naming what is wrong
    with each when none can be used."""
    if step_of(path) is not None or (path / META).exists():
        return checked_step_folder(path, log, f"{str(path)!r} cannot be exported",
                                   "Export an older checkpoint of the run (the step-NNNNNNNN folders beside it), or "
                                   "give the run folder to take the newest one that verifies")
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            chosen, rejected = newest_of_run(root, identify_run(root, log), log)
            if chosen is None:
                raise ValueError(f"{unusable_message(root, rejected)}\nnothing of this run to export; to export "
                                 f"one of them all the same, name its step folder")
            return chosen
    raise FileNotFoundError(f"{str(path)!r} is not a checkpoint (step-NNNNNNNN folder) and holds none")


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output that is not a folder to write (or replace, with ``overwrite``), before anything is read."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file, not a folder: export writes a folder (model.safetensors, "
                         f"config.json, the tokenizer); name a folder that does not exist yet, or an empty one")
    above = next(p for p in out.absolute().parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"output {str(out)!r}: {str(above)!r} is a file, so no folder can be made under it; name "
                         f"a folder elsewhere")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output {str(out)!r} exists and is not empty: choose another folder or pass --overwrite")


def consolidated_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from checkpoint ``ckpt`` (no process group needed)."""
    engine_dir = engine_load_dir(ckpt)
    if zero_stage >= 1:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as err:
            raise ImportError(f"exporting a ZeRO checkpoint needs DeepSpeed ({err}): pip install "
                              f"'bigbird-ja[train]'") from None
        state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_TAG)
    else:
        blob = torch.load(engine_dir / ENGINE_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)
        state = blob["module"]
    return {k: v.float() for k, v in state.items()}


def export_checkpoint(ckpt, out, *, overwrite: bool = False, log=warn) -> ExportReport:
    """Write checkpoint ``ckpt`` (a step folder, a checkpoint folder or a run folder) to ``out``.

    The checkpoint is verified first (`checkpoint.verify_checkpoint`): a damaged step folder is refused; under a run
    or checkpoint folder the newest one that verifies is taken, each newer one skipped named to ``log``."""
    from transformers import AutoTokenizer

    from ..configuration import BigBirdJaConfig
    from ..modeling import BigBirdJaForMaskedLM

    out = Path(out)
    check_output_folder(out, overwrite)
    ckpt = _find_checkpoint(Path(ckpt), log)
    meta = read_meta(ckpt)
    config = BigBirdJaConfig.from_json_file(str(ckpt / "model" / "config.json"))
    state = consolidated_state_dict(ckpt, int(meta["trainer"]["config"]["zero"]["stage"]))

    model = BigBirdJaForMaskedLM(config)
    expected = set(model.state_dict())
    tied = {"cls.predictions.decoder.weight"}
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: the checkpoint does not match the model config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))

    save_model_folder(model, tokenizer, out)  # checksums.json last: what `bigbird-ja finetune --model` checks
    return ExportReport(checkpoint=str(ckpt), out_dir=str(out), step=int(meta["step"]),
                        num_parameters=sum(p.numel() for p in model.parameters()))
