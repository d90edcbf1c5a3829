"""Fine-tuning throughput on NSMC rows: --unpad auto (length-bucketed micro-batches, length-sorted
evaluation batches) vs --unpad off (random batches, each padded to its longest row), examples/s of
classify training steps (forward, backward, AdamW) and of evaluation, fp32, in one process,
interleaved. Both modes process the same rows (one epoch of the sampler per repetition) with
the same collate, sampler and model code the trainer uses.

    python bench/finetune_throughput.py                # small + modernbert-small, 2048 rows, batch 32, seq 128
    python bench/finetune_throughput.py --configs bert-base --rows 512
    python bench/finetune_throughput.py --quick        # smoke run: tiny configs, 128 rows
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from bench.common import format_table, interleaved_medians

SHARED = ROOT.parent / "shared" / "data" / "nsmc"
TARGET_RATIO = 2.0


def train_fn(model: torch.nn.Module, dataset, batches: list[list[int]]):
    """One epoch of training steps over `batches` (index lists), collated as the trainer does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        model.train()
        for rows in batches:
            out = model(**dataset.collate([dataset[i] for i in rows]))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def eval_fn(model: torch.nn.Module, dataset, order: np.ndarray, batch_size: int):
    """Logits of every row in batches of `batch_size`, taken in `order` and put back in row order."""
    def run():
        model.eval()
        logits = np.empty((len(order), model.num_labels), dtype=np.float32)
        with torch.no_grad():
            for lo in range(0, len(order), batch_size):
                rows = order[lo:lo + batch_size]
                logits[rows] = model(**dataset.collate([dataset[i] for i in rows]))["logits"].numpy()
        return logits
    return run


def padding(dataset, lengths: np.ndarray, batches) -> float:
    """Tokens computed per real token (the collate pads a batch to its longest row)."""
    computed = sum(dataset.collate([dataset[i] for i in rows])["input_ids"].numel() for rows in batches)
    return computed / sum(int(lengths[rows].sum()) for rows in batches)


