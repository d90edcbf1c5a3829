"""Helpers for tests that run the launchers for real (subprocesses, torchrun with gloo on CPU)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A tiny post-LN transformer without dropout: runs compare losses exactly.
TINY_CONFIG = {
    "model_type": "transformer", "vocab_size": 2000, "hidden_size": 32, "num_hidden_layers": 2,
    "num_heads": 2, "ff_dim": 64, "act_fn": "gelu", "dropout_prob": 0.0, "initializer_range": 0.02,
    "max_position_embedding": 64, "type_vocab_size": 2, "LN_eps": 1e-12, "ln_pos": 1, "layer_group": 1,
    "n_experts": 1, "kernel_size": 3,
}


def write_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps(TINY_CONFIG | overrides))
    return path


def launch(script: str, args: list[str], nproc: int = 1, check: bool = True, env: dict | None = None,
           timeout: int = 300, torchrun_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a launcher: plain python for 1 process, torchrun --standalone for more."""
    if nproc > 1 or torchrun_args:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(torchrun_args or []), str(REPO / script), *args]
    else:
        cmd = [sys.executable, str(REPO / script), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f, delimiter="\t")]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_tsv(run_dir / "loss.tsv")]
