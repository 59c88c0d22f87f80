"""Fail-fast checks every rank runs before training: what commonly kills large jobs, found in seconds, not hours.

* **Open files.** The soft RLIMIT_NOFILE is raised to the hard limit where that is allowed, then compared with an
  estimate of what this process will open (`estimate_open_files`): memory-mapped shards (one descriptor each on
  Python < 3.13), communication sockets (up to a few per peer), checkpoint and log files, and a base for the
  interpreter and drivers. A hard limit below the estimate is an error that says what to ask for.
* **Data.** Every shard the manifest lists is present, agrees with its own ``shard-*.json`` (seq_len, dtype, counts,
  fingerprint) and has the size its counts give (`data.format.check_shard_files`: metadata only; sha256 too with
  data.verify_checksums, on rank 0); the data holds sequences; and the tokenizer's fingerprint matches the one the
  data was prepared with, and, in a warm start, the one saved with model.init_from (`check_model_tokenizer`). Ids
  are checked against the vocabulary as samples are read (`PackedDataset`).
* **Disk.** The checkpoint folder's file system has room for keep_last + 1 checkpoints (the newest is written before
  the oldest is deleted), estimated from the parameter count (`checkpoint_bytes`).
* **Offload.** CPU offload runs only when asked for, and draws a warning on more than one node; it is refused when
  this node's ranks' offloaded optimizer state (16 B per parameter over the world) exceeds 80% of its memory.

`run_preflight` returns problems (errors) and warnings instead of raising, so that the trainer can agree across ranks
and stop every rank together with each rank's message, instead of leaving the healthy ones hanging at a barrier.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import PretrainConfig

BASE_OPEN_FILES = 256  # interpreter, std streams, pipes, /dev/nvidia*, /proc reads, TCPStore
FILES_PER_PEER = 2  # sockets a process may hold per peer (gloo meshes, NCCL bootstrap / proxy)
CHECKPOINT_AND_LOG_FILES = 32


class PreflightError(RuntimeError):
    """One or more preflight checks failed on some rank; the message lists them."""


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict | None = None


def estimate_open_files(cfg: PretrainConfig, world_size: int) -> int:
    """Descriptors one training process may hold at once (see the module docstring for the terms)."""
    shards = cfg.data.max_open_shards * (2 if cfg.data.eval_shards else 1)
    return (BASE_OPEN_FILES + shards + FILES_PER_PEER * world_size + CHECKPOINT_AND_LOG_FILES
            + cfg.preflight.extra_open_files)


def raise_open_file_limit(needed: int, raise_soft: bool = True, world_size: int = 1) -> tuple[int, int, str | None]:
    """Raise the soft limit to the hard one (if allowed); returns (soft, hard, problem or None). ``world_size``
    (the number of peers) only goes into the message."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to check
        return needed, needed, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft and soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some systems cap the soft limit below the hard one (e.g. nr_open)
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        return soft, hard, (
            f"open files: this process may need about {needed} descriptors (shards, sockets to {world_size} peers, "
            f"checkpoints; see preflight.estimate_open_files) but its limit is soft={soft}, hard={hard}. "
            f"Raise it before launching (`ulimit -n {needed}` in the job script; on SLURM also "
            f"`srun --propagate=NOFILE`), lower data.max_open_shards, or ask the administrators for a higher hard "
            f"limit")
    return soft, hard, None


def checkpoint_bytes(num_params: int, cfg: PretrainConfig) -> int:
    """Estimated size of one checkpoint: fp32 master weights and two Adam moments (12 B/param) plus the module
    weights in the training precision (4 or 2 B/param), plus 5%."""
    per_param = 12 + (2 if cfg.train.precision == "bf16" else 4)
    return int(num_params * per_param * 1.05)


def check_free_disk(root: Path, needed: int) -> str | None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        return (f"disk: checkpoints under {str(root)!r} need about {needed / 2**30:,.1f} GiB more (keep_last + 1 "
                f"checkpoints of the estimated size), the file system has {free / 2**30:,.1f} GiB free. Free space, "
                f"point checkpoint.dir elsewhere, or lower checkpoint.keep_last")
    return None


