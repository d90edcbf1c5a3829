"""A crash costs at most the work since the last checkpoint: SIGKILL of a worker under torchrun
--max_restarts, a kill in the middle of a checkpoint write, SIGTERM (preemption), and runs whose
loss or gradients stop being finite. Faults are placed with the test-only TRAINER_TEST_FAULT
hook (trainer/faults.py) or by signalling the torchrun agent from here. The first three faults run
with every engine (torch, DeepSpeed ZeRO-2/3, fairscale OSS/ShardedDDP); CI runs the torch engine and
one fault per other engine, the rest are marked slow."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch_util import REPO, STEPS, env, launch, losses, run_sh, shared_setup, train_args
from tests.trainer_util import read_tsv
from trainer.engines.base import is_bad_step as _is_bad_step


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    return shared_setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


SCRIPT = {0: "train.py", 1: "train_zero_one.py", 2: "train_zero_two.py", 3: "train_zero_two.py"}
# engine, ZeRO stage: every combination that runs on the CPU (fairscale's FSDP needs CUDA)
ENGINES = [("torch", 0), ("deepspeed", 2), ("deepspeed", 3), ("fairscale", 1), ("fairscale", 2)]


def _engines(ci: list[tuple[str, int]]) -> list:
    """The torch engine and the `ci` combinations run in CI; the others are marked slow."""
    return [pytest.param(e, s, id=f"{e}{s}", marks=() if e == "torch" or (e, s) in ci else pytest.mark.slow)
            for e, s in ENGINES]


def _args(shared, name: str, *extra: str, engine: str = "torch", stage: int = 0) -> list[str]:
    if engine != "torch":
        name = f"{name}_{engine}{stage}"
        extra = (*extra, "--engine", engine, *(["--zero3"] if stage == 3 else []))
    return train_args(shared["corpus"], shared["tokenizer"], shared["cfg"], shared["out"], name, *extra)


def _run_dir(shared, args: list[str]) -> Path:
    return shared["out"] / args[args.index("--model_name") + 1]


def _engine_env(stage: int, **extra: str) -> dict[str, str]:
    return {"LAUNCHER": SCRIPT[stage], "DS_ACCELERATOR": "cpu", **extra}


@pytest.mark.parametrize("engine,stage", _engines(ci=[("fairscale", 2)]))
def test_sigkill_of_a_worker_restarts_from_last_checkpoint(shared, tmp_path, engine, stage):
    """Rank 1 is SIGKILLed after step 3 (step-2 is the last checkpoint); torchrun restarts both
    workers, --checkpoint auto resumes step-2, and the run ends with the reference's losses
    (every engine gives the torch engine's losses on these 6 steps, to the printed digits)."""
    marker = tmp_path / "fault-fired"
    args = _args(shared, "sigkill", "--checkpoint", "auto", engine=engine, stage=stage)
    proc = run_sh("torchrun.sh", args,
                  _engine_env(stage, NPROC_PER_NODE="2", MAX_RESTARTS="1", TRAINER_TEST_FAULT="after_step:3:1",
                              TRAINER_TEST_FAULT_ONCE=str(marker)))
    out = proc.stdout + proc.stderr
    assert marker.is_file(), out[-3000:]
    assert "after_step at step 3 on rank 1" in out
    assert "resumed" in out and "at step 2" in out, out[-3000:]
    rd = _run_dir(shared, args)
    assert [int(r["step"]) for r in read_tsv(rd / "loss.tsv")] == list(range(1, STEPS + 1))
    assert losses(rd) == pytest.approx(shared["reference_losses"], abs=1e-6)


@pytest.mark.parametrize("engine,stage", _engines(ci=[]))
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(shared, engine, stage):
    """Killed after step-4's data and meta.json are in .step-4.tmp but before the rename: step-2
    stays the latest checkpoint, the leftover is refused as --checkpoint, ignored by auto and
    removed by the next save; the resumed run repeats steps 3-4 exactly."""
    base = _args(shared, "save_kill", engine=engine, stage=stage)
    args = [*base, "--checkpoint", "auto"]
    rd = _run_dir(shared, base)
    script = SCRIPT[stage]
    proc = launch(script, args, check=False, env=_engine_env(stage, TRAINER_TEST_FAULT="in_save:4:0"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (rd / ".step-4.tmp" / "meta.json").is_file()  # complete-looking, but never renamed
    assert sorted(p.name for p in rd.glob("step-*")) == ["step-2"]
    first = losses(rd)
    assert len(first) == 4

    bad = launch(script, [*base, "--checkpoint", str(rd / ".step-4.tmp")], check=False, env=_engine_env(stage))
    assert bad.returncode == 1 and "incomplete checkpoint left by a crash during a save" in bad.stderr
    assert "Traceback" not in bad.stderr

    proc = launch(script, args, env=_engine_env(stage))
    assert f"resumed {rd / 'step-2'} at step 2" in proc.stdout
    assert not list(rd.glob(".step-*"))
    assert sorted(p.name for p in rd.glob("step-*")) == ["step-2", "step-4", "step-6"]
    again = losses(rd)
    assert [int(r["step"]) for r in read_tsv(rd / "loss.tsv")] == list(range(1, STEPS + 1))
    assert again[:4] == pytest.approx(first, abs=1e-6)


@pytest.mark.parametrize("engine,stage", _engines(ci=[("deepspeed", 3)]))
def test_sigterm_on_one_rank_saves_on_all(shared, engine, stage):
    """SIGTERM reaches only rank 1 (after step 3): both ranks agree, save step-3 together and stop."""
    args = _args(shared, "sigterm_rank", "--save_steps", "0", engine=engine, stage=stage)
    proc = run_sh("torchrun.sh", args, _engine_env(stage, NPROC_PER_NODE="2", TRAINER_TEST_FAULT="sigterm:3:1"),
                  check=False)
    rd = _run_dir(shared, args)
    assert proc.returncode != 0
    assert f"SIGTERM at step 3: saved checkpoint {rd / 'step-3'}; resume with --checkpoint auto" in proc.stderr
    assert sorted(p.name for p in rd.glob("step-*")) == ["step-3"]
    meta = json.loads((rd / "step-3" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert sorted(p.name for p in (rd / "step-3" / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    assert not (rd / "final").exists()


def test_sigterm_to_torchrun_agent_saves_current_step(shared):
    """Preemption as slurm does it: SIGTERM to the torchrun agent, which forwards it to the workers'
    process groups (DataLoader workers included, --num_workers 1); the current step is saved."""
    rd = shared["out"] / "sigterm_agent"
    args = _args(shared, "sigterm_agent", "--num_steps", "100000", "--scheduler_num_steps", "100000",
                 "--save_steps", "0", "--num_workers", "1")
    agent = subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO,
                             env=env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and agent.poll() is None:
            if (rd / "loss.tsv").is_file() and len(read_tsv(rd / "loss.tsv")) >= 2:
                break
            time.sleep(0.2)
        assert agent.poll() is None, agent.communicate()[1][-3000:]
        agent.send_signal(signal.SIGTERM)  # torchrun.sh execs torchrun: this is the agent
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    last = int(read_tsv(rd / "loss.tsv")[-1]["step"])
    assert agent.returncode != 0
    assert f"SIGTERM at step {last}: saved checkpoint {rd / f'step-{last}'}" in stderr, stderr[-3000:]
    assert sorted(p.name for p in rd.glob("step-*")) == [f"step-{last}"]
    assert "exited unexpectedly" not in stderr  # no DataLoader worker died first


@pytest.mark.parametrize("loss_ok,skipped,scale,fp16,bad", [
    (True, False, 1.0, False, False),
    (False, True, 1.0, False, True),       # non-finite loss
    (True, True, 1.0, False, True),        # fp32/bf16: non-finite gradients, nothing can fix them
    (True, True, 65536.0, True, False),    # fp16 overflow: the scaler skips the step and halves the scale
    (True, True, 1.0, True, True),         # ... until the scale reaches 1
    (False, True, 65536.0, True, True),    # a non-finite forward loss is not a scaling problem
])
def test_bad_step_rule(loss_ok, skipped, scale, fp16, bad):
    assert _is_bad_step(loss_ok, skipped, scale, fp16) is bad


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_steps_stop_with_checkpoint(shared, precision):
    """--learning_rate 1e30 blows the weights up within the first steps; later losses are not finite
    and the steps are skipped (fp16: the scaler halves its scale each time). 3 bad steps in a row
    stop the run with exit code 3, a message naming the fix and a saved checkpoint; the periodic
    checkpoint from before the bad steps survives (no periodic saves during them, --keep_checkpoints 1)."""
    name = f"nonfinite_{precision}"
    rd = shared["out"] / name
    proc = launch("train.py", _args(shared, name, "--max_bad_steps", "3", "--save_steps", "1", "--keep_checkpoints",
                                    "1", "--learning_rate", "1e30", *(["--fp16"] if precision == "fp16" else [])),
                  check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    rows = read_tsv(rd / "loss.tsv")
    first_bad = next(int(r["step"]) for r in rows if not math.isfinite(r["loss"]))
    last = first_bad + 2
    assert [int(r["step"]) for r in rows] == list(range(1, last + 1))
    assert all(math.isfinite(r["loss"]) for r in rows[:first_bad - 1])
    assert not any(math.isfinite(r["loss"]) for r in rows[first_bad - 1:])
    assert f"3 consecutive steps with non-finite loss or gradients (steps {first_bad}-{last};" in proc.stderr
    assert "Lower --learning_rate, raise --warmup_steps or use --bf16 instead of --fp16" in proc.stderr
    good = rd / f"step-{first_bad - 1}"
    assert f"saved {rd / f'step-{last}'} for inspection, the last checkpoint before them is {good}" in proc.stderr
    assert sorted(p.name for p in rd.glob("step-*")) == sorted([good.name, f"step-{last}"])
    assert not (rd / "final").exists()
    if precision == "fp16":
        scales = [r["loss_scale"] for r in rows[first_bad - 1:]]
        assert all(b == a / 2 for a, b in zip(scales, scales[1:])), scales
