#!/bin/bash
# bigbird-ja pretraining on one machine with torchrun, restarted automatically when a rank dies or hangs.
# Hardware: one node with 8 GPUs (or CPU ranks: GPUS_PER_NODE=2 CONFIG=configs/pretrain/tiny-cpu.yaml rehearses it
# on a laptop, gloo, one thread per rank). Run from the repository root:   bash configs/launch/torchrun-1node.sh
#
# A rank that dies: torchrun stops the others and starts all of them again, up to MAX_RESTARTS times; each attempt
# continues from the newest complete checkpoint (--resume auto). A hung rank: with watchdog.enabled=true (add it
# below, or in the preset) the watchdog ends a step that runs far past its median, which torchrun restarts like a
# death; without it a stopped rank holds the others for distributed.timeout_minutes (30), then they fail and restart.
set -euo pipefail
CONFIG=${CONFIG:-configs/pretrain/base-4096-1node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
. .venv/bin/activate
ulimit -n "$(ulimit -Hn)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store for every attempt: torchrun's shared one keeps the dead attempt's addresses, which a
# restarted rank can read and hang on (the trainer refuses --max-restarts without this).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
torchrun --standalone --nproc-per-node="$GPUS_PER_NODE" --max-restarts="$MAX_RESTARTS" \
  -m bigbird_ja.cli pretrain --config "$CONFIG" --resume auto "$@"
