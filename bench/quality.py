"""Quality per step: our pretraining vs a run_mlm-style `transformers` baseline of the same size.

Both models are trained on the same slice of the shared NSMC corpus, with the same WordPiece
vocabulary (trained by our CLI on that slice), batch, sequence length, optimizer, schedule and
number of steps, then scored by the same code:

- held-out MLM loss / accuracy on documents (movies) that neither saw, with fixed masks, in two
  layouts: `reviews` (one review per row as `[CLS] review [SEP]`, the layout fine-tuning sees)
  and `blocks` (run_mlm's layout: `[CLS] line [SEP]` concatenated and cut into full rows);
- NSMC sentiment accuracy after one fine-tuning epoch (`BertForSequenceClassification`, same
  rows, same recipe, length-bucketed batches), over several seeds (mean and spread).

Ours runs the product: `train.py` in a subprocess, then `python -m trainer.export` to a
`BertForMaskedLM` folder. The baseline is `BertForMaskedLM` trained the way `run_mlm.py` does
it (`DataCollatorForLanguageModeling`, 15% masking, 80/10/10, full 128-token blocks).

    python bench/quality.py                        # 300 steps, 4 fine-tuning seeds (~20 min, 2 cores)
    python bench/quality.py --steps 1000           # the longer check
    python bench/quality.py --ours "--objective sop" --ours "--objective mlm" --skip_baseline
    python bench/quality.py --quick                # smoke run (seconds)

Each `--ours "FLAGS"` adds one row trained with those extra train.py flags (default: the
defaults); `--arch modernbert` among them trains a `modernbert` model of the same width, depth,
heads and parameters instead (exported to `ModernBertForMaskedLM`, scored by the same code). Results are written to OUT/results.json and printed as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench.common import format_table

DATA = ROOT.parent / "shared" / "data"
SPECIAL_IDS_NEVER_MASKED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOD]")


def read_documents(path: Path, max_lines: int | None = None) -> list[list[str]]:
    """Documents of a .dat corpus (blank line between documents), in file order."""
    docs, cur, n = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                if cur:
                    docs.append(cur)
                    cur = []
                continue
            cur.append(line)
            n += 1
            if max_lines and n >= max_lines:
                break
    if cur:
        docs.append(cur)
    return docs


def is_heldout(doc_index: int, every: int = 20) -> bool:
    """A stable 1-in-`every` choice of documents by a hash of their position."""
    return zlib.crc32(str(doc_index).encode()) % every == 0


def make_split(out: Path, train_lines: int, eval_reviews: int) -> tuple[Path, list[str]]:
    """train.dat (documents not held out, first `train_lines` reviews) and held-out reviews."""
    docs = read_documents(DATA / "nsmc" / "reviews_corpus.txt")
    train, heldout, n = [], [], 0
    for i, doc in enumerate(docs):
        if is_heldout(i):
            heldout.extend(doc)
        elif n < train_lines:
            train.append(doc[:train_lines - n])
            n += len(train[-1])
    path = out / "train.dat"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n\n".join("\n".join(d) for d in train) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path, heldout[:eval_reviews]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if res.returncode:
        raise SystemExit(f"command failed ({res.returncode}), see {log}:\n  {shlex.join(cmd)}\n"
                         + log.read_text()[-3000:])
    return time.perf_counter() - t0


def model_config(args, vocab_size: int, arch: str = "transformer") -> dict:
    if arch == "modernbert":  # the same width/depth/heads; GeGLU's two input halves at 2/3 of ff: equal parameters
        return {"model_type": "modernbert", "vocab_size": vocab_size, "hidden_size": args.hidden,
                "num_hidden_layers": args.layers, "num_heads": args.heads, "ff_dim": args.ff * 2 // 3 // 8 * 8,
                "act_fn": "gelu", "dropout_prob": 0.0, "initializer_range": 0.02, "max_position_embedding": 1024,
                "type_vocab_size": 2, "LN_eps": 1e-5, "ln_pos": 0, "layer_group": 1, "n_experts": 1,
                "kernel_size": 9, "pad_token_id": 0, "global_attn_every_n_layers": 3,
                "local_attention": args.seq_len // 2, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0}
    return {"model_type": "transformer", "vocab_size": vocab_size, "hidden_size": args.hidden,
            "num_hidden_layers": args.layers, "num_heads": args.heads, "ff_dim": args.ff, "act_fn": "gelu",
            "dropout_prob": 0.1, "initializer_range": 0.02, "max_position_embedding": 512,
            "type_vocab_size": 2, "LN_eps": 1e-12, "ln_pos": 1, "layer_group": 1, "n_experts": 1,
            "kernel_size": 9}


def split_arch(extra: str) -> tuple[str, str]:
    """`--arch NAME` of a row's flags (ours: transformer, the default, or modernbert) and the rest."""
    words = shlex.split(extra)
    if "--arch" not in words:
        return "transformer", extra
    k = words.index("--arch")
    if k + 1 >= len(words) or words[k + 1] not in ("transformer", "modernbert"):
        raise SystemExit(f"--ours {extra!r}: --arch takes transformer or modernbert")
    return words[k + 1], shlex.join(words[:k] + words[k + 2:])


