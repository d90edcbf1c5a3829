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
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
    --max_restarts="${MAX_RESTARTS:-0}" "$REPO/$LAUNCHER" "$@"
