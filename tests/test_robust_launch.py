"""Launching, engines and resuming the way users do it: a rendezvous port another program holds, the slurm
script outside a job or on a node without slurm.conf (compressed node lists, SLURM_NNODES only), a resume
under another engine, a --checkpoint naming a file inside a step-N, a resume that splits the same global
batch otherwise. Each case runs the real entry point (the launch script, or `trainer.loop.main` in this
process) and checks what the user sees and that nothing of theirs changed (docs/operations.md)."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.launch_util import env, free_port, train_args, tree_digest
from tests.test_safety import _main as safety_main
from tests.trainer_util import REPO, losses, write_config


def _main(stage: int, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """trainer.loop.main(stage) in this process (tests/test_safety.py's _main)."""
    return safety_main(argv, monkeypatch, capsys, stage=stage)


@pytest.fixture()
def area(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    return {"root": tmp_path, "cfg": write_config(tmp_path / "tiny.json"), "corpus": tiny_corpus,
            "tok": tiny_tokenizer_dir, "out": tmp_path / "out"}


def _args(area, name: str, *extra: str) -> list[str]:
    return train_args(area["corpus"], area["tok"], area["cfg"], area["out"], name, "--save_steps", "1", *extra)


# -- launch scripts ------------------------------------------------------------------------------------------

@pytest.fixture()
def held_port():
    """A port another program listens on (as an earlier job's leftover process would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("script, settings", [
    ("multinode.sh", {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"}),
    ("multinode.sh", {"NNODES": "1", "RDZV_ENDPOINT": "localhost:{port}"}),
    ("deepspeed.sh", {"RUNNER": "deepspeed", "MASTER_PORT": "{port}"}),
    ("slurm.sbatch", {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "c1",
                      "RDZV_HOST": "127.0.0.1", "RDZV_PORT": "{port}"}),
])
def test_a_rendezvous_port_held_by_another_program_is_named_at_once(held_port, script, settings):
    """multinode.sh (c10d) took the other program for its store and waited silently (100 s and more: the
    rendezvous timeout is minutes); deepspeed.sh died in a DistNetworkError traceback after 15 s."""
    settings = {k: v.format(port=held_port) for k, v in settings.items()}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "launch" / script), "--model_name", "x"], cwd=REPO,
                          env=env(NPROC_PER_NODE="1", **settings), capture_output=True, text=True, timeout=60)
    var = next(k for k in ("RDZV_ENDPOINT", "RDZV_PORT", "MASTER_PORT") if k in settings)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"port {held_port} ({var}) is already in use" in proc.stderr and f"Set {var} to a free port" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 30


@pytest.mark.parametrize("nnodes", ["two", "0", "2:"])
def test_multinode_sh_checks_nnodes_before_torchrun(nnodes):
    """torchrun answered NNODES=two with a ValueError traceback."""
    proc = subprocess.run(["bash", str(REPO / "launch" / "multinode.sh"), "--model_name", "x"], cwd=REPO,
                          env=env(NNODES=nnodes, NPROC_PER_NODE="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"NNODES must be a number of nodes >= 1, or MIN:MAX for an elastic job, got '{nnodes}'" in proc.stderr


def test_slurm_sbatch_outside_a_job_and_on_a_node_without_slurm_conf(tmp_path):
    """Outside a job: 'SLURM_JOB_NODELIST: unbound variable'. On a node where scontrol cannot run (no
    slurm.conf there) the rendezvous host was empty; older releases set SLURM_NNODES only ('unbound
    variable'). Here the job's first node comes from the compressed list itself; srun then fails (no
    cluster), after the script printed what it would start."""
    base = {k: v for k, v in env().items() if not k.startswith("SLURM")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--model_name", "x"], cwd=tmp_path,
                          env=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not inside a slurm job (SLURM_JOB_ID is not set)" in proc.stderr, proc.stderr
    assert "unbound variable" not in proc.stderr
    for nodelist, first in (("gpu[07-09,12],cpu1", "gpu07"), ("rack[1-2]-n[01-04]", "rack1-n01"), ("c5", "c5")):
        job = base | {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": nodelist, "NPROC_PER_NODE": "1",
                      "REPO": str(REPO), "RDZV_PORT": str(free_port())}
        proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--model_name", "x"], cwd=tmp_path,
                              env=job, capture_output=True, text=True, timeout=60)
        assert f"nodes=2 ({nodelist}) procs/node=1 rendezvous={first}:" in proc.stdout, (proc.stdout, proc.stderr)
        assert "unbound variable" not in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], cwd=tmp_path, text=True, timeout=60,
                          env=job | {"NPROC_PER_NODE": "0"}, capture_output=True)
    assert proc.returncode == 2 and "NPROC_PER_NODE must be a number of processes >= 1" in proc.stderr
    # without RDZV_PORT: a port of the job's own, so two jobs whose first node is the same do not meet
    unset = {k: v for k, v in job.items() if k != "RDZV_PORT"} | {"SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], cwd=tmp_path, text=True, timeout=60,
                          env=unset, capture_output=True)
    assert "rendezvous=c5:29742 " in proc.stdout, (proc.stdout, proc.stderr)


def test_deepspeed_runner_names_a_process_count_it_cannot_take(tmp_path):
    """NPROC_PER_NODE=auto passed launch/common.sh's check, then DeepSpeed's --num_gpus refused it with
    an argparse traceback; the script says which runner takes what."""
    proc = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), "--model_name", "x"], cwd=tmp_path,
                          env=env(RUNNER="deepspeed", NPROC_PER_NODE="auto"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "the deepspeed runner takes a number of processes" in proc.stderr, proc.stderr


# -- resuming ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, resumed, said", [
    ((1, "fairscale"), (1, "torch"), "resume it with --engine fairscale with train_zero_one.py or train_zero_two.py"),
    ((0, "torch"), (0, "deepspeed"), "resume it with --engine torch (any launcher) or --engine fairscale with train.py"),
])
def test_a_resume_under_another_engine_is_refused_before_any_work(area, monkeypatch, capsys, written, resumed, said):
    """The torch engine read a fairscale (or DeepSpeed) step-N as a damaged checkpoint ('the checkpoint is
    damaged, resume from another step-N', after a FileNotFoundError traceback of DCP); DeepSpeed refused a
    torch one only after building the data, the model and its engine."""
    stage, engine = written
    code, out = _main(stage, _args(area, "run", "--engine", engine, "--num_steps", "1"), monkeypatch, capsys)
    assert code == 0, out
    run = area["out"] / "run"
    before = tree_digest(run)
    stage, engine = resumed
    code, out = _main(stage, _args(area, "run", "--engine", engine, "--num_steps", "2", "--checkpoint", "auto"),
                      monkeypatch, capsys)
    assert code == 1 and f"{run / 'step-1'} was written by --engine {written[1]}" in out and said in out, out
    assert "damaged" not in out and "Traceback" not in out and "[train]" not in out and "[corpus]" not in out
    assert tree_digest(run) == before


def test_a_file_inside_a_step_dir_resumes_that_step(area, monkeypatch, capsys):
    """--checkpoint RUN/step-1/dcp/__0_0.distcp (a tab-completed path) was 'not a checkpoint (no meta.json)'."""
    code, out = _main(0, _args(area, "run", "--num_steps", "1"), monkeypatch, capsys)
    assert code == 0, out
    step = area["out"] / "run" / "step-1"
    inner = next(p for p in (step / "dcp").iterdir() if p.suffix == ".distcp")
    code, out = _main(0, _args(area, "run", "--num_steps", "2", "--checkpoint", str(inner)), monkeypatch, capsys)
    assert code == 0 and f"resumed {step} at step 1" in out, out


def test_the_same_global_batch_split_otherwise_is_called_equivalent(area, monkeypatch, capsys):
    """4 x 1 process x 2 accumulation -> 8 x 1 x 1 said nothing, while every other resume change warns. It
    trains on the same samples in the same order, so a note says so (and the losses follow the
    uninterrupted run); a split that moves the epoch's end (1 x 8: 1289 samples an epoch instead of 1288) is
    a data-order warning."""
    code, out = _main(0, _args(area, "whole", "--num_steps", "3", "--gradient_accumulation_steps", "2"),
                      monkeypatch, capsys)
    assert code == 0, out
    code, out = _main(0, _args(area, "split", "--num_steps", "1", "--gradient_accumulation_steps", "2"),
                      monkeypatch, capsys)
    assert code == 0, out
    code, out = _main(0, _args(area, "split", "--num_steps", "3", "--train_batch_size", "8", "--checkpoint", "auto"),
                      monkeypatch, capsys)
    assert code == 0, out
    assert ("another split of the same global batch of 8 samples (4 x 1 process(es) x 2 accumulation -> 8 x 1 "
            "process(es) x 1 accumulation" in out and "continues the run equivalently" in out), out
    assert "warning" not in out
    assert "the gradients are the same up to rounding" in out and "Switch" not in out
    # a step's loss is the mean over all its masked tokens whatever the split (trainer.loop.token_weights)
    assert losses(area["out"] / "split") == pytest.approx(losses(area["out"] / "whole"), rel=1e-5)
    code, out = _main(0, _args(area, "split", "--num_steps", "4", "--train_batch_size", "1",
                               "--gradient_accumulation_steps", "8", "--checkpoint", "auto"), monkeypatch, capsys)
    assert code == 0, out
    assert "warning: resuming" in out and "an epoch takes 1288 -> 1289 of the 1289 samples" in out, out
    assert "equivalently" not in out



def test_an_optimizer_step_larger_than_the_data_warns(area, monkeypatch, capsys):
    """--gradient_accumulation_steps beyond the data (64 x 21 = 1344 samples a step, 1280 an epoch) trained
    silently on steps that repeat samples; only a micro-batch larger than the data was refused."""
    code, out = _main(0, _args(area, "run", "--num_steps", "1", "--train_batch_size", "64",
                               "--gradient_accumulation_steps", "21"), monkeypatch, capsys)
    assert code == 0, out
    assert ("one optimizer step takes 1344 samples (--train_batch_size 64 x 1 process(es) x "
            "--gradient_accumulation_steps 21), more than the 1280 of an epoch" in out), out
    assert "Lower --gradient_accumulation_steps to at most 20" in out
