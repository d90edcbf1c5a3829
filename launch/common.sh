# Sourced by the launch scripts: repository, interpreter, launcher and process count checked, and
# check_port_free. slurm.sbatch runs from slurm's copy of the script, so it sources
# $REPO/launch/common.sh and sets SCRIPT_NAME (the name its messages start with).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT_NAME="${SCRIPT_NAME:-launch/$(basename "$0")}"
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-train.py}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "$SCRIPT_NAME: PYTHON=$PYTHON: no such command; set PYTHON to the interpreter with torch installed" >&2
    exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if ! NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"; then
        echo "$SCRIPT_NAME: $PYTHON cannot import torch; set PYTHON to the interpreter with torch installed" >&2
        exit 2
    fi
fi
# torchrun answers a bad value with a traceback (or an AssertionError for 0): say what is wrong instead
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ || "$NPROC_PER_NODE" =~ ^(auto|cpu|gpu)$ ]]; then
    echo "$SCRIPT_NAME: NPROC_PER_NODE must be a number of processes >= 1 (or auto, cpu, gpu), got '$NPROC_PER_NODE'" >&2
    exit 2
fi
if ! [[ "${MAX_RESTARTS:-0}" =~ ^[0-9]+$ ]]; then
    echo "$SCRIPT_NAME: MAX_RESTARTS must be a number >= 0, got '$MAX_RESTARTS'" >&2
    exit 2
fi
case "$LAUNCHER" in
    train.py|train_zero_one.py|train_zero_two.py) ;;
    *) echo "$SCRIPT_NAME: LAUNCHER must be train.py, train_zero_one.py or train_zero_two.py, got '$LAUNCHER'" >&2
       exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# check_port_free HOST PORT VARIABLE: when HOST is this machine, stop (exit 2) if another program
# already listens on PORT. torch's rendezvous would take that program for its own store and wait,
# silently, until its timeout (c10d: minutes), or die with an EADDRINUSE traceback (env://).
check_port_free() {
    local code=0
    "$PYTHON" - "$1" "$2" <<'PY' || code=$?
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    addr = socket.gethostbyname(host)
    with socket.socket() as s:
        s.bind((addr, 0))  # fails unless addr is an address of this machine
except OSError:
    sys.exit(0)  # another machine (or unresolvable): nothing to check here
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no conflict
    try:
        s.bind(("", port))
    except OSError as e:
        sys.exit(3 if e.errno == errno.EADDRINUSE else 0)
PY
    if [[ "$code" == 3 ]]; then
        echo "$SCRIPT_NAME: port $2 ($3) is already in use on $1 (this machine), by another program or an earlier" \
             "job still running (\`ss -ltnp 'sport = :$2'\` names it); the rendezvous would wait for it until its timeout." \
             "Set $3 to a free port (the same on every node), or stop that program" >&2
        exit 2
    fi
}
