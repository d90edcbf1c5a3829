"""The benchmarks under bench/ still run (their smoke modes, tiny sizes): a benchmark that broke
unnoticed would report nothing the next time its figures are needed. The numbers are not checked
here (timings belong to the benchmarks themselves, bench/README.md); the tables' rows are."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_transformer.json"
TINY_MODERNBERT = REPO / "tests" / "configs" / "tiny_modernbert.json"
SHARED = REPO.parent / "shared" / "data"
pytest.importorskip("transformers")
needs_shared = pytest.mark.skipif(not (SHARED / "nsmc").is_dir(), reason="../shared/data not available")


def bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, (f"bench/{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


def rows(table: str) -> set[str]:
    """The first column of a printed table (the text before two spaces)."""
    return {line.split("  ")[0] for line in table.splitlines() if "  " in line}


@pytest.mark.slow
def test_model_throughput_with_every_ablation():
    out = bench("model_throughput.py", "--config", str(TINY), "--modernbert", str(TINY_MODERNBERT), "--seq_len", "32",
                "--quick", "--only", "transformer", "--full_last_layer", "--separate_embedding_grad",
                "--torch_dropout", "--autograd_split", "--device_reads")
    m = str(TINY_MODERNBERT)
    assert {"HF BertForMaskedLM", "transformer", "transformer, torch dropout", "HF ModernBertForMaskedLM", m,
            f"{m}, autograd split", f"{m}, full last layer", "transformer, device reads"} <= rows(out), out
    assert "transformer / HF BertForMaskedLM = " in out and f"{m} / HF ModernBertForMaskedLM = " in out


def test_model_throughput_refuses_a_sequence_longer_than_the_positions():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "model_throughput.py"), "--config", str(TINY),
                           "--seq_len", "128", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seq_len 128 exceeds the config's max_position_embedding (64)" in proc.stderr


def test_gpu_mfu_cpu_smoke():
    out = bench("gpu_mfu.py", "--device", "cpu", "--config", str(TINY), "--modernbert", str(TINY_MODERNBERT),
                "--seq_len", "32", "--quick", "--only", "transformer", "--device_reads", "--dropout_prob", "0")
    m = str(TINY_MODERNBERT)
    assert {"HF BertForMaskedLM", "transformer", "transformer, device reads", "HF ModernBertForMaskedLM", m,
            f"{m}, device reads"} <= rows(out), out


@pytest.mark.slow
def test_gpu_mfu_cpu_smoke_compiled_layers():
    """--compile layers: our layers compiled in place as the trainer's --compile does."""
    out = bench("gpu_mfu.py", "--device", "cpu", "--config", str(TINY), "--modernbert", "none", "--no_hf",
                "--seq_len", "32", "--quick", "--only", "transformer", "--compile", "layers")
    assert "transformer" in rows(out) and "torch.compile (layers)" in out, out


@needs_shared
def test_finetune_throughput_quick():
    out = bench("finetune_throughput.py", "--quick")
    assert "unpadded" in out, out


@pytest.mark.slow  # 14 s: the suite stays under 10 minutes on 2 cores
@needs_shared
def test_quality_quick(tmp_path):
    out = bench("quality.py", "--quick", "--out", str(tmp_path / "quality"))
    assert {"ours", "run_mlm baseline"} <= rows(out), out
