"""Training throughput (tokens/s) of our models vs `transformers` models of identical dimensions,
in one process, interleaved, fp32, fused AdamW step included; MFU against a measured matmul peak.
Our BERT-family variants run against HF `BertForMaskedLM`, our ModernBERT against HF
`ModernBertForMaskedLM` (same dimensions, built by models.hf_compat.modernbert_hf_config);
`--compile` adds our models with each encoder layer torch.compile'd as `--compile` trains them.

    python bench/model_throughput.py                     # small (hidden 256 / 4 layers) + modernbert-small, seq 128
    python bench/model_throughput.py --config bert-base --compile
                                                         # BERT-base size, batch 8: transformer + modernbert-base
    python bench/model_throughput.py --config bert-base --only transformer --full_last_layer
                                                         # + the last layer over every position (ablation)
    python bench/model_throughput.py --config bert-base --only transformer --separate_embedding_grad
                                                         # + nn.Embedding's own weight gradient (ablation)
    python bench/model_throughput.py --config bert-base --only transformer --torch_dropout
                                                         # + torch's CPU dropout and SDPA dropout (ablation)
    python bench/model_throughput.py --config bert-base --only transformer --autograd_split
                                                         # + q, k, v split / RoPE through autograd (ablation)
    python bench/model_throughput.py --config bert-base --only transformer --device_reads
                                                         # + masked rows / padding read from the device (ablation)
    python bench/model_throughput.py --quick             # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import format_table, interleaved_medians, measure_matmul_peak
import models.dropout
import models.encoder
from models import ModelConfig, build_model, estimate_flops_per_token, load_config
from models.qkv import plain_split_heads
from models.tasks import pretrain_hints
from trainer.engines.base import compile_layers

TARGET_RATIO = 1.5             # our BERT vs HF BERT (at BERT-base size)
MODERNBERT_TARGET_RATIO = 1.3  # our ModernBERT vs HF ModernBERT
COMPILE_TARGET_RATIO = 1.2     # --compile vs eager
# the ModernBERT config of the same size as each BERT-family config name
MODERNBERT_OF = {"small": "modernbert-small", "bert-base": "modernbert-base"}
HF_BERT, HF_MODERNBERT = "HF BertForMaskedLM", "HF ModernBertForMaskedLM"


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


def hf_modernbert_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from models.hf_compat import modernbert_hf_config
    specials = dict(bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)  # ours: [CLS] 2, [SEP] 3
    return ModernBertForMaskedLM(ModernBertConfig(**modernbert_hf_config(cfg, **specials), attn_implementation="sdpa"))


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """Each encoder layer compiled in place, as --compile does (trainer.engines.base.compile_layers)."""
    compile_layers(model, torch.device("cpu"))
    return model


def full_last_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its last encoder layer computed at every position (no QueryRows): the ablation
    of the last layer computed only at the rows the heads read."""
    enc = model.encoder
    enc.__class__ = type(f"Full{type(enc).__name__}", (type(enc),), {"supports_query_rows": False})
    return model


def separate_embedding_grad(model: torch.nn.Module) -> torch.nn.Module:
    """The model with nn.Embedding's lookup gradient (a (V, D) tensor of zeros, then summed with the
    decoder's into a third): the ablation of the shared gradient tensor (models.tied)."""
    model.encoder.embeddings.word_embeddings.usable = lambda: False
    return model


def forward_patched(model: torch.nn.Module, module, name: str, value) -> torch.nn.Module:
    """The model with `module.name` replaced by `value` while its forward runs."""
    forward = model.forward

    def patched_forward(*args, **kwargs):
        with mock.patch.object(module, name, value):
            return forward(*args, **kwargs)
    model.forward = patched_forward
    return model