def check_checkpoint_disk(cfg: PretrainConfig, num_params: int) -> tuple[str | None, int]:
    """(problem or None, bytes of one checkpoint): room for the checkpoints the run will add to checkpoint.dir
    (keep_last + 1 at the peak, minus the complete ones already there)."""
    from .checkpoint import list_checkpoints

    root = cfg.checkpoint_dir
    size = checkpoint_bytes(num_params, cfg)
    more = max(0, cfg.checkpoint.keep_last + 1 - len(list_checkpoints(root))) * size
    return check_free_disk(root, more), size


def run_preflight(cfg: PretrainConfig, *, rank: int, world_size: int, num_nodes: int, tokenizer,
                  num_params: int | None = None) -> PreflightReport:
    """Every check of the module docstring for this process; problems and warnings as messages."""
    from ..data import TokenizerMismatchError, check_tokenizer, read_manifest
    from ..data.format import check_shard_files

    report = PreflightReport()

    needed = estimate_open_files(cfg, world_size)
    soft, hard, problem = raise_open_file_limit(needed, cfg.preflight.raise_open_file_limit, world_size)
    report.notes.append(f"open files: limit {soft} (hard {hard}), estimated need {needed}")
    if problem:
        report.problems.append(problem)

    data_dir = Path(cfg.data.dir)
    try:
        manifest = read_manifest(data_dir)
        check_shard_files(data_dir, manifest, checksums=cfg.data.verify_checksums and rank == 0)
        report.manifest = manifest
        shards = len(manifest["shards"])
        if shards == 0:  # a folder from before prepare refused empty input: eval_shards is not the problem
            report.problems.append(
                f"data: {str(data_dir)!r} holds no sequences (its input had no text after cleaning): re-run "
                f"`bigbird-ja prepare` on input with text")
        elif cfg.data.eval_shards >= shards:
            report.problems.append(
                f"data: data.eval_shards={cfg.data.eval_shards} would hold out all {shards} shard(s) of "
                f"{str(data_dir)!r}, leaving none to train on. Lower data.eval_shards (0: no evaluation) or re-run "
                f"prepare with a smaller --shard-tokens")
    except (FileNotFoundError, ValueError) as err:
        report.problems.append(f"data: {err}")
    if tokenizer is not None and report.manifest is not None:
        try:
            check_tokenizer(data_dir, tokenizer)
        except TokenizerMismatchError as err:
            report.problems.append(f"tokenizer: {err}")
    report.problems += check_model_folder_untouched(cfg)
    if tokenizer is not None and cfg.model.init_from:
        problem = check_model_tokenizer(cfg, tokenizer)
        if problem:
            report.problems.append(f"tokenizer: {problem}")

    if cfg.preflight.check_disk and num_params is not None:
        problem, size = check_checkpoint_disk(cfg, num_params)
        report.notes.append(f"disk: one checkpoint is about {size / 2**20:,.0f} MiB")
        if problem:
            report.problems.append(problem)

    if num_params is not None:
        problem = check_offload_host_memory(cfg, world_size, num_nodes, num_params)
        if problem:
            report.problems.append(problem)
    if cfg.zero.offload_optimizer != "none" and num_nodes > 1:
        report.warnings.append(
            f"zero.offload_optimizer={cfg.zero.offload_optimizer!r} on {num_nodes} nodes: CPU offload was a source "
            f"of failures at this scale (host memory, pinned buffers, slow optimizer steps); prefer more GPUs or "
            f"ZeRO-3 without offload")
    return report


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_model_folder_untouched(cfg: PretrainConfig) -> list[str]:
    """What the run would write into the model folder it reads (model.init_from): refused, naming the setting."""
    if not cfg.model.init_from:
        return []
    folder = Path(cfg.model.init_from)
    writes = {"run.output_dir": cfg.run.output_dir, "checkpoint.dir": str(cfg.checkpoint_dir)}
    if not (Path(cfg.data.dir) / "manifest.json").is_file():
        writes["data.dir"] = cfg.data.dir  # still to be prepared
    return [f"{key}={value!r} lies inside model.init_from={str(folder)!r}: a run never writes into the model "
            f"folder it starts from; choose a folder outside it" for key, value in writes.items()
            if _inside(Path(value), folder)]


