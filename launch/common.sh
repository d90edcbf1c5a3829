# Sourced by torchrun.sh and multinode.sh: repository, interpreter, launcher and process count.
# (slurm.sbatch runs from slurm's copy of the script, so it keeps its own lines.)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-train.py}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "launch/$(basename "$0"): PYTHON=$PYTHON: no such command; set PYTHON to the interpreter with torch installed" >&2
    exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if ! NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"; then
        echo "launch/$(basename "$0"): $PYTHON cannot import torch; set PYTHON to the interpreter with torch installed" >&2
        exit 2
    fi
fi
# torchrun answers a bad value with a traceback (or an AssertionError for 0): say what is wrong instead
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ || "$NPROC_PER_NODE" =~ ^(auto|cpu|gpu)$ ]]; then
    echo "launch/$(basename "$0"): NPROC_PER_NODE must be a number of processes >= 1 (or auto, cpu, gpu), got '$NPROC_PER_NODE'" >&2
    exit 2
fi
if ! [[ "${MAX_RESTARTS:-0}" =~ ^[0-9]+$ ]]; then
    echo "launch/$(basename "$0"): MAX_RESTARTS must be a number >= 0, got '$MAX_RESTARTS'" >&2
    exit 2
fi
case "$LAUNCHER" in
    train.py|train_zero_one.py|train_zero_two.py) ;;
    *) echo "launch/$(basename "$0"): LAUNCHER must be train.py, train_zero_one.py or train_zero_two.py, got '$LAUNCHER'" >&2
       exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
