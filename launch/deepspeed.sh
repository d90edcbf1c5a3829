#!/usr/bin/env bash
# One node, --engine deepspeed, under DeepSpeed's own launcher (default) or torchrun.
#
#   NPROC_PER_NODE=8 LAUNCHER=train_zero_two.py bash launch/deepspeed.sh --model_name hong \
#       --corpus_path corpus.dat --zero3 --deepspeed_config configs/deepspeed/zero3.json ...
#   RUNNER=torchrun NPROC_PER_NODE=2 LAUNCHER=train_zero_one.py bash launch/deepspeed.sh ...   # CPU: gloo
#
# The ZeRO stage comes from the launcher: train.py = 0, train_zero_one.py = 1,
# train_zero_two.py = 2, train_zero_two.py --zero3 = 3. `--engine deepspeed` is added.
#
# Environment (defaults):
#   RUNNER          deepspeed | torchrun   (deepspeed when the `deepspeed` command exists)
#   NPROC_PER_NODE  processes on this node (number of GPUs, else 2 on the CPU)
#   LAUNCHER        train.py | train_zero_one.py | train_zero_two.py   (train_zero_two.py)
#   DS_ACCELERATOR  cpu without GPUs (set automatically)
#   PYTHON          interpreter (python3)
# Every argument is passed to the launcher; see `python train.py --help` and docs/engines.md.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-train_zero_two.py}"  # (common.sh checks it)
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$GPUS" == "0" ]]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
else
    NPROC_PER_NODE="${NPROC_PER_NODE:-$GPUS}"
fi
source "$REPO/launch/common.sh"  # checks PYTHON, NPROC_PER_NODE, LAUNCHER, sets OMP_NUM_THREADS; check_port_free
if [[ -z "${RUNNER:-}" ]]; then
    if command -v deepspeed >/dev/null 2>&1; then RUNNER=deepspeed; else RUNNER=torchrun; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$RUNNER" in
    deepspeed)
        if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
            echo "launch/deepspeed.sh: the deepspeed runner takes a number of processes (--num_gpus), got" \
                 "NPROC_PER_NODE=$NPROC_PER_NODE; set NPROC_PER_NODE=N, or RUNNER=torchrun (it takes auto, cpu, gpu)" >&2
            exit 2
        fi
        MASTER_PORT="${MASTER_PORT:-29500}"
        check_port_free 127.0.0.1 "$MASTER_PORT" MASTER_PORT
        # --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank flag
        exec deepspeed --no_local_rank --num_gpus "$NPROC_PER_NODE" --master_port "$MASTER_PORT" \
            "$REPO/$LAUNCHER" --engine deepspeed "$@" ;;
    torchrun)
        exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
            "$REPO/$LAUNCHER" --engine deepspeed "$@" ;;
    *) echo "launch/deepspeed.sh: RUNNER must be deepspeed or torchrun, got '$RUNNER'" >&2; exit 2 ;;
esac
