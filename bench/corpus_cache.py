"""Corpus cache build vs HF datasets: throughput (tokens/s) and peak RSS, same tokenizer, same run.

    python bench/corpus_cache.py [--corpus ../shared/data/nsmc/reviews_corpus.txt] [--repeats 2]

Ours: data.corpus.build_cache(num_workers=2). Baseline: datasets.load_dataset("text") then
.map(batched=True, num_proc=2) with the same tokenizer, called as the `tokenizers` library
offers it (`encode_batch_fast`; ours also skips the normalizer where it changes nothing). Each
build runs in a fresh subprocess (fresh caches) whose process tree (workers included) is sampled
with psutil for peak RSS; ours and the baseline alternate so that load from other users of the
machine hits both.
Sizes: the first half of the corpus and all of it, to show whether memory grows with size.

Scale mode (`--scale`, issue 12): a sharded corpus made on the fly from the NSMC corpus (never
committed) at half and full `--scale_mb` (default 1024 MB in `--shards` 100 files; each shard is
the NSMC text from a different starting line, wrapped around), then
  - build tokens/s and peak RSS of the process tree: `python -m data.corpus build` vs `datasets`
    (`load_dataset("text")` on the same shards + `map(num_proc=2)`), ratio (goal >= 1.5x; RSS
    flat within 10% as the corpus doubles and < 500 MB);
  - launch to the first training step of `train.py` with every cache present (second run; goal
    < 10 s and flat as the corpus doubles);
  - adding one 10 MB shard to the full corpus vs the full build (goal < 5%);
  - RSS of one rank's data pipeline (corpus view + sample index + 2,000 samples) at both sizes (flat).
    python bench/corpus_cache.py --scale [--scale_mb 1024] [--shards 100]   (smoke: --scale_mb 8 --shards 8)
    python bench/corpus_cache.py --scale --pipeline_only   (the last point alone: our builds, no datasets, no runs;
      the pipeline RSS is split into RssAnon, private, and RssFile, mapped file pages)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

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

        from data.tokenizer import _encode_fast

        def encode(batch: dict) -> dict:  # the `tokenizers` library's fastest call (no offsets), as a user would
            texts = [tok._pre(t) for t in batch["text"]] if tok.splitter else batch["text"]
            return {"input_ids": _encode_fast(tok.tokenizer, texts)}

        t0 = time.perf_counter()
        ds = datasets.load_dataset("text", data_files=args.corpus.split(","), split="train", cache_dir=str(work))
        ds = ds.map(encode, batched=True, num_proc=args.workers, remove_columns=["text"])
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for batch in ds.iter(batch_size=10000) for x in batch["input_ids"])
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


def _measure(kind: str, corpus: Path, tokenizer: Path, workers: int) -> dict:
    """Run one build in a subprocess; sample the RSS of its whole process tree (`_tree_peak`)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{kind}_") as work:
        run = _tree_peak([sys.executable, __file__, "--child", kind, "--corpus", str(corpus), "--tokenizer",
                          str(tokenizer), "--workers", str(workers), "--workdir", work])
        res = json.loads(run["output"].strip().splitlines()[-1])
    return {**res, "tokens_per_s": res["tokens"] / res["seconds"], "peak_tree_mb": run["peak_tree_mb"],
            "peak_proc_mb": run["peak_proc_mb"]}


def _make_shards(src: Path, out: Path, total_bytes: int, num_shards: int, offset: int = 0) -> list[Path]:
    """num_shards files of total_bytes / num_shards from src's lines, each from its own start line
    (wrapping around), cut at a document boundary: a real-looking sharded corpus, made on the fly."""
    lines = src.read_bytes().split(b"\n")
    out.mkdir(parents=True, exist_ok=True)
    per = total_bytes // num_shards
    paths = []
    for k in range(num_shards):
        start = ((k + offset) * 7919 * 61) % len(lines)
        chunks, size, i = [], 0, start
        while size < per:
            ln = lines[i % len(lines)]
            chunks.append(ln)
            size += len(ln) + 1
            i += 1
        p = out / f"shard{k + offset:05d}.dat"
        p.write_bytes(b"\n".join(chunks) + b"\n\n")
        paths.append(p)
    return paths


