"""Training throughput (tokens/s) of our models vs HF BertForMaskedLM of identical dimensions,
in one process, interleaved, fp32, AdamW step included; MFU against a measured matmul peak.

    python bench/model_throughput.py                 # hidden 256 / 4 layers / vocab 32000 / seq 128
    python bench/model_throughput.py --quick         # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import format_table, interleaved_medians, measure_matmul_peak
from models import ModelConfig, build_model, estimate_flops_per_token, load_config

TARGET_RATIO = 1.5


def variants(base: ModelConfig) -> dict[str, ModelConfig]:
    return {
        "transformer": base,
        "transformer pre-LN": dataclasses.replace(base, ln_pos=0),
        "switch (4 experts)": dataclasses.replace(base, n_experts=4),
        "mix_lm (4 groups, k<=9)": dataclasses.replace(base, model_type="mix_lm", n_experts=4,
                                                       kernel_size=9),
        "albert (layer_group 4)": dataclasses.replace(base, layer_group=base.num_hidden_layers),
    }


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM
    return BertForMaskedLM(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ff_dim, hidden_act=cfg.act_fn,
        hidden_dropout_prob=cfg.dropout_prob, attention_probs_dropout_prob=cfg.dropout_prob,
        max_position_embeddings=cfg.max_position_embedding, layer_norm_eps=cfg.LN_eps))


def make_batch(cfg: ModelConfig, batch: int, seq: int, mask_prob: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (batch, seq), generator=g)
    picked = torch.rand(batch, seq, generator=g) < mask_prob
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    ids = torch.where(picked, torch.full_like(ids, 4), ids)  # [MASK]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}, labels


def train_step_fn(model: torch.nn.Module, batch: dict, labels: torch.Tensor, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    key = "labels" if hf else "mlm_labels"

    def step():
        out = model(**batch, **{key: labels})
        loss = out.loss if hf else out["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="model config name or JSON path")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--mask_prob", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median taken)")
    p.add_argument("--steps_per_rep", type=int, default=2)
    p.add_argument("--only", nargs="*", help="subset of our variants to run")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 reps of 1 step")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.reps, args.steps_per_rep = 8, 2, 1

    torch.manual_seed(0)
    base = load_config(args.config)
    models = {"HF BertForMaskedLM": (hf_model(base), base, True)}
    for name, cfg in variants(base).items():
        if not args.only or any(o in name for o in args.only):
            models[name] = (build_model(cfg, "pretrain", objective="mlm"), cfg, False)
    batch, labels = make_batch(base, args.batch_size, args.seq_len, args.mask_prob)
    steps = {name: train_step_fn(m, batch, labels, hf) for name, (m, _, hf) in models.items()}
    for fn in steps.values():  # warm-up: allocator, AdamW state
        fn()

    peak = measure_matmul_peak()
    secs = interleaved_medians(steps, args.reps, args.steps_per_rep)
    peak = (peak + measure_matmul_peak()) / 2  # before and after, the load varies
    tokens = args.batch_size * args.seq_len
    hf_tps = tokens / secs["HF BertForMaskedLM"]
    rows = []
    for name, (model, cfg, hf) in models.items():
        tps = tokens / secs[name]
        frac = 1.0 if hf else args.mask_prob
        flops = estimate_flops_per_token(cfg, args.seq_len, frac)
        rows.append({"model": name, "params (M)": f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}",
                     "tokens/s": f"{tps:,.0f}", "vs HF": f"{tps / hf_tps:.2f}x",
                     "GFLOP/token": f"{flops / 1e9:.3f}", "MFU": f"{100 * flops * tps / peak:.1f}%"})
    print(f"config {args.config}: hidden {base.hidden_size}, layers {base.num_hidden_layers}, "
          f"heads {base.num_heads}, ff {base.ff_dim}, vocab {base.vocab_size}; batch "
          f"{args.batch_size} x seq {args.seq_len}, {args.mask_prob:.0%} masked, fp32, AdamW; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{', LD_PRELOAD=' + os.environ['LD_PRELOAD'] if os.environ.get('LD_PRELOAD') else ''}")
    print(f"matmul peak (2048^3 fp32): {peak / 1e9:.1f} GFLOP/s; median of {args.reps} interleaved "
          f"reps x {args.steps_per_rep} steps; HF MFU counts its head over all tokens")
    print(format_table(rows, ["model", "params (M)", "tokens/s", "vs HF", "GFLOP/token", "MFU"]))
    ours = tokens / secs["transformer"] if "transformer" in secs else None
    if ours is not None:
        ratio = ours / hf_tps
        print(f"transformer / HF = {ratio:.2f}x (target >= {TARGET_RATIO}x): "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