def torch_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The model with torch's dropout and SDPA's attention dropout (models.dropout's fast path off):
    the ablation of the 16-bit keep masks."""
    return forward_patched(model, models.dropout, "_levels", lambda x, p: 0)


def device_reads(model: torch.nn.Module) -> torch.nn.Module:
    """The model called without models.tasks.pretrain_hints: it reads whether the batch has padding
    and where the masked rows are from the device (a GPU sync each; on the CPU nearly free)."""
    forward = model.forward

    def forward_without_hints(*args, **kwargs):
        return forward(*args, **{k: v for k, v in kwargs.items() if k != "padded" and not k.startswith("rows_")})
    model.forward = forward_without_hints
    return model


def autograd_split(model: torch.nn.Module) -> torch.nn.Module:
    """The model with q, k, v taken from the fused projection (and RoPE applied) by plain ops, whose
    gradients autograd stacks and copies back: the ablation of models.qkv.split_heads."""
    return forward_patched(model, models.encoder, "split_heads", plain_split_heads)


# ablation flag -> (row suffix, how to make the model, what the row's absence saves, the flag's help)
ABLATIONS = {
    "full_last_layer": ("full last layer", full_last_layer, "the last layer only at the masked rows",
                        "add our transformer and ModernBERT with the last layer computed at every position "
                        "(what computing it only at the masked rows and [CLS] saves)"),
    "separate_embedding_grad": ("separate embedding gradient", separate_embedding_grad,
                                "one gradient tensor for the embeddings and the tied decoder",
                                "add our transformer and ModernBERT with nn.Embedding's own weight gradient (what "
                                "sharing one gradient tensor between the lookup and the tied decoder saves)"),
    "torch_dropout": ("torch dropout", torch_dropout, "dropout masks from 64-bit draws, kept as bools",
                      "add our transformer and ModernBERT with torch's CPU dropout and SDPA attention dropout "
                      "(what models.dropout's keep masks save)"),
    "autograd_split": ("autograd split", autograd_split,
                       "q, k, v gradients (RoPE's too) written into the projection's layout",
                       "add our transformer and ModernBERT with q, k, v split and RoPE'd by plain ops through "
                       "autograd (what models.qkv.split_heads saves)"),
    "device_reads": ("device reads", device_reads, "the masked rows and padding known on the host",
                     "add our transformer and ModernBERT reading the masked rows and the padding from the device "
                     "in the forward (what the collate's models.tasks.pretrain_hints save: a sync each on a GPU)"),
}


def ablation_rows(args, name: str, cfg: ModelConfig, baseline: str) -> dict:
    """Our model `name` once per ablation flag set in args: table rows (model, config, is HF, baseline)."""
    return {f"{name}, {suffix}": (make(build_model(cfg, "pretrain", objective="mlm")), cfg, False, baseline)
            for flag, (suffix, make, _, _) in ABLATIONS.items() if getattr(args, flag)}


def make_batch(cfg: ModelConfig, batch: int, seq: int, mask_prob: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (batch, seq), generator=g)
    picked = torch.rand(batch, seq, generator=g) < mask_prob
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    ids = torch.where(picked, torch.full_like(ids, 4), ids)  # [MASK]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}, labels


def train_step_fn(model: torch.nn.Module, batch: dict, labels: torch.Tensor, hf: bool):
    # fused AdamW on both sides: our engines' optimizer (trainer.engines.base.adamw_kwargs) and the
    # default of HF's Trainer ("adamw_torch_fused" since torch 2.8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    # ours: the batch as the training collate makes it, with the host's hints (no device reads)
    inputs = batch | {"labels": labels} if hf else batch | {"mlm_labels": labels}
    if not hf:
        inputs |= pretrain_hints({k: v.cpu() for k, v in inputs.items()}, "mlm")
        inputs = {k: v.to(labels.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def step():
        out = model(**inputs)
        loss = out.loss if hf else out["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="model config name or JSON path (bert-base: the BERT-base mode)")
    p.add_argument("--modernbert", default=None,
                   help="ModernBERT config to run against HF ModernBertForMaskedLM (default: modernbert-small "
                        "for small, modernbert-base for bert-base, none otherwise; 'none' leaves it out)")
    p.add_argument("--compile", action="store_true", help="add our transformer and ModernBERT with compiled layers")
    for flag, (_, _, _, help_text) in ABLATIONS.items():
        p.add_argument(f"--{flag}", action="store_true", help=help_text)
    p.add_argument("--batch_size", type=int, default=None, help="default 32; 8 for --config bert-base")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--mask_prob", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median taken)")
    p.add_argument("--steps_per_rep", type=int, default=2)
    p.add_argument("--only", nargs="*", help="subset of our BERT-family variants to run "
                                             "(default all; transformer only for bert-base)")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 reps of 1 step")
    args = p.parse_args(argv)
    base_mode = Path(args.config).stem.removesuffix("_config") == "bert-base"
    if args.batch_size is None:
        args.batch_size = 8 if base_mode else 32
    if args.only is None and base_mode:
        args.only = ["transformer"]
    if args.quick:
        args.batch_size, args.reps, args.steps_per_rep = 8, 2, 1
    modern_name = args.modernbert or MODERNBERT_OF.get(Path(args.config).stem.removesuffix("_config"), "none")

    torch.manual_seed(0)
    base = load_config(args.config)
    if args.seq_len > base.max_position_embedding:
        p.error(f"--seq_len {args.seq_len} exceeds the config's max_position_embedding ({base.max_position_embedding})")
    # name -> (model, config, is HF, baseline name)
    models = {HF_BERT: (hf_model(base), base, True, HF_BERT)}
    family = variants(base)
    for name, cfg in family.items():
        # an --only entry naming a variant exactly selects it alone, any other one by substring
        if not args.only or any(o == name if o in family else o in name for o in args.only):
            models[name] = (build_model(cfg, "pretrain", objective="mlm"), cfg, False, HF_BERT)
            if name == "transformer":
                models |= ablation_rows(args, name, cfg, HF_BERT)
            if args.compile and name == "transformer":
                models["transformer --compile"] = (compiled(build_model(cfg, "pretrain", objective="mlm")), cfg,
                                                   False, HF_BERT)
    modern = None if modern_name == "none" else load_config(modern_name)
    if modern is not None:
        if modern.model_type != "modernbert":
            raise SystemExit(f"--modernbert {modern_name}: model_type {modern.model_type!r}, not modernbert")
        if modern.vocab_size != base.vocab_size:
            modern = dataclasses.replace(modern, vocab_size=base.vocab_size)
        models[HF_MODERNBERT] = (hf_modernbert_model(modern), modern, True, HF_MODERNBERT)
        models[modern_name] = (build_model(modern, "pretrain", objective="mlm"), modern, False, HF_MODERNBERT)
        models |= ablation_rows(args, modern_name, modern, HF_MODERNBERT)
        if args.compile:
            models[f"{modern_name} --compile"] = (compiled(build_model(modern, "pretrain", objective="mlm")), modern,
                                                  False, HF_MODERNBERT)
    batch, labels = make_batch(base, args.batch_size, args.seq_len, args.mask_prob)
    steps = {name: train_step_fn(m, batch, labels, hf) for name, (m, _, hf, _) in models.items()}
    for fn in steps.values():  # warm-up: allocator, AdamW state, compilation (forward and backward)
        fn()
        fn()

    peak = measure_matmul_peak()
    secs = interleaved_medians(steps, args.reps, args.steps_per_rep)
    peak = (peak + measure_matmul_peak()) / 2  # before and after, the load varies
    tokens = args.batch_size * args.seq_len
    tps = {name: tokens / s for name, s in secs.items()}
    rows = []
    for name, (model, cfg, hf, baseline) in models.items():
        frac = 1.0 if hf else args.mask_prob
        flops = estimate_flops_per_token(cfg, args.seq_len, frac, query_rows=not name.endswith("full last layer"))
        rows.append({"model": name, "params (M)": f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}",
                     "tokens/s": f"{tps[name]:,.0f}", "vs HF": f"{tps[name] / tps[baseline]:.2f}x",
                     "HF baseline": baseline.removeprefix("HF "),
                     "GFLOP/token": f"{flops / 1e9:.3f}", "MFU": f"{100 * flops * tps[name] / peak:.1f}%"})
    print(f"config {args.config}: hidden {base.hidden_size}, layers {base.num_hidden_layers}, "
          f"heads {base.num_heads}, ff {base.ff_dim}, vocab {base.vocab_size}; batch "
          f"{args.batch_size} x seq {args.seq_len}, {args.mask_prob:.0%} masked, fp32, fused AdamW; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{', LD_PRELOAD=' + os.environ['LD_PRELOAD'] if os.environ.get('LD_PRELOAD') else ''}")
    if modern is not None:
        print(f"{modern_name}: hidden {modern.hidden_size}, layers {modern.num_hidden_layers}, heads "
              f"{modern.num_heads}, GeGLU {modern.ff_dim}, window {modern.local_attention}, global every "
              f"{modern.global_attn_every_n_layers}")
    print(f"matmul peak (2048^3 fp32): {peak / 1e9:.1f} GFLOP/s; median of {args.reps} interleaved "
          f"reps x {args.steps_per_rep} steps; the HF models' MFU counts their MLM head over all tokens "
          f"(ModernBERT's sparse_prediction off, its default)")
    print(format_table(rows, ["model", "params (M)", "tokens/s", "vs HF", "HF baseline", "GFLOP/token", "MFU"]))
    checks = [("transformer", HF_BERT, TARGET_RATIO), (modern_name, HF_MODERNBERT, MODERNBERT_TARGET_RATIO),
              ("transformer --compile", "transformer", COMPILE_TARGET_RATIO),
              (f"{modern_name} --compile", modern_name, COMPILE_TARGET_RATIO)]
    for ours in ("transformer", modern_name):
        for suffix, _, what, _ in ABLATIONS.values():
            if f"{ours}, {suffix}" in tps and ours in tps:
                print(f"{ours} / {ours}, {suffix} = {tps[ours] / tps[f'{ours}, {suffix}']:.2f}x ({what})")
    for ours, other, target in checks:
        if ours in tps and other in tps:
            ratio = tps[ours] / tps[other]
            print(f"{ours} / {other} = {ratio:.2f}x (target >= {target}x): {'met' if ratio >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