def _tree_peak(cmd: list[str], env: dict | None = None, until: Callable[[], bool] | None = None) -> dict:
    """Run cmd, sampling the RSS of its process tree; stop early (kill) once until() holds."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    ps = psutil.Process(proc.pid)
    peak_tree = peak_one = 0
    reached = None
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [ps, *ps.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss))
        if until is not None and reached is None and until():
            reached = time.perf_counter() - t0
            proc.terminate()
        time.sleep(0.05)
    out = proc.communicate()[0]
    if proc.returncode and reached is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": reached or time.perf_counter() - t0, "peak_tree_mb": peak_tree / 2**20,
            "peak_proc_mb": peak_one / 2**20, "output": out}


def _pipeline_child(args: argparse.Namespace) -> None:
    """One rank's data pipeline over a built corpus: corpus view, sample index, 2,000 samples; RSS."""
    import psutil

    from data.corpus import open_corpus
    from data.pretrain import PretrainDataset
    from data.tokenizer import KoTokenizer

    def status() -> dict[str, float]:  # private (anonymous) and file-backed (page cache, shared) resident MiB
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

    tok = KoTokenizer.load(args.tokenizer)
    before = status()  # interpreter, torch, numpy, tokenizers: the same at any corpus size
    ds = PretrainDataset(open_corpus(args.corpus, tok, progress=False), tok, 128, "sop")
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(ds), 2000):
        ds[int(i)]
    after = status()
    print(json.dumps({"rss_mb": psutil.Process().memory_info().rss / 2**20, "samples": len(ds),
                      "imports_mb": before, "pipeline_mb": {k: after[k] - before[k] for k in after}}))


