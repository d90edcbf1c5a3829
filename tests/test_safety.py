"""Nothing a user types destroys their work (docs/operations.md, "Safety of user files"):
export never replaces what it did not write, resuming an older step keeps the newer checkpoints,
one run at a time owns a run directory, a full disk during a save keeps the last checkpoint,
Ctrl-C saves like SIGTERM, and failed runs leave no leftovers. Each case hashes the earlier
files before and after (tree_digest)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch_util import train_args, tree_digest
from tests.test_bad_input import DIST_ENV, _with
from tests.trainer_util import REPO, read_tsv, write_config
from trainer import safety


def _main(argv: list[str], monkeypatch, capsys, env: dict[str, str] | None = None,
          cwd: Path | None = None, stage: int = 0) -> tuple[int, str]:
    """trainer.loop.main(stage) in this process (in `cwd` when given; stage: the launcher's ZeRO stage,
    train.py 0, train_zero_one.py 1, train_zero_two.py 2): (exit code, 0 when it returned; stdout + stderr)."""
    from trainer.loop import main

    for name in DIST_ENV:  # setenv first: monkeypatch then also removes what dist.init sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    try:
        main(stage, argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    assert not torch.distributed.is_initialized()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def prev(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    """An earlier 6-step run: step-2, step-4, step-6, final/, loss.tsv, TensorBoard logs."""
    from trainer.loop import main

    root = tmp_path_factory.mktemp("safety")
    cfg = write_config(root / "tiny.json")
    with pytest.MonkeyPatch.context() as mp:
        for name in DIST_ENV:
            mp.setenv(name, "")
            mp.delenv(name)
        main(0, train_args(tiny_corpus, tiny_tokenizer_dir, cfg, root / "out", "prev"))
    return {"root": root, "cfg": cfg, "run": root / "out" / "prev", "corpus": tiny_corpus,
            "tokenizer": tiny_tokenizer_dir}


def _copy(prev, tmp_path: Path, name: str = "run") -> tuple[Path, list[str]]:
    """A copy of the earlier run under tmp_path/out/name, and the arguments that continue it."""
    run = tmp_path / "out" / name
    shutil.copytree(prev["run"], run)
    return run, train_args(prev["corpus"], prev["tokenizer"], prev["cfg"], tmp_path / "out", name)


# --- export -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_area(prev, tmp_path_factory):
    """A copy of the run, a user's folder, a file, an earlier export holding a user's file too,
    and a model folder holding the export source (the refusals below change none of them)."""
    from trainer.export import export

    tmp_path = tmp_path_factory.mktemp("export_area")
    run, _ = _copy(prev, tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    export(prev["run"] / "final", tmp_path / "hf_extra")
    (tmp_path / "hf_extra" / "mine.txt").write_text("added by the user")
    shutil.copytree(prev["run"] / "final", tmp_path / "models" / "final")
    return {"tmp": tmp_path, "run": run, "src": prev["run"] / "final"}


EXPORT_REFUSALS = [
    ("run_directory", "{run}/final", "{run}", [], "{run} is a training run directory (loss.tsv, step-2/, step-4/, step-6/, tensorboard/); it is never replaced, not even with --overwrite"),
    ("run_directory_with_overwrite", "{src}", "{run}", ["--overwrite"], "is a training run directory"),
    ("holds_a_run_directory", "{src}", "{tmp}/out", ["--overwrite"], "{tmp}/out holds {run}, which is a training run directory"),
    ("holds_the_source", "{tmp}/models/final", "{tmp}/models", ["--overwrite"], "{tmp}/models holds the source {tmp}/models/final"),
    ("foreign_folder", "{src}", "{tmp}/user", [], "{tmp}/user already exists and holds 1 file(s) not written by us (notes.txt); pick a new or empty folder, or pass --overwrite"),
    ("a_file", "{src}", "{tmp}/user/notes.txt", ["--overwrite"], "{tmp}/user/notes.txt exists and is a file, not a folder"),
    ("over_the_runs_final", "{run}/step-6", "{run}/final", [], "{run}/final is the model exported by the training run "
     "{run}; it is never replaced by an export, not even with --overwrite: pick another output folder, e.g. {run}/hf"),
    ("over_a_checkpoint", "{src}", "{run}/step-4", ["--overwrite"], "{run}/step-4 is a checkpoint of the training run {run}"),
    ("earlier_export_with_user_file", "{src}", "{tmp}/hf_extra", [], "{tmp}/hf_extra is an earlier export but also holds files it did not write (mine.txt)"),
]


@pytest.mark.parametrize("case,src,out,flags,message", EXPORT_REFUSALS, ids=[c[0] for c in EXPORT_REFUSALS])
def test_export_refuses_what_it_did_not_write(export_area, capsys, case, src, out, flags, message):
    from trainer.export import main as export_main

    fmt = {k: export_area[k] for k in ("tmp", "run", "src")}
    before = tree_digest(export_area["tmp"])
    with pytest.raises(SystemExit) as exc:
        export_main([src.format(**fmt), out.format(**fmt), *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert message.format(**fmt) in err, err
    assert "Traceback" not in err
    assert tree_digest(export_area["tmp"]) == before, "a refused export changed files"
    assert not list(export_area["tmp"].rglob(".*.tmp"))


def test_export_replaces_only_its_own_output_or_with_overwrite(prev, tmp_path):
    from trainer.export import export

    tmp, src = tmp_path, prev["run"] / "final"
    (tmp / "user").mkdir()
    (tmp / "user" / "notes.txt").write_text("my notes")
    first = export(src, tmp / "hf")
    assert (tmp / "hf" / safety.MARKER).is_file() and safety.MARKER not in first["files"]
    digest = tree_digest(tmp / "hf")
    export(src, tmp / "hf")  # an earlier export of ours: replaced by the same files
    assert tree_digest(tmp / "hf") == digest
    export(src, tmp / "user", overwrite=True)
    assert not (tmp / "user" / "notes.txt").exists() and (tmp / "user" / "model.safetensors").is_file()


def test_failed_export_leaves_no_tmp_and_keeps_the_earlier_export(prev, tmp_path, monkeypatch):
    from trainer import export as export_mod

    tmp, src = tmp_path, prev["run"] / "final"
    export_mod.export(src, tmp / "hf")
    before = tree_digest(tmp / "hf")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "_write_hf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_mod.export(src, tmp / "hf")
    with pytest.raises(OSError, match="No space left"):
        export_mod.export(src, tmp / "new" / "deeper" / "hf")
    assert tree_digest(tmp / "hf") == before
    assert not (tmp / ".hf.tmp").exists() and not (tmp / "new").exists()


# --- resuming -----------------------------------------------------------------------------
def test_resume_older_step_moves_newer_checkpoints_aside(prev, tmp_path, monkeypatch, capsys):
    """--checkpoint step-2 --num_steps 4 while step-4, step-6 and final/ exist: they are moved,
    byte-identical, to superseded-after-step-2/ (with loss.tsv as it was) and the run goes on.
    It also reads a copy of the corpus under another name: resuming on other data warns."""
    run, args = _copy(prev, tmp_path)
    moved = {name: tree_digest(run / name) for name in ("step-4", "step-6", "final")}
    tsv = (run / "loss.tsv").read_bytes()
    other = tmp_path / "other.dat"
    shutil.copy2(prev["corpus"], other)
    code, out = _main(_with(args, checkpoint=str(run / "step-2"), num_steps="4", corpus_path=str(other), seed="7"),
                  monkeypatch, capsys)
    assert code == 0, out[-3000:]
    aside = run / "superseded-after-step-2"
    assert f"moved step-4, step-6, final (and a copy of loss.tsv) to {aside}" in out
    assert {name: tree_digest(aside / name) for name in moved} == moved
    assert (aside / "loss.tsv").read_bytes() == tsv
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-4"]
    assert [int(r["step"]) for r in read_tsv(run / "loss.tsv")] == [1, 2, 3, 4]
    assert f"was trained on other data (--corpus_path {prev['corpus']} -> {other})" in out
    assert "not the continuation of the original run" in out
    assert (f"[checkpoint] warning: resuming {run / 'step-2'} with other data settings (--seed 42 -> 7): the samples "
            f"from here differ from those the original run would have drawn") in out


def _tb_steps(run: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_keeps_the_checkpoint_step_in_tensorboard(prev, tmp_path, monkeypatch, capsys):
    """Resuming step-4 redoes steps 5..6: TensorBoard shows steps 1..6 once, step 4 included (a
    purge at the checkpoint's own step hid its scalars and the validation logged with it).
    loss.tsv ends in zeros, as a power loss can leave a file: those rows are dropped."""
    run, args = _copy(prev, tmp_path)
    assert _tb_steps(run) == [1, 2, 3, 4, 5, 6]
    with open(run / "loss.tsv", "ab") as f:
        f.write(b"\0" * 300)
    code, out = _main(_with(args, checkpoint=str(run / "step-4")), monkeypatch, capsys)
    assert code == 0, out[-3000:]
    assert _tb_steps(run) == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in read_tsv(run / "loss.tsv")] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_over_a_finished_run_without_checkpoints_is_refused(prev, tmp_path, monkeypatch, capsys):
    """The user deleted step-N to save space and kept final/: the same command again (or a start from
    that final/ under the same --model_name) would train afresh and replace the model. Refused,
    nothing changed; the message names the ways on."""
    run, args = _copy(prev, tmp_path)
    for p in run.glob("step-*"):
        shutil.rmtree(p)
    before = tree_digest(tmp_path)
    for extra in ({}, {"checkpoint": str(run / "final")}, {"checkpoint": "auto"}):
        code, out = _main(_with(args, **extra), monkeypatch, capsys)
        assert code == 1, out[-3000:]
        assert (f"{run / 'final'} holds the model of an earlier run (step 6), and this run starts afresh (no step-N "
                f"checkpoint of {run} is left to resume), so it would replace that model; to train anew pick another "
                f"--model_name or --output_dir") in out, out[-3000:]
        assert f"pass --checkpoint {run / 'final'} with another --model_name than run" in out
        assert tree_digest(tmp_path) == before


def test_fresh_run_over_the_logs_of_a_run_that_saved_nothing_moves_them_aside(prev, tmp_path, monkeypatch, capsys):
    """A run that crashed before its first checkpoint left loss.tsv and TensorBoard logs: the same
    command starts afresh, and those logs move byte-identical to earlier-run/ instead of being
    rewritten (loss.tsv) or mixed into the new run's curves (TensorBoard)."""
    run, args = _copy(prev, tmp_path)
    for p in [*run.glob("step-*"), run / "final"]:
        shutil.rmtree(p)
    logs = {"loss.tsv": (run / "loss.tsv").read_bytes(), "tensorboard": tree_digest(run / "tensorboard")}
    code, out = _main(_with(args, num_steps="2"), monkeypatch, capsys)
    assert code == 0, out[-3000:]
    aside = run / "earlier-run"
    assert (f"[train] {run} held the logs of an earlier run that left no checkpoint to resume; moved them to "
            f"{aside}") in out
    assert {"loss.tsv": (aside / "loss.tsv").read_bytes(), "tensorboard": tree_digest(aside / "tensorboard")} == logs
    assert [int(r["step"]) for r in read_tsv(run / "loss.tsv")] == [1, 2]
    assert _tb_steps(run) == [1, 2]


REFUSALS = [
    ("num_steps_below_checkpoint", {"checkpoint": "auto", "num_steps": "4"},
     "--checkpoint {run}/step-6 is at step 6, past --num_steps 4: there is nothing to train. --num_steps is "
     "the total, not the steps to add: pass --num_steps 6 or more"),
    ("weights_only_over_a_run", {"checkpoint": "{run}/final", "num_steps": "8"},
     "{run} already holds checkpoints (step-6 is the latest) and would be overwritten by a run starting from "
     "--checkpoint {run}/final/model.safetensors (weights only)"),
    ("model_name_absolute", {"model_name": "/tmp/elsewhere"}, "--model_name '/tmp/elsewhere': must be a plain folder name"),
    ("model_name_parent", {"model_name": ".."}, "--model_name '..': must be a plain folder name"),
    ("model_name_empty", {"model_name": ""}, "--model_name '': must be a plain folder name"),
    ("model_name_separator", {"model_name": "a/../../b"}, "--model_name 'a/../../b': must be a plain folder name"),
]


@pytest.mark.parametrize("case,flags,message", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refused_before_any_work(prev, tmp_path, monkeypatch, capsys, case, flags, message):
    run, args = _copy(prev, tmp_path)
    flags = {k: v.format(run=run) for k, v in flags.items()}
    if "model_name" in flags:  # set in place: _with drops the value of an empty flag
        args[args.index("--model_name") + 1] = flags.pop("model_name")
    before = tree_digest(tmp_path)
    code, out = _main(_with(args, **flags), monkeypatch, capsys)
    assert code not in (0, None)
    assert message.format(run=run) in out, out[-3000:]
    assert "Traceback" not in out
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]


def test_early_crash_leaves_no_run_directory(prev, tmp_path, monkeypatch, capsys):
    """Bad input found after the run directory was locked (the batch is larger than the data):
    the run directory and the output folders it created are removed again."""
    args = train_args(prev["corpus"], prev["tokenizer"], prev["cfg"], tmp_path / "new" / "out", "fresh",
                      "--train_batch_size", "5000")
    code, out = _main(args, monkeypatch, capsys)
    assert code == 1 and "fewer than one global batch" in out, out[-2000:]
    assert list(tmp_path.iterdir()) == []


# --- full disk ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["hook", "dcp_write"])
def test_full_disk_during_save_keeps_the_last_checkpoint(prev, tmp_path, monkeypatch, capsys, where):
    """The write of step-8 fails with ENOSPC, after the model state is in .step-8.tmp (the test
    hook) or inside torch.distributed.checkpoint's file writer (which wraps it in a
    CheckpointException): the partial copy is removed, the earlier checkpoints and final/ stay
    byte-identical, the message gives the free and the needed MB."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_fs

    run, args = _copy(prev, tmp_path)
    kept = {name: tree_digest(run / name) for name in ("step-2", "step-4", "step-6", "final")}
    env = {"TRAINER_TEST_FAULT": "disk_full:8:0"} if where == "hook" else {}
    if where == "dcp_write":
        write = dcp_fs._write_item

        def full_after_step_7(*a, **kw):
            if (run / ".step-8.tmp").exists():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(*a, **kw)

        monkeypatch.setattr(dcp_fs, "_write_item", full_after_step_7)
    code, out = _main(_with(args, checkpoint="auto", num_steps="10"), monkeypatch, capsys, env=env)
    assert code == 1, out[-3000:]
    size = safety.tree_mb(run / "step-6")
    assert (f"could not write checkpoint step-8 in {run} (No space left on device); removed the partial "
            f".step-8.tmp, kept {run / 'step-6'}, the latest complete checkpoint. The file system there has ") in out
    assert f"MB free; one checkpoint of this run needs about {size:.1f} MB (the size of step-6)" in out
    assert "Traceback" not in out
    assert {name: tree_digest(run / name) for name in kept} == kept
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".step", "step"))) == ["step-2", "step-4", "step-6"]
    assert not (run / safety.LOCK).exists()


# --- one run per run directory -----------------------------------------------------------
HOLD = """
import sys, time
from trainer.safety import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_run_lock_refuses_a_live_holder_and_recovers_a_dead_ones(tmp_path):
    rd = tmp_path / "out" / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(rd)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(safety.RunLocked) as exc:
            safety.RunLock(rd).acquire()
        assert f"{rd} is in use by another training run (pid {holder.pid} on host {socket.gethostname()}" in str(exc.value)
        assert "pick another --model_name" in str(exc.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = safety.RunLock(rd)
    lock.acquire()  # the kernel released the dead holder's lock; its file (with its pid) is still there
    assert json.loads((rd / safety.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (rd / safety.LOCK).exists() and rd.is_dir()  # rd existed before this lock: kept


def _start_long_run(prev, tmp_path: Path, name: str, **extra: str) -> tuple[subprocess.Popen, Path]:
    """A long train.py run in its own session (so killpg reaches its DataLoader workers, as a
    terminal's Ctrl-C does); stderr goes to a file that the test can read while it runs."""
    args = _with(train_args(prev["corpus"], prev["tokenizer"], prev["cfg"], tmp_path / "out", name),
                 num_steps="100000", scheduler_num_steps="100000", save_steps="0", num_workers="1", **extra)
    err = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                                     PYTHONPATH=str(REPO)))
    return proc, tmp_path / "out" / name


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _group_gone(pgid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_second_run_refused_then_ctrl_c_saves_and_exits_130(prev, tmp_path, monkeypatch, capsys):
    """Run A trains (--num_workers 1); run B with the same --model_name stops at once naming A;
    Ctrl-C (SIGINT to A's process group, DataLoader worker included) saves the current step,
    exits 130 and leaves no process behind."""
    proc, rd = _start_long_run(prev, tmp_path, "shared")
    try:
        _wait_for(lambda: (rd / "loss.tsv").is_file() and len(read_tsv(rd / "loss.tsv")) >= 2, proc)
        code, out = _main(train_args(prev["corpus"], prev["tokenizer"], prev["cfg"], tmp_path / "out", "shared"),
                          monkeypatch, capsys)
        assert code == 1 and f"{rd} is in use by another training run (pid {proc.pid} on host" in out, out[-2000:]
        assert "Traceback" not in out
        assert json.loads((rd / safety.LOCK).read_text())["pid"] == proc.pid  # B left A's lock alone
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "shared.err").read_text()
    last = int(read_tsv(rd / "loss.tsv")[-1]["step"])
    assert proc.returncode == 130, err[-3000:]
    assert f"SIGINT at step {last}: saved checkpoint {rd / f'step-{last}'}; resume with --checkpoint auto" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in rd.glob("step-*")) == [f"step-{last}"]
    assert not (rd / safety.LOCK).exists()
    assert _group_gone(proc.pid), "a DataLoader worker outlived its training process"


def test_second_ctrl_c_exits_at_once(prev, tmp_path):
    """A slow step (50 micro-batches): the first Ctrl-C asks for a save at the step's end, the
    second one exits 130 at once without saving."""
    proc, rd = _start_long_run(prev, tmp_path, "twice", gradient_accumulation_steps="50")
    err_file = tmp_path / "twice.err"
    try:
        _wait_for(lambda: (rd / "loss.tsv").is_file() and len(read_tsv(rd / "loss.tsv")) >= 1, proc)
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(lambda: "SIGINT: saving a checkpoint at the end of this step" in err_file.read_text(), proc, 30)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = err_file.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "second SIGINT: exiting now without saving" in err and "Traceback" not in err
    assert took < 10, took
    assert not list(rd.glob("step-*")) and not list(rd.glob(".step-*"))
    assert _group_gone(proc.pid)


def test_full_disk_on_one_rank_stops_both(prev, tmp_path):
    """2 processes, only rank 1's part of step-4 fails: both ranks learn it in the save (no hang),
    rank 0 removes .step-4.tmp and names rank 1's error; step-2 stays."""
    from tests.trainer_util import launch

    args = train_args(prev["corpus"], prev["tokenizer"], prev["cfg"], tmp_path / "out", "two")
    proc = launch("train.py", args, nproc=2, check=False, env={"TRAINER_TEST_FAULT": "disk_full:4:1"}, timeout=240)
    rd = tmp_path / "out" / "two"
    assert proc.returncode != 0
    assert (f"could not write checkpoint step-4 in {rd} (rank 1: No space left on device); removed the partial "
            f".step-4.tmp, kept {rd / 'step-2'}") in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in rd.iterdir() if "step" in p.name) == ["step-2"]
