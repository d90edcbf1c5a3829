"""Helpers for the launch-script, fault-tolerance and bad-input tests: run launch/*.sh for real."""
from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.trainer_util import REPO, launch, losses, write_config

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The environment launch/*.sh get: this interpreter, one thread per process, the repo importable."""
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO)) | extra


def train_args(corpus: Path, tokenizer: Path, config: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A tiny run: 6 steps of batch 4 (per process), a checkpoint every 2 steps, no dropout."""
    return ["--model", str(config), "--model_name", name, "--output_dir", str(out), "--corpus_path", str(corpus),
            "--tokenizer", str(tokenizer), "--max_seq_length", "64", "--train_batch_size", "4",
            "--num_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--scheduler_num_steps", "100", "--num_workers", "0", "--no_progress", *extra]


def run_sh(script: str, args: list[str], extra_env: dict[str, str] | None = None, timeout: int = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch/{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def shared_setup(tmp_path_factory, corpus: Path, tokenizer: Path) -> dict:
    """The tiny config and the uninterrupted 2-process reference run (launch/torchrun.sh), made once
    per session however many test modules ask (a lock file, because fixtures of different
    modules are separate)."""
    root = tmp_path_factory.getbasetemp() / "launch_shared"
    root.mkdir(exist_ok=True)
    cfg = root / "tiny.json"
    out = root / "out"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cfg.exists():
            write_config(cfg)
        ref = out / "reference"
        if not (ref / "final").is_dir():
            run_sh("torchrun.sh", train_args(corpus, tokenizer, cfg, out, "reference"),
                   {"NPROC_PER_NODE": "2"})
    return {"root": root, "cfg": cfg, "out": out, "reference": ref, "reference_losses": losses(ref),
            "corpus": corpus, "tokenizer": tokenizer}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (relative name -> digest): to show a failed run changed nothing."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


__all__ = ["STEPS", "env", "free_port", "launch", "losses", "run_sh", "shared_setup", "train_args", "tree_digest"]
