"""launch/torchrun.sh, launch/multinode.sh and launch/slurm.sbatch, run for real on this machine.

Every run trains the same tiny model for 6 steps on 2 processes (world size 2) and must log the
same losses as the one-node reference run, however the processes were started.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch_util import REPO, STEPS, env, free_port, losses, run_sh, shared_setup, train_args

SLURM_START = REPO.parent / "shared" / "tools" / "local-slurm" / "start_local_slurm.sh"
SLURM_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/local-slurm"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    return shared_setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


def _args(shared, name: str, *extra: str) -> list[str]:
    return train_args(shared["corpus"], shared["tokenizer"], shared["cfg"], shared["out"], name, *extra)


def test_torchrun_sh_runs_two_processes(shared):
    rd = shared["reference"]
    assert len(shared["reference_losses"]) == STEPS
    assert (rd / "final" / "model.safetensors").is_file()
    assert [p.name for p in sorted(rd.glob("step-*"))] == ["step-2", "step-4", "step-6"]


def test_launch_scripts_reject_unknown_launcher(shared):
    for script, extra in (("torchrun.sh", {}), ("multinode.sh", {"NNODES": "2"})):
        proc = run_sh(script, ["--model_name", "x"], {"LAUNCHER": "train_zero_three.py", "NPROC_PER_NODE": "1", **extra},
                      check=False)
        assert proc.returncode == 2
        assert "LAUNCHER must be train.py, train_zero_one.py or train_zero_two.py" in proc.stderr
    proc = run_sh("multinode.sh", ["--model_name", "x"], {"NPROC_PER_NODE": "1"} | {"NNODES": ""}, check=False)
    assert proc.returncode != 0 and "set NNODES" in proc.stderr


def test_multinode_two_agents_match_one_node(shared):
    """Two torchrun agents (two 'nodes', one process each) meet by c10d rendezvous on 127.0.0.1."""
    port = str(free_port())
    agents = []
    for node_rank in (0, 1):
        agents.append(subprocess.Popen(
            ["bash", str(REPO / "launch" / "multinode.sh"), *_args(shared, "multinode")], cwd=REPO,
            env=env(NNODES="2", NODE_RANK=str(node_rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port, RDZV_ID=f"test-{port}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    assert "processes=2" in "".join(outputs)
    got = losses(shared["out"] / "multinode")
    assert got == pytest.approx(shared["reference_losses"], abs=1e-6)


def _start_slurm() -> None:
    if shutil.which("sbatch") and (SLURM_DIR / "env.sh").is_file():
        probe = subprocess.run(["sinfo", "-h"], env=_slurm_env(), capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and "idle" in probe.stdout:
            return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm is not installed and cannot be (the local cluster needs root and apt-get)")
    if not SLURM_START.is_file():
        pytest.skip(f"{SLURM_START} not found")
    proc = subprocess.run(["bash", str(SLURM_START)], capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.skip(f"could not start the local slurm cluster ({SLURM_START} exited {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout)[-500:]}")


def _slurm_env(**extra: str) -> dict[str, str]:
    e = env(**extra)
    e["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
    e.setdefault("PATH", os.environ.get("PATH", ""))
    return e


def _sbatch(shared, name: str, *extra: str, **job_env: str) -> tuple[subprocess.CompletedProcess, str]:
    log = shared["root"] / f"slurm-{name}.out"
    e = _slurm_env(NPROC_PER_NODE="1", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), REPO=str(REPO), **job_env)
    # --export=ALL: the job sees PYTHON, PYTHONPATH, REPO, RDZV_* from here
    proc = subprocess.run(["sbatch", "--wait", "--export=ALL", "-N", "2", "--cpus-per-task=1", "-t", "5",
                           "-o", str(log), str(REPO / "launch" / "slurm.sbatch"), *_args(shared, name, *extra)],
                          cwd=shared["root"], env=e, capture_output=True, text=True, timeout=300)
    return proc, log.read_text() if log.is_file() else ""


@pytest.mark.slow
def test_slurm_sbatch_two_nodes(shared):
    """sbatch --wait on a real 2-node slurm cluster (two slurmd on this machine): one torchrun agent
    per node via srun, c10d rendezvous; the exit code is the job's, the losses are the reference's."""
    _start_slurm()
    proc, log = _sbatch(shared, "slurm")
    assert proc.returncode == 0, (proc.stdout, proc.stderr, log[-4000:])
    assert "nodes=2" in log and "rendezvous=127.0.0.1" in log and "processes=2" in log, log[-3000:]
    assert losses(shared["out"] / "slurm") == pytest.approx(shared["reference_losses"], abs=1e-6)
    # a job whose training fails (a bad flag) fails the sbatch --wait too
    proc, log = _sbatch(shared, "slurm_bad", "--num_steps", "0")
    assert proc.returncode != 0, log[-3000:]
    assert "--num_steps must be > 0" in log
