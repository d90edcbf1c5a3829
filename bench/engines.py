"""Every engine x ZeRO stage in one run: tokens/s and per-rank memory, with ratios to torch DDP.

Each configuration is a real launcher run (torchrun, 2 processes by default) on the same data,
model and seed; the numbers are read back from the run's loss.tsv (perf/tokens_per_s: median
over the logged steps after the first two; perf/rss_mb and perf/optimizer_state_mb: rank 0 at
the last step; optimizer_state_max_mb: the largest over the ranks).

    python bench/engines.py                       # configs/small_config.json, seq 128, batch 8, 20 steps
    python bench/engines.py --quick               # smoke run: seq 64, batch 4, 6 steps
    python bench/engines.py --model bert-base --nproc 4 --steps 50 --offload
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import format_table  # noqa: E402
from tests.trainer_util import read_tsv  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "nsmc" / "reviews_corpus.txt"
SCRIPT = {0: "train.py", 1: "train_zero_one.py", 2: "train_zero_two.py", 3: "train_zero_two.py"}
STAGE_NAME = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}


def configurations(offload: bool) -> list[tuple[str, int, list[str]]]:
    out = [(engine, stage, []) for engine in ("torch", "deepspeed", "fairscale") for stage in (0, 1, 2, 3)]
    if offload:
        out += [("deepspeed", 2, ["--cpu_offload"]), ("deepspeed", 3, ["--cpu_offload"])]
    return out


def prepare_data(work: Path, num_lines: int, model: str) -> tuple[Path, Path]:
    """A corpus slice and a tokenizer with the model's vocabulary size (built once per work dir)."""
    from data.tokenizer import KoTokenizer, train_tokenizer
    from models import load_config

    corpus = work / f"corpus{num_lines}.dat"
    if not corpus.is_file():
        with open(CORPUS, "rb") as src, open(corpus, "wb") as dst:
            dst.writelines(itertools.islice(src, num_lines))
    vocab = load_config(model).vocab_size
    tok = work / f"tokenizer{vocab}"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer([corpus], vocab_size=vocab, out_dir=tok)
    KoTokenizer.load(tok)
    return corpus, tok


def run_one(engine: str, stage: int, extra: list[str], a, corpus: Path, tok: Path, out: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(REPO / SCRIPT[stage]), "--engine", engine, *(["--zero3"] if stage == 3 else []), *extra,
           "--model", a.model, "--model_name", name, "--output_dir", str(out), "--corpus_path", str(corpus),
           "--tokenizer", str(tok), "--max_seq_length", str(a.seq), "--train_batch_size", str(a.batch),
           "--num_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "0", "--num_workers", "0",
           "--warmup_steps", "0", "--no_progress", "--seed", "1"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc))),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    tsv = out / name / "loss.tsv"
    if proc.returncode != 0 or not tsv.is_file():
        text = proc.stderr + proc.stdout
        reason = next((line.strip() for line in text.splitlines() if line.startswith("--engine")), None)
        reason = reason or next((line.strip() for line in reversed(text.splitlines()) if "Error" in line), "failed")
        return {"error": reason}
    rows = read_tsv(tsv)
    steady = rows[2:] or rows
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "rss_mb": rows[-1]["rss_mb"], "opt_mb": rows[-1]["optimizer_state_mb"],
            "opt_max_mb": rows[-1].get("optimizer_state_max_mb", rows[-1]["optimizer_state_mb"]),
            "loss": rows[-1]["loss"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "configs" / "small_config.json"), help="model config name or JSON")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="per-process micro-batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lines", type=int, default=20000, help="corpus lines (NSMC reviews)")
    p.add_argument("--offload", action="store_true", help="also DeepSpeed ZeRO-2/3 with --cpu_offload (compiles CPUAdam)")
    p.add_argument("--quick", action="store_true", help="smoke run: seq 64, batch 4, 6 steps")
    p.add_argument("--work_dir", default=None, help="keep data and runs here (default: a temporary directory)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    a = p.parse_args(argv)
    if a.quick:
        a.seq, a.batch, a.steps, a.lines = 64, 4, 6, 5000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, tok = prepare_data(work, a.lines, a.model)
        results = []
        for i, (engine, stage, extra) in enumerate(configurations(a.offload)):
            label = f"{engine} {STAGE_NAME[stage]}" + (" offload" if extra else "")
            print(f"[bench] {label} ...", file=sys.stderr, flush=True)
            r = run_one(engine, stage, extra, a, corpus, tok, work / "runs", f"{engine}{stage}{'o' if extra else ''}")
            results.append((label, r))
    base = dict(results)["torch DDP"]
    rows = []
    for label, r in results:
        if "error" in r:
            rows.append({"engine x stage": label, "tokens/s": "-", "note": r["error"][:72] + "..."})
            continue
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if "error" not in base and base[k] else "-"
        rows.append({"engine x stage": label, "tokens/s": f"{r['tokens_per_s']:.0f}", "x DDP": ratio("tokens_per_s"),
                     "rss MB": f"{r['rss_mb']:.0f}", "x DDP ": ratio("rss_mb"),
                     "opt state MB (rank 0 / max)": f"{r['opt_mb']:.1f} / {r['opt_max_mb']:.1f}",
                     "x DDP  ": ratio("opt_max_mb"), "loss": f"{r['loss']:.4f}"})
    print(f"model {a.model}, {a.nproc} processes, seq {a.seq}, micro-batch {a.batch}/process, {a.steps} steps, fp32")
    print(format_table(rows, ["engine x stage", "tokens/s", "x DDP", "rss MB", "x DDP ",
                              "opt state MB (rank 0 / max)", "x DDP  ", "loss", "note"]))


if __name__ == "__main__":
    main()
