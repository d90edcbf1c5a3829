"""Corpus cache build vs HF datasets: throughput (tokens/s) and peak RSS, same tokenizer, same run.

    python bench/corpus_cache.py [--corpus ../shared/data/nsmc/reviews_corpus.txt] [--repeats 2]

Ours: data.corpus.build_cache(num_workers=2). Baseline: datasets.load_dataset("text") then
.map(batched=True, num_proc=2) with the same tokenizer. Each build runs in a fresh subprocess
(fresh caches) whose process tree (workers included) is sampled with psutil for peak RSS;
ours and the baseline alternate so that load from other users of the machine hits both.
Sizes: the first half of the corpus and all of it, to show whether memory grows with size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(args: argparse.Namespace) -> None:
    """Run one build and print a JSON line with seconds and tokens."""
    from data.tokenizer import KoTokenizer

    tok = KoTokenizer.load(args.tokenizer)
    work = Path(args.workdir)
    if args.child == "ours":
        os.environ["CORPUS_CACHE_DIR"] = str(work)
        from data.corpus import CorpusCache, build_cache

        t0 = time.perf_counter()
        path = build_cache(args.corpus, tok, num_workers=args.workers, progress=False)
        seconds = time.perf_counter() - t0
        tokens = CorpusCache.open(path).manifest["counts"]["tokens"]
    else:
        import datasets

        datasets.disable_progress_bars()

        def encode(batch: dict) -> dict:
            return {"input_ids": tok.encode_batch(batch["text"])}

        t0 = time.perf_counter()
        ds = datasets.load_dataset("text", data_files=args.corpus, split="train", cache_dir=str(work))
        ds = ds.map(encode, batched=True, num_proc=args.workers, remove_columns=["text"])
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for batch in ds.iter(batch_size=10000) for x in batch["input_ids"])
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


def _measure(kind: str, corpus: Path, tokenizer: Path, workers: int) -> dict:
    """Run one build in a subprocess; sample the RSS of its whole process tree."""
    import psutil

    with tempfile.TemporaryDirectory(prefix=f"bench_{kind}_") as work:
        cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
               "--workers", str(workers), "--workdir", work]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        ps = psutil.Process(proc.pid)
        peak_tree = peak_one = 0
        while proc.poll() is None:
            try:
                rss = [p.memory_info().rss for p in [ps, *ps.children(recursive=True)]]
            except psutil.Error:
                rss = []
            if rss:
                peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss))
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{kind} build failed:\n{err[-3000:]}")
        res = json.loads(out.strip().splitlines()[-1])
    return {**res, "tokens_per_s": res["tokens"] / res["seconds"], "peak_tree_mb": peak_tree / 2**20,
            "peak_proc_mb": peak_one / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/data/nsmc/reviews_corpus.txt"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one on the corpus)")
    ap.add_argument("--vocab_size", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    with tempfile.TemporaryDirectory(prefix="bench_corpus_") as tmp:
        tmp = Path(tmp)
        src = Path(args.corpus)
        lines = src.read_bytes().split(b"\n")
        half, full = tmp / "half.dat", tmp / "full.dat"
        half.write_bytes(b"\n".join(lines[: len(lines) // 2]) + b"\n")
        full.write_bytes(src.read_bytes())
        del lines
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
        if not args.tokenizer:
            from data.tokenizer import train_tokenizer

            t0 = time.perf_counter()
            train_tokenizer([full], args.vocab_size, tok_dir)
            print(f"trained a {args.vocab_size}-token WordPiece on {src.name} in {time.perf_counter() - t0:.1f} s")
        print(f"corpus {src} ({src.stat().st_size / 2**20:.1f} MiB), workers={args.workers}, "
              f"repeats={args.repeats}, cpus={os.cpu_count()}")
        print(f"{'size':>5} {'build':>9} {'MiB':>6} {'tokens':>11} {'s':>7} {'tokens/s':>11} "
              f"{'peak RSS tree MiB':>18} {'largest proc MiB':>17}")
        summary = {}
        for name, path in (("half", half), ("full", full)):
            for rep in range(args.repeats):
                order = ("ours", "datasets") if rep % 2 == 0 else ("datasets", "ours")
                for kind in order:
                    r = _measure(kind, path, tok_dir, args.workers)
                    summary.setdefault((name, kind), []).append(r)
                    print(f"{name:>5} {kind:>9} {path.stat().st_size / 2**20:6.1f} {r['tokens']:>11,} "
                          f"{r['seconds']:7.2f} {r['tokens_per_s']:>11,.0f} {r['peak_tree_mb']:>18.0f} "
                          f"{r['peak_proc_mb']:>17.0f}", flush=True)
        print("\nbest of repeats (median-free: the CPU is shared, the fastest run is the least disturbed):")
        for name in ("half", "full"):
            ours = max(summary[(name, "ours")], key=lambda r: r["tokens_per_s"])
            base = max(summary[(name, "datasets")], key=lambda r: r["tokens_per_s"])
            print(f"  {name}: ours {ours['tokens_per_s']:,.0f} tokens/s vs datasets {base['tokens_per_s']:,.0f} "
                  f"tokens/s -> ratio {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x; peak RSS (tree) ours "
                  f"{max(r['peak_tree_mb'] for r in summary[(name, 'ours')]):.0f} MiB vs datasets "
                  f"{max(r['peak_tree_mb'] for r in summary[(name, 'datasets')]):.0f} MiB")
        grow = (max(r["peak_tree_mb"] for r in summary[("full", "ours")])
                / max(r["peak_tree_mb"] for r in summary[("half", "ours")]))
        print(f"  ours: peak RSS full/half = {grow:.2f} (corpus size ratio 2.0)")


if __name__ == "__main__":
    main()