def check_model_tokenizer(cfg: PretrainConfig, tokenizer) -> str | None:
    """A warm start's data must be the checkpoint's tokenizer's ids: data.tokenizer (the data's, checked against the
    manifest above) and the tokenizer saved in model.init_from must have the same fingerprint. With equal vocabulary
    sizes nothing else would notice: the model would read every id as another token."""
    from ..data.fingerprint import load_tokenizer, tokenizer_fingerprint

    folder = Path(cfg.model.init_from)
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None  # a folder without a tokenizer: the vocabulary-size check of the model config still applies
    if Path(cfg.data.tokenizer).resolve() == folder.resolve():
        return None
    try:
        own = tokenizer_fingerprint(load_tokenizer(folder))
    except (OSError, ValueError) as err:
        return f"the tokenizer saved in model.init_from={str(folder)!r} does not load ({err})"
    data = tokenizer_fingerprint(tokenizer)
    if own == data:
        return None
    return (f"data.tokenizer={cfg.data.tokenizer!r} ({data}) is not the tokenizer of model.init_from={str(folder)!r} "
            f"({own}): the model would read the data's ids as other tokens. Prepare the data with the checkpoint's "
            f"tokenizer (`bigbird-ja prepare --tokenizer {folder} --input ... --out DATA`) and pass "
            f"--data.tokenizer={folder} --data.dir=DATA")


OFFLOAD_BYTES_PER_PARAM = 16  # fp32 master weights + two Adam moments (12 B) + the fp32 gradient buffer (4 B)
OFFLOAD_HOST_SHARE = 0.8  # the rest: the processes themselves, pinned staging buffers, page cache for the shards


def check_offload_host_memory(cfg: PretrainConfig, world_size: int, num_nodes: int, num_params: int,
                              host_bytes: int | None = None) -> str | None:
    """What cannot work with zero.offload_optimizer=cpu: the offloaded optimizer partitions of this node's ranks
    exceed its host memory (``host_bytes``, default: `host_memory_bytes`). The rest was rehearsed on CPU (8 ranks
    over 2 nodes, ZeRO 2 and 3, resumed at 4: benchmarks/bench_scale.py --offload) and runs."""
    if cfg.zero.offload_optimizer == "none":
        return None
    per_node = -(-world_size // max(1, num_nodes))
    need = OFFLOAD_BYTES_PER_PARAM * num_params * per_node // world_size
    have = host_bytes if host_bytes is not None else host_memory_bytes()
    if not have or need <= OFFLOAD_HOST_SHARE * have:
        return None
    return (f"zero.offload_optimizer=cpu: the {per_node} ranks on this node would hold about {need / 2**30:,.1f} GiB "
            f"of optimizer state in host memory ({OFFLOAD_BYTES_PER_PARAM} B per parameter x {num_params:,} "
            f"parameters / {world_size} ranks, each), more than {OFFLOAD_HOST_SHARE:.0%} of its "
            f"{have / 2**30:,.1f} GiB: it would fail at the first optimizer step. Use more nodes, fewer ranks per "
            f"node, or zero.stage=3 without offload (zero.offload_optimizer=none)")


def host_memory_bytes() -> int | None:
    """Physical memory of this node (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_problems(problems_by_rank: dict[int, list[str]]) -> str:
    lines = ["preflight failed:"]
    for rank in sorted(problems_by_rank):
        for problem in problems_by_rank[rank]:
            lines.append(f"  [rank {rank}] {problem}")
    return "\n".join(lines)
