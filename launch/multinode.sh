#!/usr/bin/env bash
# Several nodes: run this once on every node (one torchrun agent per node); the agents meet
# through torchrun's c10d rendezvous at RDZV_ENDPOINT and number the processes themselves.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/multinode.sh --model_name hong ...
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/multinode.sh --model_name hong ...
#
# Environment (defaults):
#   NNODES          number of nodes (required, e.g. 2; "MIN:MAX" for elastic)
#   NODE_RANK       this node's index, 0..NNODES-1 (informational for c10d, which assigns ranks; 0)
#   MASTER_ADDR     host of the rendezvous store (127.0.0.1); MASTER_PORT (29500)
#   RDZV_ENDPOINT   host:port, overrides MASTER_ADDR:MASTER_PORT
#   RDZV_ID         job id shared by all agents (ko-encoder)
#   NPROC_PER_NODE  processes per node (number of GPUs, else 1)
#   LAUNCHER        train.py | train_zero_one.py | train_zero_two.py   (train.py)
#   MAX_RESTARTS    restarts of the whole job after a failure (0); use with --checkpoint auto
#   PYTHON          interpreter (python3)
# Every argument is passed to the launcher.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${NNODES:?set NNODES to the number of nodes (the same value on every node)}"
if ! [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    echo "$SCRIPT_NAME: NNODES must be a number of nodes >= 1, or MIN:MAX for an elastic job, got '$NNODES'" >&2
    exit 2
fi
NODE_RANK="${NODE_RANK:-0}"
PORT_VAR="$([[ -n "${RDZV_ENDPOINT:-}" ]] && echo RDZV_ENDPOINT || echo MASTER_PORT)"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}"
# node 0 normally hosts the rendezvous store: a port held by another program would make every agent wait silently
if [[ "$NODE_RANK" == 0 && "$RDZV_ENDPOINT" =~ ^(.+):([0-9]+)$ ]]; then
    check_port_free "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$PORT_VAR"
fi
# --node_rank is not used by c10d (it assigns ranks in arrival order); the rendezvous host is
# preferred for global rank 0 when its hostname matches RDZV_ENDPOINT.
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-ko-encoder}" \
    --max_restarts="${MAX_RESTARTS:-0}" "$REPO/$LAUNCHER" "$@"
