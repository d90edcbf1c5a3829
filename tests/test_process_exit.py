"""How a launcher's process ends (trainer.dist.run_process): exit codes, exit handlers, and no
abort when gloo's worker threads still run Python while the process ends."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.trainer_util import REPO

ENDINGS = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from trainer import dist

    out = Path(sys.argv[2])

    def fn():
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        # a non-daemon thread still working when fn returns: joined before the exit handlers
        threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
        # an idle executor left running (torch.compile leaves one): its non-daemon workers stop at exit
        from concurrent.futures import ThreadPoolExecutor
        global pool
        pool = ThreadPoolExecutor(2)
        pool.submit(lambda: (out / "pool").write_text("done"))
        how = sys.argv[1]
        if how == "message":
            raise SystemExit("bad flag: pick another")
        if how == "code":
            sys.exit(3)
        if how == "error":
            raise ValueError("boom")
        print("returned", flush=True)

    dist.run_process(fn)
""")


@pytest.mark.parametrize("how,code,stderr", [("return", 0, ""), ("message", 1, "bad flag: pick another"),
                                             ("code", 3, ""), ("error", 1, "ValueError: boom")])
def test_exit_code_and_handlers(tmp_path, how, code, stderr):
    script = tmp_path / "endings.py"
    script.write_text(ENDINGS)
    proc = subprocess.run([sys.executable, str(script), how, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert proc.returncode == code, proc.stderr
    assert stderr in proc.stderr
    assert ("returned" in proc.stdout) == (how == "return")  # stdout flushed before os._exit
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "pool").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


# Two gloo processes; DDP keeps the group (and gloo's worker threads) alive past destroy_process_group,
# as in every training run. Rank 0's all_reduce completes two seconds late, on gloo's worker thread,
# which then runs a Python callback (it needs the GIL) while rank 0 is ending:
# - "python": a plain interpreter exit, rank 0 still finalizing (a finalizer that takes 5 s): the
#   finalizing interpreter ends the worker thread inside C++ code, and the process aborts
#   ("terminate called without an active exception"), the rare failure CI saw after training ended;
# - "run_process": rank 0 ends through trainer.dist.run_process, whose exit handler (5 s) runs while
#   the interpreter is whole: the callback runs, the process exits 0.
LATE_CALLBACK = textwrap.dedent("""
    import atexit, os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from trainer import dist as tdist

    out = Path(sys.argv[2])

    def fn():
        dist.init_process_group("gloo")
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
        rank = dist.get_rank()
        if rank == 1:
            time.sleep(2.0)
        elif sys.argv[1] == "run_process":
            atexit.register(time.sleep, 5.0)
        fut = dist.all_reduce(torch.ones(1000), async_op=True).get_future()
        fut = fut.then(lambda f: (out / f"callback{rank}").write_text("ran"))
        if rank == 1:
            fut.wait()
        dist.destroy_process_group()

    class SlowFinalizer:
        def __del__(self, sleep=time.sleep):
            sleep(5.0)

    if sys.argv[1] == "run_process":
        tdist.run_process(fn)
    fn()
    slow = SlowFinalizer()
""")


def _two_processes(tmp_path, how):
    script = tmp_path / "late_callback.py"
    script.write_text(LATE_CALLBACK)
    from trainer.dist import _free_port

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), how, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(r),
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    return [(p.wait(timeout=120), p.communicate()[1]) for p in procs]


@pytest.mark.slow  # torch's failure, not ours (the next test is our fix)
def test_plain_exit_aborts_when_gloo_runs_python_late(tmp_path):
    """The failure itself, reproduced (if torch ever fixes it, this test says so)."""
    (code0, err0), _ = _two_processes(tmp_path, "python")  # rank 1 (finalizing too) may abort as well
    assert code0 == -6 and "terminate called without an active exception" in err0, (code0, err0[-2000:])
    assert not (tmp_path / "callback0").exists()


def test_run_process_exits_cleanly_when_gloo_runs_python_late(tmp_path):
    (code0, err0), (code1, err1) = _two_processes(tmp_path, "run_process")
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    assert "terminate called" not in err0 + err1
    assert (tmp_path / "callback0").read_text() == "ran"  # ran on gloo's thread while rank 0 was ending
    assert (tmp_path / "callback1").read_text() == "ran"


CYCLE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from trainer import dist

    out = Path(sys.argv[2])

    class Held:  # stands for a DDP model left in a reference cycle, holding the process group
        def __init__(self):
            self.me = self
        def __del__(self):
            (out / "collected").write_text("yes")

    def fn():
        if sys.argv[1] == "group":
            dist.init(device="cpu")
            dist.shutdown()
        Held()

    dist.run_process(fn)
""")


@pytest.mark.parametrize("group", [False, True])
def test_no_garbage_collection_at_exit_after_a_process_group(tmp_path, group):
    """run_process collects unreachable objects at exit, except once a process group was used: collecting a
    cycle that holds the gloo group destroys it while this thread holds the GIL, and its worker threads may
    still need the GIL (a finished 2-process run once hung there). os._exit ends them instead."""
    script = tmp_path / "cycle.py"
    script.write_text(CYCLE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), "group" if group else "plain", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(env, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "collected").exists() is not group
