#!/usr/bin/env bash
# One node, NPROC_PER_NODE processes (one per GPU; gloo on the CPU).
#
#   NPROC_PER_NODE=8 bash launch/torchrun.sh --model_name hong --corpus_path corpus.dat --checkpoint auto ...
#
# Environment (defaults):
#   NPROC_PER_NODE  processes on this node (number of GPUs, else 1)
#   LAUNCHER        train.py | train_zero_one.py | train_zero_two.py   (train.py)
#   MAX_RESTARTS    torchrun restarts all workers this many times after a failure (0);
#                   pair it with --checkpoint auto so a restart resumes the last checkpoint
#   PYTHON          interpreter (python3)
# Every argument is passed to the launcher; see `python train.py --help`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-train.py}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
case "$LAUNCHER" in
    train.py|train_zero_one.py|train_zero_two.py) ;;
    *) echo "launch/torchrun.sh: LAUNCHER must be train.py, train_zero_one.py or train_zero_two.py, got '$LAUNCHER'" >&2
       exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
    --max_restarts="${MAX_RESTARTS:-0}" "$REPO/$LAUNCHER" "$@"