def _scale(args: argparse.Namespace) -> None:
    from data.spec import resolve

    src = Path(args.corpus)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
        cfg = REPO / "configs" / "demo_config.json"  # the model of the launch-to-first-step runs
        if not args.tokenizer:
            from data.tokenizer import train_tokenizer
            train_tokenizer([src], json.loads(cfg.read_text())["vocab_size"], tok_dir, sample_lines=200_000)
        total = args.scale_mb * 2**20
        sizes = {"half": (total // 2, max(1, args.shards // 2)), "full": (total, args.shards)}
        print(f"scale mode: shards made from {src.name}; cpus={os.cpu_count()}, workers={args.workers}")
        rows = {}
        for name, (nbytes, n) in sizes.items():
            shard_dir = tmp / name
            shards = _make_shards(src, shard_dir, nbytes, n)
            spec = str(shard_dir)
            assert len(resolve(spec).shards) == n
            cache = tmp / f"cache_{name}"
            ours = _tree_peak([sys.executable, "-m", "data.corpus", "build", "--corpus_path", spec, "--tokenizer",
                               str(tok_dir), "--num_workers", str(args.workers), "--no_progress"],
                              env={"CORPUS_CACHE_DIR": str(cache)})
            tokens = int(re.search(r"'tokens': (\d+)", ours["output"]).group(1))
            env = {"CORPUS_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
            if args.pipeline_only:  # one rank's data pipeline RSS only: a first child builds the sample index
                pipes = [_tree_peak([sys.executable, __file__, "--child", "pipeline", "--corpus", spec, "--tokenizer",
                                     str(tok_dir), "--workdir", str(tmp)], env=env) for _ in range(2)]
                res = json.loads(pipes[1]["output"].strip().splitlines()[-1])
                rows[name] = dict(pipe_rss=res["rss_mb"], pipeline=res["pipeline_mb"])
                print(f"{name}: {n} shards, {nbytes / 2**20:.0f} MiB, {tokens:,} tokens, {res['samples']:,} samples | "
                      f"one rank's data pipeline: RSS {res['rss_mb']:.0f} MiB, of which imports {res['imports_mb']} and "
                      f"the opened corpus + index + 2,000 samples {res['pipeline_mb']}", flush=True)
                continue
            with tempfile.TemporaryDirectory(prefix="bench_ds_", dir=tmp) as work:
                base = _tree_peak([sys.executable, __file__, "--child", "datasets", "--corpus", ",".join(map(str, shards)),
                                   "--tokenizer", str(tok_dir), "--workers", str(args.workers), "--workdir", work])
            base_s = json.loads(base["output"].strip().splitlines()[-1])["seconds"]
            # launch -> first training step with every cache present (the first run builds the sample index)
            run = [sys.executable, "train.py", "--model", str(cfg), "--corpus_path", spec,
                   "--tokenizer", str(tok_dir), "--max_seq_length", "128", "--train_batch_size", "8",
                   "--num_steps", "2", "--logging_steps", "1", "--save_steps", "0", "--num_workers", "1",
                   "--no_progress", "--output_dir", str(tmp / "runs")]
            times = []
            for k in range(2):
                tsv = tmp / "runs" / f"{name}{k}" / "loss.tsv"
                r = _tree_peak(run + ["--model_name", f"{name}{k}"], env=env,
                               until=lambda tsv=tsv: tsv.is_file() and len(tsv.read_text().splitlines()) > 1)
                times.append(r["seconds"])
            pipe = _tree_peak([sys.executable, __file__, "--child", "pipeline", "--corpus", spec, "--tokenizer",
                               str(tok_dir), "--workdir", str(tmp)], env=env)
            pipe_rss = json.loads(pipe["output"].strip().splitlines()[-1])["rss_mb"]
            rows[name] = dict(mb=nbytes / 2**20, shards=n, tokens=tokens, ours_s=ours["seconds"],
                              ours_rss=ours["peak_tree_mb"], base_s=base_s, base_rss=base["peak_tree_mb"],
                              first_step=times, pipe_rss=pipe_rss)
            print(f"{name}: {n} shards, {nbytes / 2**20:.0f} MiB, {tokens:,} tokens | build ours {ours['seconds']:.1f} s "
                  f"({tokens / ours['seconds']:,.0f} tokens/s, peak RSS tree {ours['peak_tree_mb']:.0f} MiB) vs datasets "
                  f"{base_s:.1f} s ({tokens / base_s:,.0f} tokens/s, {base['peak_tree_mb']:.0f} MiB) -> "
                  f"{base_s / ours['seconds']:.2f}x | launch to first step: first run {times[0]:.1f} s, second "
                  f"{times[1]:.1f} s | data pipeline RSS of one rank {pipe_rss:.0f} MiB", flush=True)
        if args.pipeline_only:
            h, f = rows["half"], rows["full"]
            print(f"\nsummary: data pipeline RSS of one rank: half {h['pipe_rss']:.0f} MiB, full {f['pipe_rss']:.0f} MiB "
                  f"(full/half {f['pipe_rss'] / h['pipe_rss']:.3f}, goal flat)")
            return
        # one 10 MB shard (1/100 of 1 GB at full scale) added to the full corpus
        add = _make_shards(src, tmp / "full", max(1, total // 100), 1, offset=args.shards)[0]
        added = _tree_peak([sys.executable, "-m", "data.corpus", "build", "--corpus_path", str(tmp / "full"),
                            "--tokenizer", str(tok_dir), "--num_workers", str(args.workers), "--no_progress"],
                           env={"CORPUS_CACHE_DIR": str(tmp / "cache_full")})
        h, f = rows["half"], rows["full"]
        print(f"\nsummary ({args.scale_mb} MiB full scale):")
        print(f"  build tokens/s ours / datasets: half {h['base_s'] / h['ours_s']:.2f}x, full {f['base_s'] / f['ours_s']:.2f}x "
              f"(goal >= 1.5x)")
        print(f"  peak RSS tree of our build: half {h['ours_rss']:.0f} MiB, full {f['ours_rss']:.0f} MiB, full/half "
              f"{f['ours_rss'] / h['ours_rss']:.2f} (goal <= 1.10, < 500 MiB); datasets {h['base_rss']:.0f} / "
              f"{f['base_rss']:.0f} MiB")
        print(f"  launch to first step, caches present: half {h['first_step'][1]:.1f} s, full {f['first_step'][1]:.1f} s "
              f"(goal < 10 s, flat)")
        print(f"  add a {add.stat().st_size / 2**20:.1f} MiB shard: {added['seconds']:.1f} s = "
              f"{100 * added['seconds'] / f['ours_s']:.1f}% of the full build ({f['ours_s']:.1f} s; goal < 5%)")
        print(f"  data pipeline RSS of one rank: half {h['pipe_rss']:.0f} MiB, full {f['pipe_rss']:.0f} MiB "
              f"(full/half {f['pipe_rss'] / h['pipe_rss']:.2f}, goal flat)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/data/nsmc/reviews_corpus.txt"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one on the corpus)")
    ap.add_argument("--vocab_size", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scale", action="store_true", help="scale mode: a sharded corpus made on the fly (see above)")
    ap.add_argument("--scale_mb", type=int, default=1024, help="scale mode: full corpus size in MiB (half is measured too)")
    ap.add_argument("--shards", type=int, default=100, help="scale mode: shards of the full corpus")
    ap.add_argument("--pipeline_only", action="store_true",
                    help="scale mode: build with ours only and measure one rank's data pipeline RSS (no datasets, no runs)")
    ap.add_argument("--child", choices=["ours", "datasets", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "pipeline":
        return _pipeline_child(args)
    if args.child:
        return _child(args)
    if args.scale:
        return _scale(args)

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
