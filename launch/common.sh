# Sourced by torchrun.sh and multinode.sh: repository, interpreter, launcher and process count.
# (slurm.sbatch runs from slurm's copy of the script, so it keeps its own lines.)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-train.py}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
case "$LAUNCHER" in
    train.py|train_zero_one.py|train_zero_two.py) ;;
    *) echo "launch/$(basename "$0"): LAUNCHER must be train.py, train_zero_one.py or train_zero_two.py, got '$LAUNCHER'" >&2
       exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
