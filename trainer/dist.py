"""Process-group setup and rank helpers.

Every run initialises a process group, even a single process (world size 1), so that the
sharded engines and `torch.distributed.checkpoint` behave the same at any scale. torchrun
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a plain `python train.py` gets a
one-process group on a free local port.
"""
from __future__ import annotations

import atexit
import datetime
import faulthandler
import gc
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable, NoReturn

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print on rank 0 only, above any open progress bar (tqdm.write clears and redraws it)."""
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a torch.distributed group was set up in this process: its worker threads may outlive it (end_process)
_GROUP_USED = False


def init(device: str = "auto", timeout_minutes: int = 30) -> DistContext:
    """Initialise torch.distributed from the torchrun environment (or a 1-process group)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    bad = [f"{k}={os.environ[k]!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
           if os.environ.get(k) and not os.environ[k].isdigit()]
    if missing or bad:  # a RANK exported by hand (a job script): torch would stop with a KeyError / ValueError
        raise SystemExit(f"RANK={os.environ['RANK']!r} is set, so this process joins a process group, but "
                         + (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set" if missing else
                            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a number")
                         + ": start the processes with torchrun (or launch/torchrun.sh, launch/slurm.sbatch), which "
                           "sets them all, or unset RANK to train in one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    global _GROUP_USED
    _GROUP_USED = True
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        # TRAINER_PG_TIMEOUT_S: the collective timeout in seconds (tests lower it to show that no
        # wait, e.g. for the corpus cache, happens inside a collective)
        timeout = datetime.timedelta(seconds=float(os.environ.get("TRAINER_PG_TIMEOUT_S", 0))
                                     or timeout_minutes * 60)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its TCPStore across --max_restarts attempts and torch adds no
            # per-attempt prefix, so a restarted rank could read the gloo/nccl address of a dead
            # rank of the previous attempt ("Connection refused"): keep the attempts apart.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            kwargs.update(store=dist.PrefixStore(f"trainer/attempt_{restart}", store), rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return DistContext(rank, world, local_rank, dev, backend)


def shutdown() -> None:
    global _GROUP_USED
    if dist.is_initialized():
        _GROUP_USED = True
        dist.destroy_process_group()


def run_process(fn: Callable[[], object]) -> NoReturn:
    """Run a command's `fn` (which calls init ... shutdown) as the whole process, then end it without
    the interpreter's teardown.

    torch's gloo process group outlives `destroy_process_group` whenever DDP or FSDP wrapped a model
    (they keep references in C++), so its worker threads still run while Python finalizes and the C++
    runtime destroys its globals. A worker that drops the last reference to a tensor owned by a Python
    object at that moment needs the GIL, which a finalizing interpreter refuses by ending the thread:
    the process aborts ("terminate called without an active exception", SIGABRT) after all its work is
    done, torchrun reports the run as failed, and a job with --max_restarts starts again. So once `fn`
    returns (or exits), the Python part of the shutdown is done here, in the interpreter's order:
    threading's exit callbacks run and the other non-daemon threads are joined, the atexit handlers
    run (logging, multiprocessing children, trackers), unreachable objects are collected (files they
    hold get closed; not after a process group was used: see `end_process`), the standard streams are flushed; then `os._exit` with the exit code Python
    would have used. Exceptions other than SystemExit and KeyboardInterrupt propagate as usual
    (traceback, exit code 1).

    faulthandler is on for the run: a crash (SIGSEGV, SIGABRT, ...) prints every thread's Python stack.
    """
    faulthandler.enable(all_threads=True)
    try:
        fn()
        code: object = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = 130
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    end_process(code)


def end_process(code: int) -> NoReturn:
    """The Python part of interpreter shutdown, then `os._exit(code)` (see `run_process`)."""
    # what the interpreter does first at exit: threading's exit callbacks (they tell idle
    # concurrent.futures workers, such as torch.compile's compile threads, to stop), then every
    # other non-daemon thread joined
    threading._shutdown()
    atexit._run_exitfuncs()
    # Unreachable objects are collected (files they hold get closed), except after a process group:
    # a DDP/FSDP model left in a reference cycle holds the gloo group, which collecting it destroys, and
    # ~ProcessGroupGloo joins gloo's worker threads while this thread holds the GIL. A worker that is
    # still dropping a finished collective's Python-owned tensors needs the GIL: both wait forever (seen
    # after a 2-process run had exported final/: main thread in gc_collect -> ~Reducer ->
    # ~ProcessGroupGloo -> mutex; worker in ~AsyncWork -> decref_pyobject -> gil_scoped_acquire).
    # os._exit below ends those threads without destroying anything.
    if not (_GROUP_USED or dist.is_initialized()):
        gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written anyway
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "mean", "max", "min"); a no-op on one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()
        else:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the gradient of its own rows.

    The loss on each rank depends on all ranks' rows, so the gradient of a rank's rows is the
    sum of the gradients computed on every rank: all-reduce, then keep the local slice.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N, ...) per rank -> (world * N, ...) with gradients, and the offset of the local rows.

    Every rank must pass the same N (the trainer drops the last incomplete batch).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor, 0
    return _GatherWithGrad.apply(tensor), dist.get_rank() * tensor.shape[0]