def train_ours(args, name: str, extra: str, corpus: Path, tok: Path, config: Path, out: Path) -> tuple[Path, float]:
    hf_dir = out / f"{name}.hf"
    if (hf_dir / "config.json").exists():
        return hf_dir, json.loads((out / f"{name}.time.json").read_text())["seconds"]
    cmd = [sys.executable, "train.py", "--model_name", name, "--output_dir", str(out / "runs"),
           "--corpus_path", str(corpus), "--tokenizer", str(tok), "--model", str(config),
           "--train_batch_size", str(args.batch), "--max_seq_length", str(args.seq_len),
           "--learning_rate", str(args.lr), "--warmup_steps", str(max(1, args.steps // 10)),
           "--num_steps", str(args.steps), "--logging_steps", str(max(1, args.steps // 10)),
           "--save_steps", "0", "--seed", str(args.seed), "--no_progress"] + shlex.split(extra)
    seconds = run(cmd, out / f"{name}.log")
    run([sys.executable, "-m", "trainer.export", str(out / "runs" / name / "final"), str(hf_dir)],
        out / f"{name}.export.log")
    (out / f"{name}.time.json").write_text(json.dumps({"seconds": seconds, "cmd": shlex.join(cmd)}))
    return hf_dir, seconds


def hf_tokenizer(tok_dir: Path):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]")


def run_mlm_blocks(ko_tok, lines: list[str], seq_len: int) -> torch.Tensor:
    """run_mlm.py without --line_by_line: each line tokenized with [CLS]/[SEP], concatenated,
    cut into full blocks of seq_len (the remainder dropped)."""
    ids: list[int] = []
    for chunk in range(0, len(lines), 4096):
        for enc in ko_tok.encode_batch(lines[chunk:chunk + 4096]):
            ids += [ko_tok.cls_id, *enc, ko_tok.sep_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def train_baseline(args, corpus: Path, tok_dir: Path, out: Path) -> tuple[Path, float]:
    hf_dir = out / "baseline.hf"
    if (hf_dir / "config.json").exists():
        return hf_dir, json.loads((out / "baseline.time.json").read_text())["seconds"]
    from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,
                              get_linear_schedule_with_warmup)
    from data.tokenizer import KoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    ko = KoTokenizer.load(tok_dir)
    lines = [ln for d in read_documents(corpus) for ln in d]
    blocks = run_mlm_blocks(ko, lines, args.seq_len)
    cfg = model_config(args, len(ko))
    model = BertForMaskedLM(BertConfig(
        vocab_size=cfg["vocab_size"], hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.ff, max_position_embeddings=512,
        layer_norm_eps=1e-12, pad_token_id=ko.pad_id))
    collator = DataCollatorForLanguageModeling(hf_tokenizer(tok_dir), mlm_probability=0.15)
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, eps=1e-6)
    sched = get_linear_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(blocks), generator=gen)
    model.train()
    for step in range(args.steps):
        idx = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        batch = collator([{"input_ids": b} for b in blocks[idx]])
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"[baseline] step {step + 1} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    model.save_pretrained(hf_dir)
    (out / "baseline.time.json").write_text(json.dumps({"seconds": seconds}))
    return hf_dir, seconds


def fixed_masks(ids: torch.Tensor, special: torch.Tensor, vocab: int, rate: float, seed: int,
                mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed 80/10/10 masking of `ids` (identical for every model scored)."""
    g = torch.Generator().manual_seed(seed)
    cand = ~special[ids]
    picked = (torch.rand(ids.shape, generator=g) < rate) & cand
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    rand_ids = torch.randint(len(SPECIAL_IDS_NEVER_MASKED), vocab, ids.shape, generator=g)
    inputs = torch.where(picked & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(picked & (r >= 0.8) & (r < 0.9), rand_ids, inputs)
    return inputs, labels


def heldout_sets(ko, reviews: list[str], seq_len: int) -> dict[str, tuple[torch.Tensor, ...]]:
    special = torch.from_numpy(ko.is_special())
    sets = {}
    sets["reviews"] = pad(sorted(encode_rows(ko, reviews, seq_len), key=len), ko.pad_id)[0]
    sets["blocks"] = run_mlm_blocks(ko, reviews, seq_len)
    out = {}
    for name, ids in sets.items():
        inputs, labels = fixed_masks(ids, special, len(ko), 0.15, seed=1234, mask_id=ko.mask_id)
        out[name] = (inputs, (ids != ko.pad_id).long(), labels)
    return out


@torch.no_grad()
def score_mlm(hf_dir: Path, sets: dict) -> dict[str, float]:
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    res = {}
    for name, (inputs, attn, labels) in sets.items():
        loss_sum, correct, count = 0.0, 0, 0
        for s in range(0, len(inputs), 64):
            w = int(attn[s:s + 64].sum(1).max())  # rows are sorted by length: no compute on padding
            logits = model(input_ids=inputs[s:s + 64, :w], attention_mask=attn[s:s + 64, :w]).logits
            lab = labels[s:s + 64, :w]
            m = lab != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[m], lab[m], reduction="sum").item()
            correct += int((logits[m].argmax(-1) == lab[m]).sum())
            count += int(m.sum())
        res[f"{name}_mlm_loss"] = loss_sum / count
        res[f"{name}_mlm_acc"] = correct / count
    return res


def read_sentiment(path: Path, n: int) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3 and parts[1].strip():
                texts.append(parts[1])
                labels.append(int(parts[2]))
                if len(texts) >= n:
                    break
    return texts, labels


def encode_rows(ko, texts: list[str], seq_len: int) -> list[list[int]]:
    return [[ko.cls_id, *e[:seq_len - 2], ko.sep_id] for e in ko.encode_batch(texts)]


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, (ids != pad_id).long()


def length_bucketed_batches(lengths: list[int], batch: int, seed: int, pool: int = 50) -> list[list[int]]:
    """A seeded shuffle, cut into pools of `pool` batches, each sorted by length and cut into batches,
    the batches shuffled: every row once, little padding (NSMC reviews are short and uneven)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    out = []
    for s in range(0, len(order), pool * batch):
        chunk = sorted(order[s:s + pool * batch], key=lambda i: lengths[i])
        out += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


def finetune_sentiment(hf_dir: Path, ko, train: tuple, test: tuple, seed: int, args) -> float:
    """One epoch of BertForSequenceClassification on the training rows; accuracy on the test rows."""
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=2)
    rows, labels = train
    batches = length_bucketed_batches([len(r) for r in rows], args.ft_batch, seed)
    steps = len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    model.train()
    for idx in batches:
        ids, attn = pad([rows[i] for i in idx], ko.pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    rows, labels = test
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    correct = 0
    with torch.no_grad():
        for s in range(0, len(rows), 128):
            idx = order[s:s + 128]
            ids, attn = pad([rows[i] for i in idx], ko.pad_id)
            pred = model(input_ids=ids, attention_mask=attn).logits.argmax(-1)
            correct += int((pred == torch.tensor([labels[i] for i in idx])).sum())
    return correct / len(rows)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="output/quality", help="working folder (reused: finished models are kept)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=1024)
    ap.add_argument("--vocab_size", type=int, default=8000)
    ap.add_argument("--train_lines", type=int, default=210_000, help="reviews of the pretraining slice")
    ap.add_argument("--eval_reviews", type=int, default=4000, help="held-out reviews scored for MLM")
    ap.add_argument("--ft_rows", type=int, default=8000, help="sentiment fine-tuning rows (one epoch)")
    ap.add_argument("--ft_test_rows", type=int, default=2000)
    ap.add_argument("--ft_batch", type=int, default=32)
    ap.add_argument("--ft_lr", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, default=4, help="fine-tuning seeds per model")
    ap.add_argument("--seed", type=int, default=42, help="pretraining seed")
    ap.add_argument("--ours", action="append", default=None,
                    help="extra train.py flags for one row of ours (repeat for several rows; default: '')")
    ap.add_argument("--skip_baseline", action="store_true")
    ap.add_argument("--skip_ours", action="store_true", help="no rows of ours (e.g. train the baseline alone, in parallel)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.train_lines, args.eval_reviews, args.ft_rows, args.ft_test_rows = 6, 3000, 200, 64, 64
        args.hidden, args.layers, args.heads, args.ff, args.vocab_size, args.seeds = 32, 1, 2, 64, 2000, 2
        args.out = args.out + "-quick"
    # OMP_NUM_THREADS, when set, caps the threads (two runs side by side: 1 each; oversubscribed
    # cores make small models' many short parallel regions stall)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)))))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the expected "pooler/classifier newly initialised" load reports
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("ours", "skip_baseline", "skip_ours", "quick", "out",
                                                                 "seeds")}
    settings_file = out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"{out} holds models trained with other settings ({settings_file}); "
                         f"pass another --out")
    settings_file.write_text(json.dumps(settings, indent=1))

    from data.tokenizer import KoTokenizer

    corpus, heldout = make_split(out, args.train_lines, args.eval_reviews)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        run([sys.executable, "-m", "data.tokenizer", "train", "--input", str(corpus), "--vocab_size",
             str(args.vocab_size), "--out", str(tok_dir), "--num_threads", "1"], out / "tokenizer.log")
    ko = KoTokenizer.load(tok_dir)
    config = out / "model_config.json"
    config.write_text(json.dumps(model_config(args, len(ko)), indent=1))

    models: dict[str, tuple[Path, float]] = {}
    for extra in [] if args.skip_ours else args.ours or [""]:
        label = f"ours {extra}".strip()
        crc = f"{zlib.crc32(extra.encode()):08x}"  # a row's models are found by its flags, whatever its position
        name = next((p.name[:-3] for p in sorted(out.glob(f"ours*-{crc}.hf")) if (p / "config.json").exists()),
                    f"ours-{crc}")
        arch, flags = split_arch(extra)
        row_config = config
        if arch != "transformer":
            row_config = out / f"model_config_{arch}.json"
            row_config.write_text(json.dumps(model_config(args, len(ko), arch), indent=1))
        models[label] = train_ours(args, name, flags, corpus, tok_dir, row_config, out)
    if not args.skip_baseline:
        models["run_mlm baseline"] = train_baseline(args, corpus, tok_dir, out)

    sets = heldout_sets(ko, heldout, args.seq_len)
    train_texts, train_labels = read_sentiment(DATA / "nsmc" / "sentiment_train.tsv", args.ft_rows)
    test_texts, test_labels = read_sentiment(DATA / "nsmc" / "sentiment_test.tsv", args.ft_test_rows)
    train = (encode_rows(ko, train_texts, args.seq_len), train_labels)
    test = (encode_rows(ko, test_texts, args.seq_len), test_labels)
    rows, results = [], {}
    for label, (hf_dir, seconds) in models.items():
        scored = hf_dir.with_suffix(".scores.json")  # scores are kept: a rerun adding rows scores only the new ones
        if scored.exists() and json.loads(scored.read_text())["seeds"] == args.seeds:
            res = json.loads(scored.read_text())["scores"]
        else:
            res = score_mlm(hf_dir, sets)
            res["sentiment_acc"] = [finetune_sentiment(hf_dir, ko, train, test, seed, args)
                                    for seed in range(args.seeds)]
            scored.write_text(json.dumps({"seeds": args.seeds, "scores": res}))
        print(f"[quality] scored {label} ({hf_dir.name})", flush=True)
        accs = res["sentiment_acc"]
        res |= {"pretrain_seconds": seconds}
        results[label] = res
        rows.append({"model": label, "reviews MLM acc": f"{100 * res['reviews_mlm_acc']:.2f}",
                     "reviews MLM loss": f"{res['reviews_mlm_loss']:.3f}",
                     "blocks MLM acc": f"{100 * res['blocks_mlm_acc']:.2f}",
                     "blocks MLM loss": f"{res['blocks_mlm_loss']:.3f}",
                     f"NSMC acc ({args.seeds} seeds)": mean_std(accs),
                     "pretrain s": f"{seconds:.0f}"})
        print(f"[quality] {label}: {rows[-1]}", flush=True)
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print(f"\n{args.steps} steps, batch {args.batch} x {args.seq_len}, hidden {args.hidden} x {args.layers} layers, "
          f"vocab {len(ko)}, {len(heldout)} held-out reviews; NSMC: {args.ft_rows} rows, 1 epoch, "
          f"{args.ft_test_rows} test rows")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
