"""Process-group setup for every way a run is started, and the few collectives the loops need.

One entry point, whatever starts it:

* one process (`bigbird-ja pretrain ...`): RANK=0, WORLD_SIZE=1 and a free local port are filled in;
* the `deepspeed` launcher and `torchrun`: they set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT themselves;
* `mpirun` (Open MPI's OMPI_COMM_WORLD_*, MPICH / Intel MPI's PMI_*) and `srun` with one task per device
  (SLURM_PROCID, inside a job step): mapped onto the same variables. MASTER_ADDR / MASTER_PORT must then come from
  the job script (the launch recipes in configs/launch/ set them).

Collectives run on the default group: gloo on CPU, NCCL on CUDA, each bounded by the timeout given to
`init_process_group` (a collective waiting on a dead or stopped rank fails after it instead of hanging). torch's
flight recorder is switched on unless the environment says otherwise (`flight_recorder`): each rank keeps a record
of its recent collectives, dumped when a run hangs, which torch's `torchfrtrace` reads.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def num_nodes(self) -> int:
        return max(1, -(-self.world_size // max(1, self.local_world_size)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_tasks_per_node(value: str) -> int | None:
    """SLURM_TASKS_PER_NODE looks like '8(x4)' or '8,4': the first node's count."""
    head = value.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def fill_env_from_launcher() -> str:
    """Set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (and a local rendezvous for one process).

    Returns who started us: "env" (torchrun / deepspeed launcher), "openmpi", "pmi", "slurm" or "single".
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "env"
    sources = [
        ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ]
    for name, rank, size, local_rank, local_size in sources:
        if rank in env and size in env:
            env["RANK"], env["WORLD_SIZE"] = env[rank], env[size]
            env["LOCAL_RANK"] = env.get(local_rank, "0")
            if local_size in env:
                env["LOCAL_WORLD_SIZE"] = env[local_size]
            _require_master(name)
            return name
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if in_step and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        per_node = _slurm_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""))
        if per_node:
            env["LOCAL_WORLD_SIZE"] = str(per_node)
        _require_master("slurm")
        return "slurm"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def _require_master(launcher: str) -> None:
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"started by {launcher} without {' and '.join(missing)}: export MASTER_ADDR=<first host> "
                           f"and MASTER_PORT=<free port> in the job script (see configs/launch/)")


def import_deepspeed(what: str = "bigbird-ja pretrain"):
    """deepspeed, or an ImportError that says which extra installs it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"{what} needs DeepSpeed ({err}): pip install 'bigbird-ja[train]'") from None
    return deepspeed


def no_jit_ops_on_cpu() -> None:
    """On the CPU accelerator DeepSpeed builds a shared-memory all-reduce op (C++, about a minute, into a shared
    cache) when the process group starts. Training never uses it (it serves inference_all_reduce), so unless it was
    installed prebuilt it is marked incompatible, which DeepSpeed honours by not loading it."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    if not installed_ops.get("deepspeed_shm_comm", False):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def flight_recorder(dump_dir: Path | None) -> None:
    """torch's flight recorder, unless the environment already chose: each rank keeps its last 2,000 collectives
    (gloo and NCCL: which op, sizes, state, Python stack). NCCL ranks dump them on a collective timeout to
    <dump_dir>/nccl_trace_rank_<R>; the watchdog (`bigbird_ja.training.watchdog`) dumps them when it ends a hung
    run, on either backend. `torchfrtrace <dump_dir>` (installed with torch) lines the ranks' records up and names
    the first collective they disagree on. Must be set before the process group starts."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if dump_dir is not None:
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(Path(dump_dir) / "nccl_trace_rank_"))


def check_elastic_restarts(environ=os.environ) -> None:
    """Refuse torchrun --max-restarts with its shared rendezvous store. torchrun keeps one TCP store for all
    attempts (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) and the process group's keys in it carry no attempt: a
    restarted rank can read the dead attempt's addresses and fail or hang in init_process_group (seen here: 2 of 3
    restarts on a loaded machine). With the variable set, each attempt gets a fresh store."""
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError(f"torchrun --max-restarts={restarts} with its shared rendezvous store: a restarted attempt "
                         f"can find the dead attempt's addresses there and hang at start. Export "
                         f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (configs/launch/ recipes do)")


def init_process_group(cuda: bool, timeout: timedelta | None = None, trace_dir: Path | None = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA) and describe this process.

    timeout: how long every collective waits for the other ranks (None: DeepSpeed's default, 10 minutes or
    $DEEPSPEED_TIMEOUT). trace_dir: where NCCL's flight recorder dumps on a timeout (`flight_recorder`).
    On CUDA this process takes the device of its local rank, read after the launcher's variables are mapped (mpirun
    and srun name the local rank only in their own variables); on CPU DeepSpeed's shared-memory op is switched off
    first (`no_jit_ops_on_cpu`)."""
    import deepspeed

    launcher = fill_env_from_launcher()
    check_elastic_restarts()
    if cuda:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        no_jit_ops_on_cpu()
    flight_recorder(trace_dir)
    backend = "nccl" if cuda else "gloo"
    options = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **options)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local_world < 1:
        local_world = world if launcher == "single" else max(1, _count_local(world))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   backend=backend)


def _count_local(world: int) -> int:
    """Processes on this host, by exchanging host names (when no launcher told us)."""
    import torch.distributed as dist

    names = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    return names.count(socket.gethostname())


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the started process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(problems: list[str]) -> dict[int, list[str]]:
    """Every rank's problems, on every rank: all ranks stop together when any has one."""
    gathered = all_gather_object(list(problems))
    return {rank: p for rank, p in enumerate(gathered) if p}


def any_rank_flags(flags: list[bool], device) -> list[bool]:
    """Each flag True on every rank if it is True on any: several questions in one small all-reduce."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]
