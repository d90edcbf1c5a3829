"""Test-only fault injection: make a worker die or get SIGTERM at an exact point of a run.

The fault-tolerance tests (tests/test_fault_tolerance.py) need a worker to fail at a known step,
which killing from outside cannot promise on a busy machine. Nothing happens unless the
environment variable TRAINER_TEST_FAULT is set, as `POINT:STEP:RANK`:

    after_step:3:1   rank 1 SIGKILLs itself right after optimizer step 3 (before any save)
    in_save:4:0      rank 0 SIGKILLs itself while writing step-4: after the data and meta.json
                     are in .step-4.tmp, before the rename to step-4
    sigterm:3:1      rank 1 sends itself SIGTERM after step 3 (as slurm preemption would)
    disk_full:4:0    rank 0's write of step-4 fails with OSError(ENOSPC) after the engine wrote its
                     part into .step-4.tmp (a full disk, without filling one)

With TRAINER_TEST_FAULT_ONCE=PATH the fault fires only if PATH does not exist and creates it
first, so that a restarted job (torchrun --max_restarts) runs through.
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "TRAINER_TEST_FAULT"
ONCE_ENV = "TRAINER_TEST_FAULT_ONCE"
POINTS = ("after_step", "in_save", "sigterm", "disk_full")


def _parse(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    try:
        point, step, rank = spec.split(":")
        if point not in POINTS:
            raise ValueError
        return point, int(step), int(rank)
    except ValueError:
        raise SystemExit(f"{ENV}={spec!r}: expected POINT:STEP:RANK with POINT one of {POINTS}") from None


def inject(point: str, step: int, rank: int) -> None:
    """Fire the configured fault if it is this point, step and rank (no-op otherwise)."""
    fault = _parse(os.environ.get(ENV, ""))
    if fault is None or fault != (point, step, rank):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            with open(once, "x") as f:  # atomic: only the first attempt creates it
                f.write(f"{point}:{step}:{rank}\n")
        except FileExistsError:
            return
    print(f"[{ENV}] {point} at step {step} on rank {rank}", flush=True)
    if point == "disk_full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGKILL)
