"""GPU training throughput and MFU (bf16 autocast) of our models vs HF BertForMaskedLM of the
same dimensions, and of our ModernBERT vs HF ModernBertForMaskedLM, against the device's bf16 dense
peak (spec sheet) and a measured bf16 matmul.

    python bench/gpu_mfu.py                          # bert-base dims + modernbert-base, batch 32 x seq 512, on cuda
    python bench/gpu_mfu.py --quick                  # fewer reps, batch 16 x seq 128
    python bench/gpu_mfu.py --device cpu --config tests/configs/tiny_transformer.json --seq_len 64 --quick
        # smoke test of the code path only (no spec peak; MFU vs the measured matmul)

Without a CUDA device (and without --device cpu) it exits with status 2 and says so.
The models, batch and train step come from bench/model_throughput.py; one step = forward,
backward and an AdamW update. MFU = model FLOPs per token (models.estimate_flops_per_token;
our MLM head runs on the masked tokens only, HF's on all tokens) x tokens/s / peak. "host ms" is
the time the host takes to issue one step without waiting for the GPU: close to "step ms", the
step is launch-bound (a larger batch or --compile helps more than faster kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import format_table, interleaved_medians, issue_seconds, measure_matmul_peak

# bf16 dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s; first match wins.
BF16_PEAK: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM5
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


def spec_peak(device_name: str) -> float | None:
    for key, flops in BF16_PEAK:
        if key.lower() in device_name.lower():
            return flops
    return None


def main(argv: list[str] | None = None) -> int:
    from bench.model_throughput import (ABLATIONS, HF_BERT, HF_MODERNBERT, MODERNBERT_OF, ablation_rows, hf_model,
                                        hf_modernbert_model, make_batch, train_step_fn, variants)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="bert-base", help="model config name or JSON path")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--mask_prob", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median taken)")
    p.add_argument("--steps_per_rep", type=int, default=5)
    p.add_argument("--only", nargs="*", help="subset of our variants to run")
    p.add_argument("--no_hf", action="store_true", help="skip the HF models")
    p.add_argument("--modernbert", default=None,
                   help="ModernBERT config run against HF ModernBertForMaskedLM (default: modernbert-base for "
                        "bert-base, modernbert-small for small, none otherwise; 'none' leaves it out)")
    p.add_argument("--compile", nargs="?", const="whole", choices=["whole", "layers"], default=None,
                   help="torch.compile every model first: whole (the default: torch.compile(model), HF's too) or "
                        "layers (ours each encoder layer in place, as the trainer's --compile; HF's whole)")
    p.add_argument("--dropout_prob", type=float, default=None,
                   help="dropout of every model, ours and HF's (default: the config's; ModernBERT trains with 0)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--quick", action="store_true", help="batch 16, seq <= 128, 3 reps of 2 steps")
    for flag, (_, _, _, help_text) in ABLATIONS.items():
        p.add_argument(f"--{flag}", action="store_true", help=help_text)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.reps, args.steps_per_rep = 16, 3, 2
        args.seq_len = min(args.seq_len, 128)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_mfu.py measures GPU MFU and needs a GPU "
              "(use --device cpu only to smoke-test the code path)", file=sys.stderr)
        return 2

    from models import build_model, estimate_flops_per_token, load_config
    from trainer.engines.base import compile_layers

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = load_config(args.config)
    if args.dropout_prob is not None:
        base = dataclasses.replace(base, dropout_prob=args.dropout_prob)
    if args.seq_len > base.max_position_embedding:
        p.error(f"--seq_len {args.seq_len} exceeds the config's max_position_embedding "
                f"({base.max_position_embedding})")
    # name -> (model, config, is HF, its HF baseline)
    models: dict[str, tuple[torch.nn.Module, object, bool, str]] = {}
    if not args.no_hf:
        models[HF_BERT] = (hf_model(base), base, True, HF_BERT)
    for name, cfg in variants(base).items():
        if not args.only or any(o in name for o in args.only):
            models[name] = (build_model(cfg, "pretrain", objective="mlm"), cfg, False, HF_BERT)
            if name == "transformer":
                models |= ablation_rows(args, name, cfg, HF_BERT)
    modern_name = args.modernbert or MODERNBERT_OF.get(Path(args.config).stem.removesuffix("_config"), "none")
    if modern_name != "none":
        modern = dataclasses.replace(load_config(modern_name), vocab_size=base.vocab_size)
        if args.dropout_prob is not None:
            modern = dataclasses.replace(modern, dropout_prob=args.dropout_prob)
        if modern.model_type != "modernbert":
            p.error(f"--modernbert {modern_name}: model_type {modern.model_type!r}, not modernbert")
        if not args.no_hf:
            models[HF_MODERNBERT] = (hf_modernbert_model(modern), modern, True, HF_MODERNBERT)
        models[modern_name] = (build_model(modern, "pretrain", objective="mlm"), modern, False, HF_MODERNBERT)
        models |= ablation_rows(args, modern_name, modern, HF_MODERNBERT)
    batch, labels = make_batch(base, args.batch_size, args.seq_len, args.mask_prob)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = labels.to(device)
    steps = {}
    for name, (model, _, hf, _) in models.items():
        model.to(device)
        if args.compile == "layers" and not hf:
            compile_layers(model, device)
            fwd = model
        else:
            fwd = torch.compile(model) if args.compile else model
        step = train_step_fn(fwd, batch, labels, hf)

        def bf16_step(step=step):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                step()
        steps[name] = bf16_step
    for fn in steps.values():          # warm-up: kernels, allocator, AdamW state, compilation
        fn()
        fn()

    n = 8192 if device.type == "cuda" else 1024
    measured = measure_matmul_peak(n, reps=10, dtype=torch.bfloat16, device=str(device))
    secs = interleaved_medians(steps, args.reps, args.steps_per_rep, device=str(device))
    measured = max(measured, measure_matmul_peak(n, reps=10, dtype=torch.bfloat16, device=str(device)))
    issue = {name: issue_seconds(fn, str(device)) for name, fn in steps.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = spec_peak(name) if device.type == "cuda" else None
    tokens = args.batch_size * args.seq_len
    rows = []
    for mname, (model, cfg, hf, baseline) in models.items():
        tps = tokens / secs[mname]
        flops = estimate_flops_per_token(cfg, args.seq_len, 1.0 if hf else args.mask_prob)
        row = {"model": mname, "params (M)": f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}",
               "tokens/s": f"{tps:,.0f}",
               "step ms": f"{secs[mname] * 1e3:.1f}", "host ms": f"{issue[mname] * 1e3:.1f}",
               "vs HF": (f"{secs[baseline] / secs[mname]:.2f}x ({baseline.removeprefix('HF ')})"
                         if baseline in secs else ""),
               "GFLOP/token": f"{flops / 1e9:.3f}", "TFLOP/s": f"{flops * tps / 1e12:.1f}",
               "MFU (spec)": f"{100 * flops * tps / spec:.1f}%" if spec else "n/a",
               "MFU (measured)": f"{100 * flops * tps / measured:.1f}%"}
        if device.type == "cuda":
            row["max mem (GB)"] = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}"
        rows.append(row)
    print(f"device {name}; bf16 peak: spec {spec / 1e12:.0f} TFLOP/s" if spec else
          f"device {name}; bf16 peak: spec unknown", end="")
    print(f", measured {measured / 1e12:.1f} TFLOP/s ({n}^3 bf16 matmul)")
    print(f"config {args.config}: hidden {base.hidden_size}, layers {base.num_hidden_layers}, heads "
          f"{base.num_heads}, ff {base.ff_dim}, vocab {base.vocab_size}; batch {args.batch_size} x seq "
          f"{args.seq_len}, {args.mask_prob:.0%} masked, dropout {base.dropout_prob:g}; bf16 autocast, AdamW"
          f"{', torch.compile (' + args.compile + ')' if args.compile else ''}; torch {torch.__version__}"
          f"{', CUDA ' + torch.version.cuda if torch.version.cuda else ''}; median of {args.reps} "
          f"interleaved reps x {args.steps_per_rep} steps; HF FLOPs count its head over all tokens")
    cols = ["model", "params (M)", "tokens/s", "step ms", "host ms", "vs HF", "GFLOP/token", "TFLOP/s", "MFU (spec)",
            "MFU (measured)"] + (["max mem (GB)"] if device.type == "cuda" else [])
    print(format_table(rows, cols))
    if os.environ.get("LD_PRELOAD"):
        print(f"LD_PRELOAD={os.environ['LD_PRELOAD']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
