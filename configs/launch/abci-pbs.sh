#!/bin/bash
# bigbird-ja pretraining on a PBS-style scheduler (ABCI 3.0: PBS Professional, 8 x H200 per rt_HF node): Open MPI
# starts one rank per GPU; the trainer reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} (MPICH / Intel MPI:
# PMI_RANK, PMI_SIZE, MPI_LOCALRANKID) and MASTER_ADDR / MASTER_PORT from here.
# Hardware: 8-GPU A100 / H100 / H200 nodes with InfiniBand; written for configs/pretrain/base-4096-multinode.yaml.
# Submit from the repository root:   qsub -P <group> -l select=32 configs/launch/abci-pbs.sh
#
# Before the first job, once: as in configs/launch/slurm.sbatch (venv with `pip install -e ".[train,triton]"`, no
# DeepSpeed op to build; `bigbird-ja prepare` on CPU nodes; `bigbird-ja pretrain --config ... --dry-run`).
#
#PBS -N bigbird-ja-pretrain
#PBS -q rt_HF
#PBS -l select=32
#PBS -l walltime=24:00:00
#PBS -j oe

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:-configs/pretrain/base-4096-multinode.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
source /etc/profile.d/modules.sh 2>/dev/null && module load cuda hpcx 2>/dev/null || true   # site modules
. .venv/bin/activate

# --- hostfile: PBS_NODEFILE may list a node once per chunk or per CPU; one line per node with its GPU slots ----------
mkdir -p runs
JOB=${PBS_JOBID%%.*}
HOSTFILE=runs/hostfile.$JOB
sort -u "$PBS_NODEFILE" | awk -v n="$GPUS_PER_NODE" '{print $1" slots="n}' > "$HOSTFILE"
NNODES=$(wc -l < "$HOSTFILE")
export MASTER_ADDR=$(head -n1 "$HOSTFILE" | cut -d' ' -f1)
export MASTER_PORT=${MASTER_PORT:-29500}

# --- what kills large jobs (see slurm.sbatch for the reasons) ------------------------------------------------
ulimit -n "$(ulimit -Hn)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TRITON_CACHE_DIR=${PBS_LOCALDIR:-/tmp}/triton-$JOB           # node-local: compiled once per node
export TORCH_EXTENSIONS_DIR=${PBS_LOCALDIR:-/tmp}/torch-ext-$JOB
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
export NCCL_IB_TIMEOUT=22
export NCCL_IB_RETRY_CNT=13
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# The trainer turns torch's flight recorder on (TORCH_FR_BUFFER_SIZE=2000, TORCH_NCCL_DUMP_ON_TIMEOUT=1): on a
# collective timeout every rank dumps its last collectives to <output_dir>/watchdog/ (`torchfrtrace` reads them).

# --- launch: mpirun forwards SIGTERM (PBS sends it at the walltime, before SIGKILL) to every rank: they save and
# exit; resubmitting the same script continues with --resume auto.
# A rank that dies (or that the watchdog ends when it hangs) makes mpirun stop every rank and exit non-zero; mpirun
# has no restart of its own, so the job runs it again, up to MAX_RESTARTS times, each attempt continuing from the
# newest complete checkpoint. A clean exit (done, or saved on SIGTERM at the walltime) ends the loop.
MAX_RESTARTS=${MAX_RESTARTS:-3}
for ATTEMPT in $(seq 0 "$MAX_RESTARTS"); do
  STATUS=0
  mpirun -np $(( NNODES * GPUS_PER_NODE )) --hostfile "$HOSTFILE" --map-by ppr:"$GPUS_PER_NODE":node --bind-to none \
  -x PATH -x LD_LIBRARY_PATH -x VIRTUAL_ENV -x MASTER_ADDR -x MASTER_PORT -x OMP_NUM_THREADS -x TRITON_CACHE_DIR \
  -x TORCH_EXTENSIONS_DIR -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA -x NCCL_IB_TIMEOUT -x NCCL_IB_RETRY_CNT \
  -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x NCCL_DEBUG \
  bash -c 'ulimit -n "$(ulimit -Hn)"; exec python -m bigbird_ja.cli pretrain --config "$0" --resume auto "$@"' \
  "$CONFIG" "$@" || STATUS=$?
  [ "$STATUS" -eq 0 ] && break
  # exit status 2: a stop the trainer explained (config, data, disk full), which a restart would only repeat
  [ "$STATUS" -eq 2 ] && exit 2
  echo "attempt $ATTEMPT failed (exit status $STATUS); restarting from the newest complete checkpoint" >&2
done
exit "$STATUS"

# Alternative, the DeepSpeed launcher over the same hostfile (it runs mpirun for you):
#   deepspeed --hostfile "$HOSTFILE" --launcher openmpi --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
#     --module bigbird_ja.cli pretrain --config "$CONFIG" --resume auto
