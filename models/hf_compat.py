"""Weight names shared with Hugging Face BERT, in one table used in both directions.

Our fused qkv projection corresponds to HF's separate query/key/value (concatenated on dim 0).
Only configs HF's BertModel can express map: transformer, post-LN, no experts, no layer
sharing, no factorized embeddings.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig

# (our name, HF name(s)); "{i}" is the layer index. Several HF names = concatenated on dim 0.
EMBEDDING_KEYS: list[tuple[str, str | tuple[str, ...]]] = [
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    ("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
    ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
]
LAYER_KEYS: list[tuple[str, str | tuple[str, ...]]] = [
    ("layers.{i}.mixer.qkv.weight", ("encoder.layer.{i}.attention.self.query.weight",
                                     "encoder.layer.{i}.attention.self.key.weight",
                                     "encoder.layer.{i}.attention.self.value.weight")),
    ("layers.{i}.mixer.qkv.bias", ("encoder.layer.{i}.attention.self.query.bias",
                                   "encoder.layer.{i}.attention.self.key.bias",
                                   "encoder.layer.{i}.attention.self.value.bias")),
    ("layers.{i}.mixer.out.weight", "encoder.layer.{i}.attention.output.dense.weight"),
    ("layers.{i}.mixer.out.bias", "encoder.layer.{i}.attention.output.dense.bias"),
    ("layers.{i}.mixer_norm.weight", "encoder.layer.{i}.attention.output.LayerNorm.weight"),
    ("layers.{i}.mixer_norm.bias", "encoder.layer.{i}.attention.output.LayerNorm.bias"),
    ("layers.{i}.ffn.fc_in.weight", "encoder.layer.{i}.intermediate.dense.weight"),
    ("layers.{i}.ffn.fc_in.bias", "encoder.layer.{i}.intermediate.dense.bias"),
    ("layers.{i}.ffn.fc_out.weight", "encoder.layer.{i}.output.dense.weight"),
    ("layers.{i}.ffn.fc_out.bias", "encoder.layer.{i}.output.dense.bias"),
    ("layers.{i}.ffn_norm.weight", "encoder.layer.{i}.output.LayerNorm.weight"),
    ("layers.{i}.ffn_norm.bias", "encoder.layer.{i}.output.LayerNorm.bias"),
]
# Heads of a pretrain task model vs BertForPreTraining (names after "bert."/"cls." prefixes).
HEAD_KEYS: list[tuple[str, str | tuple[str, ...]]] = [
    ("sop_head.pooler.dense.weight", "bert.pooler.dense.weight"),
    ("sop_head.pooler.dense.bias", "bert.pooler.dense.bias"),
    ("sop_head.classifier.weight", "cls.seq_relationship.weight"),
    ("sop_head.classifier.bias", "cls.seq_relationship.bias"),
    ("mlm_head.dense.weight", "cls.predictions.transform.dense.weight"),
    ("mlm_head.dense.bias", "cls.predictions.transform.dense.bias"),
    ("mlm_head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
    ("mlm_head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
    ("mlm_head.bias", "cls.predictions.bias"),
]


def check_hf_compatible(config: ModelConfig) -> None:
    problems = []
    if config.model_type != "transformer":
        problems.append(f"model_type {config.model_type!r}")
    if config.ln_pos != 1:
        problems.append("pre-LN (ln_pos 0)")
    if config.n_experts != 1:
        problems.append(f"n_experts {config.n_experts}")
    if config.layer_group != 1:
        problems.append(f"layer_group {config.layer_group}")
    if config.embedding_dim != config.hidden_size:
        problems.append(f"embedding_size {config.embedding_size}")
    if problems:
        raise ValueError("HF BertModel cannot express this config: " + ", ".join(problems))


def key_table(config: ModelConfig, ours_prefix: str = "encoder.", hf_prefix: str = "",
              heads: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """Pairs (our key, HF keys) for every mapped tensor. For BertModel use hf_prefix "" and
    heads False; for BertForPreTraining/BertForMaskedLM hf_prefix "bert." (heads True maps the
    pretrain heads of a PretrainModel, ours_prefix then "encoder.")."""
    check_hf_compatible(config)
    rows = list(EMBEDDING_KEYS)
    for i in range(config.num_hidden_layers):
        rows += [(o.format(i=i), tuple(h.format(i=i) for h in ((hf,) if isinstance(hf, str) else hf)))
                 for o, hf in LAYER_KEYS]
    table = [(ours_prefix + o, tuple(hf_prefix + h for h in ((hf,) if isinstance(hf, str) else hf)))
             for o, hf in rows]
    if heads:
        table += [(o, (hf,)) for o, hf in HEAD_KEYS]
    return table


def hf_to_ours(hf_state: dict[str, Tensor], config: ModelConfig, **table_kwargs) -> dict[str, Tensor]:
    """HF BERT state dict -> ours (missing HF keys raise KeyError naming them)."""
    return {ours: torch.cat([hf_state[h] for h in hf]) if len(hf) > 1 else hf_state[hf[0]]
            for ours, hf in key_table(config, **table_kwargs)}


def ours_to_hf(state: dict[str, Tensor], config: ModelConfig, **table_kwargs) -> dict[str, Tensor]:
    """Our state dict -> HF BERT names (the inverse of hf_to_ours; tied decoder weights and
    HF-only buffers are left to the HF model's load_state_dict(strict=False))."""
    out: dict[str, Tensor] = {}
    for ours, hf in key_table(config, **table_kwargs):
        parts = state[ours].chunk(len(hf)) if len(hf) > 1 else (state[ours],)
        out.update(zip(hf, parts))
    return out