def tokenizer_for(vocab_size: int, path: str | None, lines: int):
    """--tokenizer, else a WordPiece of the model's vocab_size trained on the head of the NSMC corpus."""
    from data.tokenizer import KoTokenizer, train_tokenizer

    if path:
        return KoTokenizer.load(path)
    tmp = Path(tempfile.mkdtemp(prefix="ft_bench_"))
    corpus = tmp / "corpus.dat"
    with open(SHARED / "reviews_corpus.txt", encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
        for i, line in zip(range(lines), src):
            dst.write(line)
    return train_tokenizer([corpus], vocab_size, tmp / "tokenizer")


def main(argv: list[str] | None = None) -> None:
    from data.classification import ClassificationDataset, load_classification_tsv
    from models import build_model, load_config
    from trainer.sampler import EpochSampler, example_lengths, length_sorted

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["small", "modernbert-small"],
                   help="model config names or JSON paths (dropout is set to 0 for steady timings)")
    p.add_argument("--train_file", default=str(SHARED / "sentiment_train.tsv"))
    p.add_argument("--rows", type=int, default=2048, help="training rows (the first N of --train_file)")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32, help="training micro-batch")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: one trained on the head of the NSMC corpus with the "
                        "first config's vocab_size)")
    p.add_argument("--tokenizer_lines", type=int, default=100_000, help="corpus lines for that tokenizer")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of one epoch (median taken)")
    p.add_argument("--quick", action="store_true", help="tiny configs, 128 rows, batch 16, 2 reps")
    args = p.parse_args(argv)
    if args.quick:
        args.configs = [str(ROOT / "tests" / "configs" / "tiny_transformer.json"),
                        str(ROOT / "tests" / "configs" / "tiny_modernbert.json")]
        args.rows, args.batch_size, args.eval_batch_size, args.reps = 128, 16, 32, 2
        args.max_seq_length, args.tokenizer_lines = 64, 20_000
    if args.rows < args.batch_size:
        raise SystemExit(f"--rows {args.rows} is below --batch_size {args.batch_size}")

    configs = {name: dataclasses.replace(load_config(name), dropout_prob=0.0) for name in args.configs}
    vocab = next(iter(configs.values())).vocab_size
    t0 = time.perf_counter()
    tok = tokenizer_for(2000 if args.quick else vocab, args.tokenizer, args.tokenizer_lines)
    examples = load_classification_tsv(args.train_file, limit=args.rows)
    ds = ClassificationDataset(examples, tok, args.max_seq_length, 2)
    lengths = example_lengths(ds)
    rows = (len(ds) // args.batch_size) * args.batch_size
    plain = list(EpochSampler(rows, args.batch_size, 1, 0, seed=0).batches(0))
    bucketed = list(EpochSampler(rows, args.batch_size, 1, 0, seed=0, lengths=lengths[:rows]).batches(0))
    eval_plain = np.arange(len(ds))
    eval_sorted = length_sorted(lengths)
    print(f"{len(ds)} NSMC rows from {args.train_file}, tokenizer vocab {tok.vocab_size} "
          f"({time.perf_counter() - t0:.0f} s to prepare): {lengths.mean():.1f} tokens per row on average "
          f"(median {np.median(lengths):.0f}, max {lengths.max()}, max_seq_length {args.max_seq_length}, "
          f"{ds.num_truncated} cut)")
    eval_batches = lambda order: [order[i:i + args.eval_batch_size] for i in range(0, len(order), args.eval_batch_size)]
    print(f"tokens computed per real token: training {padding(ds, lengths, plain):.2f} (--unpad off) vs "
          f"{padding(ds, lengths, bucketed):.2f} (auto); evaluation {padding(ds, lengths, eval_batches(eval_plain)):.2f}"
          f" vs {padding(ds, lengths, eval_batches(eval_sorted)):.2f}")

    table, ratios = [], []
    for name, cfg in configs.items():
        if cfg.vocab_size < tok.vocab_size:
            cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
        torch.manual_seed(0)
        models = {mode: build_model(cfg, "classify", num_labels=2) for mode in ("off", "auto")}
        models["auto"].load_state_dict(models["off"].state_dict())
        fns = {"train off": train_fn(models["off"], ds, plain), "train auto": train_fn(models["auto"], ds, bucketed),
               "eval off": eval_fn(models["off"], ds, eval_plain, args.eval_batch_size),
               "eval auto": eval_fn(models["auto"], ds, eval_sorted, args.eval_batch_size)}
        same = np.abs(fns["eval off"]() - fns["eval auto"]()).max()  # also the warm-up
        for key in ("train off", "train auto"):
            fns[key]()
        secs = interleaved_medians(fns, args.reps)
        for kind, n in (("train", rows), ("eval", len(ds))):
            off, auto = n / secs[f"{kind} off"], n / secs[f"{kind} auto"]
            ratios.append((name, kind, auto / off))
            table.append({"config": name, "what": kind, "--unpad off ex/s": f"{off:,.1f}",
                          "--unpad auto ex/s": f"{auto:,.1f}", "auto / off": f"{auto / off:.2f}x"})
        print(f"{name}: eval logits auto vs off, largest difference {same:.1e} (before training)")
    print(f"batch {args.batch_size} (eval {args.eval_batch_size}) x max_seq_length {args.max_seq_length}, fp32, "
          f"AdamW; median of {args.reps} interleaved reps of one epoch ({rows} training rows); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(table, ["config", "what", "--unpad off ex/s", "--unpad auto ex/s", "auto / off"]))
    for name, kind, ratio in ratios:
        if kind == "train":
            print(f"{name} classify training, unpadded / padded = {ratio:.2f}x (target >= {TARGET_RATIO}x): "
                  f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
