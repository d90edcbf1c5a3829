"""Weight names shared with Hugging Face BERT and ModernBERT, one table each, used in both directions.

Our fused qkv projection corresponds to HF's separate query/key/value (concatenated on dim 0).
Only configs HF's BertModel can express map: transformer, post-LN, no experts, no layer
sharing, no factorized embeddings (trainer.export renames the BERT table for ALBERT and
RoBERTa-PreLayerNorm). Folders of the families that are BERT under other names, RoBERTa / XLM-R
and ELECTRA, are read through BERT's names (`roberta_as_bert`, `electra_as_bert`); `config_from_hf`
reads the config.json of every family we import.
"""
from __future__ import annotations

import dataclasses

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

# Fine-tuning heads vs BertForSequenceClassification (our classify head is BERT's pooler, dropout and
# classifier) and BertForQuestionAnswering (the span head is its qa_outputs).
TASK_HEAD_KEYS: list[tuple[str, str | tuple[str, ...]]] = [
    ("classifier_head.pooler.dense.weight", "bert.pooler.dense.weight"),
    ("classifier_head.pooler.dense.bias", "bert.pooler.dense.bias"),
    ("classifier_head.classifier.weight", "classifier.weight"),
    ("classifier_head.classifier.bias", "classifier.bias"),
    ("span_head.qa_outputs.weight", "qa_outputs.weight"),
    ("span_head.qa_outputs.bias", "qa_outputs.bias"),
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
              heads: bool = False, task_heads: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """Pairs (our key, HF keys) for every mapped tensor. For BertModel use hf_prefix "" and
    heads False; for BertForPreTraining/BertForMaskedLM hf_prefix "bert." (heads True maps the
    pretrain heads of a PretrainModel, ours_prefix then "encoder."); task_heads adds the classify
    and MRC heads (BertForSequenceClassification, BertForQuestionAnswering)."""
    check_hf_compatible(config)
    rows = list(EMBEDDING_KEYS)
    for i in range(config.num_hidden_layers):
        rows += [(o.format(i=i), tuple(h.format(i=i) for h in ((hf,) if isinstance(hf, str) else hf)))
                 for o, hf in LAYER_KEYS]
    table = [(ours_prefix + o, tuple(hf_prefix + h for h in ((hf,) if isinstance(hf, str) else hf)))
             for o, hf in rows]
    if heads:
        table += [(o, (hf,)) for o, hf in HEAD_KEYS]
    if task_heads:
        table += [(o, (hf,)) for o, hf in TASK_HEAD_KEYS]
    return table


def bert_config_from_hf(d: dict, family: str = "BERT") -> ModelConfig:
    """Our ModelConfig from a transformers BertConfig's dict (config.json); refuses what we cannot compute."""
    by_hf = OURS_BY_HF_ACTIVATION
    act = d.get("hidden_act", "gelu")
    problems = [f"no {key}" for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "max_position_embeddings") if key not in d]
    if act not in by_hf:
        problems.append(f"hidden_act {act!r} (supported: {sorted(by_hf)})")
    if d.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {d['position_embedding_type']!r} (only absolute)")
    if d.get("is_decoder") or d.get("add_cross_attention"):
        problems.append("a decoder (is_decoder / add_cross_attention)")
    if d.get("hidden_dropout_prob", 0.1) != d.get("attention_probs_dropout_prob", 0.1):
        problems.append(f"hidden_dropout_prob {d.get('hidden_dropout_prob', 0.1)} != attention_probs_dropout_prob "
                        f"{d.get('attention_probs_dropout_prob', 0.1)} (we have one dropout_prob)")
    if problems:
        raise ValueError(f"this {family} config has no equivalent here: " + ", ".join(problems))
    return ModelConfig(model_type="transformer", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       num_hidden_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                       ff_dim=d["intermediate_size"], act_fn=by_hf[act], dropout_prob=d.get("hidden_dropout_prob", 0.1),
                       initializer_range=d.get("initializer_range", 0.02),
                       max_position_embedding=d["max_position_embeddings"], type_vocab_size=d.get("type_vocab_size", 2),
                       LN_eps=d.get("layer_norm_eps", 1e-12), ln_pos=1, layer_group=1, n_experts=1,
                       pad_token_id=d.get("pad_token_id", 0) or 0)


# RoBERTa = BERT but for two things: positions are numbered from pad_token_id + 1 (real tokens of a
# right-padded row get pad + 1 + i) and one token type. Its folders read as our BERT: the position
# table from that offset on, the token-type row doubled (our pairs mark segments 0 and 1; both rows
# equal, so the imported model computes RoBERTa's outputs), its heads under BERT's names.
ROBERTA_TYPES = ("roberta", "xlm-roberta")
ROBERTA_RENAMES = [("roberta.", "bert."), ("lm_head.dense.", "cls.predictions.transform.dense."),
                   ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
                   ("lm_head.decoder.weight", "cls.predictions.decoder.weight"),
                   ("lm_head.bias", "cls.predictions.bias"),
                   ("classifier.dense.", "bert.pooler.dense."), ("classifier.out_proj.", "classifier.")]


def _renamed(key: str, renames: list[tuple[str, str]]) -> str:
    """`key` with the first matching prefix of `renames` replaced."""
    return next((new + key[len(old):] for old, new in renames if key.startswith(old)), key)


def _roberta_offset(d: dict) -> int:
    return (d.get("pad_token_id", 1) or 0) + 1


def roberta_embedding(name: str, t: Tensor, offset: int) -> Tensor:
    """A RoBERTa embedding table as ours (`name` ends with its weight's name): positions from the padding
    offset on, a single token-type row doubled; any other tensor as it is."""
    if name.endswith("embeddings.position_embeddings.weight"):
        return t[offset:]
    if name.endswith("embeddings.token_type_embeddings.weight") and t.shape[0] == 1:
        return torch.cat([t, t])
    return t


def roberta_config_from_hf(d: dict) -> ModelConfig:
    """Our (BERT) ModelConfig for a transformers RoBERTa / XLM-R config.json."""
    config = bert_config_from_hf(d, family="RoBERTa")
    positions = d["max_position_embeddings"] - _roberta_offset(d)
    if positions < 1:
        raise ValueError(f"this RoBERTa config has no equivalent here: max_position_embeddings "
                         f"{d['max_position_embeddings']} leaves no position after the padding offset "
                         f"(pad_token_id + 1 = {_roberta_offset(d)})")
    return dataclasses.replace(config, max_position_embedding=positions, type_vocab_size=max(2, config.type_vocab_size))


# ELECTRA (KoELECTRA) = BERT's encoder with factorized embeddings (embeddings_project, as ALBERT's);
# its generator's MLM head is BERT's at the embedding width, with gelu. Its discriminator head
# (replaced-token detection) and classification head (dense, gelu, out_proj: not BERT's tanh pooler)
# have no counterpart here.
ELECTRA_RENAMES = [("electra.", "bert."), ("generator_predictions.dense.", "cls.predictions.transform.dense."),
                   ("generator_predictions.LayerNorm.", "cls.predictions.transform.LayerNorm."),
                   ("generator_lm_head.weight", "cls.predictions.decoder.weight"),
                   ("generator_lm_head.bias", "cls.predictions.bias")]


def _embedding_size(d: dict, config: ModelConfig) -> int | None:
    """Our embedding_size for an ALBERT / ELECTRA config.json's (their default 128): None (not factorized)
    where it is the hidden size."""
    embedding = d.get("embedding_size", 128)
    return None if embedding == config.hidden_size else embedding


def electra_config_from_hf(d: dict) -> ModelConfig:
    """Our (BERT, possibly factorized) ModelConfig for a transformers ELECTRA config.json."""
    config = bert_config_from_hf(d, family="ELECTRA")
    return dataclasses.replace(config, embedding_size=_embedding_size(d, config))


def electra_as_bert(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(an ELECTRA state dict under BERT's names, our embedding projection's weights or {})."""
    out, projection = {}, {}
    for key, t in hf_state.items():
        key = _renamed(key, ELECTRA_RENAMES)
        if key.removeprefix("bert.").startswith("embeddings_project."):
            projection["encoder.embeddings.projection." + key.rsplit(".", 1)[1]] = t
        else:
            out[key] = t
    return out, projection


def albert_config_from_hf(d: dict) -> ModelConfig:
    """Our ModelConfig (post-LN transformer, `layer_group` consecutive layers sharing weights, factorized
    embeddings) for a transformers ALBERT config.json; refuses what we cannot compute."""
    config = bert_config_from_hf(dict(d, hidden_act=d.get("hidden_act", "gelu_new")), family="ALBERT")
    groups, layers = d.get("num_hidden_groups", 1), d["num_hidden_layers"]
    problems = []
    if d.get("inner_group_num", 1) != 1:
        problems.append(f"inner_group_num {d['inner_group_num']} (we share whole layers: 1)")
    if layers % groups:
        problems.append(f"num_hidden_layers {layers} not a multiple of num_hidden_groups {groups}")
    if problems:
        raise ValueError("this ALBERT config has no equivalent here: " + ", ".join(problems))
    return dataclasses.replace(config, layer_group=layers // groups, embedding_size=_embedding_size(d, config))


def roberta_prelayernorm_config_from_hf(d: dict) -> ModelConfig:
    """Our pre-LN transformer for a transformers RoBERTa-PreLayerNorm config.json (what we export pre-LN
    models as): RoBERTa's position offset and token types (`roberta_config_from_hf`), ln_pos 0."""
    return dataclasses.replace(roberta_config_from_hf(d), ln_pos=0)


def roberta_as_bert(hf_state: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """A RoBERTa state dict under BERT's names (`bert_from_hf_state` reads it): positions from the
    padding offset on, the token-type rows doubled to two, lm_head as cls.predictions, the
    classification head's dense as BERT's pooler and out_proj as its classifier (the same function:
    tanh(dense(<s>)) then a linear layer). lm_head.decoder.bias is lm_head.bias."""
    offset, out = _roberta_offset(hf_config), {}
    for key, t in hf_state.items():
        if key == "lm_head.decoder.bias":
            continue
        key = _renamed(key, ROBERTA_RENAMES)
        out[key] = roberta_embedding(key, t, offset)
    return out


# per family: the weight that shows each head when a folder's config names no class (ModernBERT's
# classification and QA heads share their names, so only its class tells them apart), and the
# (decoder, word embeddings) of its MLM class, whose decoder may be untied
HEAD_MARKERS = {"bert": {"mlm": "cls.predictions.bias", "classify": "classifier.weight", "qa": "qa_outputs.weight"},
                "modernbert": {"mlm": "decoder.bias"}}
DECODER_KEYS = {"modernbert": ("decoder.weight", "model.embeddings.tok_embeddings.weight"),
                "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
                "albert": ("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight"),
                "roberta-prelayernorm": ("lm_head.decoder.weight",
                                         "roberta_prelayernorm.embeddings.word_embeddings.weight")}


def head_kind(family: str, architecture: str | None, hf_state: dict[str, Tensor]) -> str | None:
    """Which of our heads the head of a `family` ("bert", "modernbert") folder is: "classify"
    (...ForSequenceClassification), "qa" (...ForQuestionAnswering), "mlm" (...ForMaskedLM, and
    BertForPreTraining, whose NSP classifier is not our SOP head) or None (the encoder alone)."""
    arch, markers = architecture or "", HEAD_MARKERS[family]
    for kind, suffix in (("classify", "ForSequenceClassification"), ("qa", "ForQuestionAnswering")):
        if arch.endswith(suffix) or (not arch and markers.get(kind) in hf_state):
            return kind
    return "mlm" if markers["mlm"] in hf_state else None


def _joined(hf_state: dict[str, Tensor], hf: tuple[str, ...]) -> Tensor:
    """Our tensor from its HF tensor(s) (several: concatenated on dim 0, e.g. query/key/value)."""
    return torch.cat([hf_state[h] for h in hf]) if len(hf) > 1 else hf_state[hf[0]]


def bert_from_hf_state(hf_state: dict[str, Tensor], config: ModelConfig, architecture: str | None = None,
                       sop: bool = False) -> dict[str, Tensor]:
    """A BertModel / BertForMaskedLM / BertForPreTraining / BertForSequenceClassification /
    BertForQuestionAnswering state dict -> ours (encoder, plus the MLM, classify or MRC head when
    present; `sop`: BertForPreTraining's sequence classifier is our SOP head, as in our own exports).
    Missing encoder weights raise KeyError naming them."""
    prefix = "bert." if any(k.startswith("bert.") for k in hf_state) else ""
    kind = head_kind("bert", architecture, hf_state)
    wanted = {"mlm": ("mlm_head.", "sop_head.") if sop else ("mlm_head.",), "classify": ("classifier_head.",),
              "qa": ("span_head.",)}.get(kind, ())
    out = {}
    for ours, hf in key_table(config, hf_prefix=prefix, heads=True, task_heads=True):
        if not ours.startswith("encoder."):
            hf = tuple(h.replace("bert.", prefix, 1) for h in hf)
            if not ours.startswith(wanted) or not all(h in hf_state for h in hf):
                continue
        missing = [h for h in hf if h not in hf_state]
        if missing:
            raise KeyError(f"BERT weights lack {missing[0]}")
        out[ours] = _joined(hf_state, hf)
    return out


def hf_to_ours(hf_state: dict[str, Tensor], config: ModelConfig, **table_kwargs) -> dict[str, Tensor]:
    """HF BERT state dict -> ours (missing HF keys raise KeyError naming them)."""
    return {ours: _joined(hf_state, hf) for ours, hf in key_table(config, **table_kwargs)}


def ours_to_hf(state: dict[str, Tensor], config: ModelConfig, **table_kwargs) -> dict[str, Tensor]:
    """Our state dict -> HF BERT names (the inverse of hf_to_ours; tied decoder weights and
    HF-only buffers are left to the HF model's load_state_dict(strict=False))."""
    out: dict[str, Tensor] = {}
    for ours, hf in key_table(config, **table_kwargs):
        parts = state[ours].chunk(len(hf)) if len(hf) > 1 else (state[ours],)
        out.update(zip(hf, parts))
    return out


# --- ModernBERT (transformers.ModernBertModel / ModernBertForMaskedLM) -------------------
# (our name, HF name); "{i}" is the layer index. Layer 0 has no attention norm (HF neither).
MODERNBERT_EMBEDDING_KEYS: list[tuple[str, str]] = [
    ("embeddings.word_embeddings.weight", "embeddings.tok_embeddings.weight"),
    ("embeddings.norm.weight", "embeddings.norm.weight"),
]
MODERNBERT_LAYER_KEYS: list[tuple[str, str]] = [
    ("layers.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
    ("layers.{i}.attn.qkv.weight", "layers.{i}.attn.Wqkv.weight"),
    ("layers.{i}.attn.out.weight", "layers.{i}.attn.Wo.weight"),
    ("layers.{i}.mlp_norm.weight", "layers.{i}.mlp_norm.weight"),
    ("layers.{i}.mlp.fc_in.weight", "layers.{i}.mlp.Wi.weight"),
    ("layers.{i}.mlp.fc_out.weight", "layers.{i}.mlp.Wo.weight"),
]
MODERNBERT_FINAL_KEYS: list[tuple[str, str]] = [("final_norm.weight", "final_norm.weight")]
# The MLM head of a pretrain task model vs ModernBertForMaskedLM (decoder.weight is tied).
MODERNBERT_HEAD_KEYS: list[tuple[str, str]] = [
    ("mlm_head.dense.weight", "head.dense.weight"),
    ("mlm_head.norm.weight", "head.norm.weight"),
    ("mlm_head.bias", "decoder.bias"),
]
# Fine-tuning heads vs ModernBertForSequenceClassification / ModernBertForQuestionAnswering (both
# name their prediction head "head" and their output layer "classifier").
MODERNBERT_CLASSIFY_KEYS: list[tuple[str, str]] = [
    ("classifier_head.head.dense.weight", "head.dense.weight"),
    ("classifier_head.head.norm.weight", "head.norm.weight"),
    ("classifier_head.classifier.weight", "classifier.weight"),
    ("classifier_head.classifier.bias", "classifier.bias"),
]
MODERNBERT_QA_KEYS: list[tuple[str, str]] = [
    ("span_head.head.dense.weight", "head.dense.weight"),
    ("span_head.head.norm.weight", "head.norm.weight"),
    ("span_head.qa_outputs.weight", "classifier.weight"),
    ("span_head.qa_outputs.bias", "classifier.bias"),
]
MODERNBERT_HEADS = {"mlm": MODERNBERT_HEAD_KEYS, "classify": MODERNBERT_CLASSIFY_KEYS, "qa": MODERNBERT_QA_KEYS}
# transformers' ModernBertConfig fields our ModelConfig holds under another name (same meaning).
MODERNBERT_CONFIG_KEYS: list[tuple[str, str]] = [
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("ff_dim", "intermediate_size"),
    ("max_position_embedding", "max_position_embeddings"), ("initializer_range", "initializer_range"),
    ("LN_eps", "norm_eps"), ("pad_token_id", "pad_token_id"), ("local_attention", "local_attention"),
    ("global_attn_every_n_layers", "global_attn_every_n_layers"),
]
HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
# the transformers activation names that compute one of ours (the same function under another name too)
OURS_BY_HF_ACTIVATION = {v: k for k, v in HF_ACTIVATIONS.items()} | {"swish": "swish", "gelu_python": "gelu",
                                                                      "gelu_new": "gelu_tanh"}


def modernbert_key_table(config: ModelConfig, ours_prefix: str = "encoder.", hf_prefix: str = "model.",
                         heads: bool | str = True) -> list[tuple[str, str]]:
    """Pairs (our key, HF key). ModernBertForMaskedLM: hf_prefix "model.", heads True (or "mlm");
    ModernBertForSequenceClassification / ...ForQuestionAnswering: heads "classify" / "qa";
    ModernBertModel: hf_prefix "", heads False."""
    if config.model_type != "modernbert":
        raise ValueError(f"model_type {config.model_type!r} is not modernbert")
    rows = list(MODERNBERT_EMBEDDING_KEYS)
    for i in range(config.num_hidden_layers):
        rows += [(o.format(i=i), h.format(i=i)) for o, h in MODERNBERT_LAYER_KEYS
                 if not (i == 0 and ".attn_norm." in o)]
    rows += MODERNBERT_FINAL_KEYS
    table = [(ours_prefix + o, hf_prefix + h) for o, h in rows]
    if heads:
        table += MODERNBERT_HEADS["mlm" if heads is True else heads]
    return table


def modernbert_hf_config(config: ModelConfig, **extra) -> dict:
    """transformers.ModernBertConfig keyword arguments computing the same function as `config`."""
    kwargs = {hf: getattr(config, ours) for ours, hf in MODERNBERT_CONFIG_KEYS}
    activation = HF_ACTIVATIONS[config.act_fn]
    kwargs.update(hidden_activation=activation, classifier_activation=activation, classifier_pooling="cls",
                  classifier_dropout=config.dropout_prob,
                  embedding_dropout=config.dropout_prob, attention_dropout=config.dropout_prob,
                  mlp_dropout=config.dropout_prob, norm_bias=False, attention_bias=False, mlp_bias=False,
                  classifier_bias=False, decoder_bias=True, tie_word_embeddings=True,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": config.local_rope_theta}})
    return kwargs | extra


def modernbert_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a ModernBertConfig's dict (config.json); refuses what we cannot compute."""
    problems = [f"{key} {hf[key]!r}" for key in ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias")
                if hf.get(key)]
    if hf.get("decoder_bias") is False:
        problems.append("decoder_bias false")
    act = hf.get("hidden_activation", "gelu")
    if hf.get("classifier_activation", act) != act:
        problems.append(f"classifier_activation {hf['classifier_activation']!r} != hidden_activation {act!r}")
    by_hf = OURS_BY_HF_ACTIVATION
    if act not in by_hf:
        problems.append(f"hidden_activation {act!r} (supported: {sorted(by_hf)})")
    layer_types = hf.get("layer_types")
    every = hf.get("global_attn_every_n_layers", 3)
    if layer_types is not None:
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        every = full[1] - full[0] if len(full) > 1 else len(layer_types)
        expected = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(len(layer_types))]
        if layer_types != expected:
            problems.append(f"layer_types {layer_types} (we place global attention every n layers from layer 0)")
    rope = hf.get("rope_parameters") or {}
    for kind in ("full_attention", "sliding_attention"):
        if (rope.get(kind) or {}).get("rope_type", "default") != "default":
            problems.append(f"rope_parameters[{kind!r}] type {rope[kind]['rope_type']!r} (only default RoPE)")
    dropouts = {hf.get(k, 0.0) for k in ("embedding_dropout", "attention_dropout", "mlp_dropout")}
    if len(dropouts) > 1:
        problems.append(f"different embedding/attention/mlp dropouts {sorted(dropouts)} (we have one dropout_prob)")
    if problems:
        raise ValueError("this ModernBERT config has no equivalent here: " + ", ".join(problems))
    values = {ours: hf[k] for ours, k in MODERNBERT_CONFIG_KEYS if k in hf}
    values["global_attn_every_n_layers"] = every
    window = values.get("local_attention")
    if isinstance(window, int) and not isinstance(window, bool) and window > 2 and window % 2:
        values["local_attention"] = window - 1  # transformers sees local_attention // 2 each side: 7 is 6's window
    return ModelConfig(model_type="modernbert", ln_pos=0, act_fn=by_hf[act], dropout_prob=float(dropouts.pop()),
                       global_rope_theta=float((rope.get("full_attention") or {}).get(
                           "rope_theta", hf.get("global_rope_theta", 160000.0))),
                       local_rope_theta=float((rope.get("sliding_attention") or {}).get(
                           "rope_theta", hf.get("local_rope_theta", 10000.0))),
                       **values)


def modernbert_from_hf_state(hf_state: dict[str, Tensor], config: ModelConfig,
                             architecture: str | None = None) -> dict[str, Tensor]:
    """A ModernBertForMaskedLM, ...ForSequenceClassification (classifier_pooling "cls"),
    ...ForQuestionAnswering or ModernBertModel state dict -> ours (encoder, plus the head when ours
    has it; `architecture` is the config's architectures[0]). Missing encoder weights raise KeyError
    naming them."""
    prefix = "model." if any(k.startswith("model.") for k in hf_state) else ""
    kind = head_kind("modernbert", architecture, hf_state) if prefix else None
    out = {}
    for ours, hf in modernbert_key_table(config, hf_prefix=prefix, heads=kind or False):
        if hf in hf_state:
            out[ours] = hf_state[hf]
        elif ours.startswith("encoder."):
            raise KeyError(f"ModernBERT weights lack {hf}")
    return out


def untied_decoder(hf_config: dict, hf_state: dict[str, Tensor]) -> bool:
    """Whether a ...ForMaskedLM folder decodes with its own matrix rather than the word embeddings
    (`tie_word_embeddings` false and a decoder weight that differs from them)."""
    decoder_key, embeddings_key = DECODER_KEYS.get(hf_config.get("model_type"), (None, None))
    decoder, embeddings = hf_state.get(decoder_key), hf_state.get(embeddings_key)
    return (hf_config.get("tie_word_embeddings", True) is False and decoder is not None
            and not (embeddings is not None and decoder.shape == embeddings.shape and torch.equal(decoder, embeddings)))


def modernbert_to_hf_state(state: dict[str, Tensor], config: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Our task model's weights -> ModernBertForMaskedLM names (decoder.weight tied to the
    embeddings, left to transformers), or ...ForSequenceClassification / ...ForQuestionAnswering names
    for a classify / mrc model. Returns (HF state, our keys without an HF counterpart)."""
    out, used = {}, set()
    kind = next((k for k, rows in MODERNBERT_HEADS.items() if rows[-1][0] in state), False)
    for ours, hf in modernbert_key_table(config, heads=kind):
        if ours in state:
            out[hf] = state[ours]
            used.add(ours)
        elif ours.startswith("encoder."):
            raise KeyError(f"checkpoint lacks encoder weight {ours}")
    return out, sorted(set(state) - used)


# keys every config.json of the families we read has (save_pretrained writes them all) and ours never
HF_CONFIG_KEYS = frozenset({"num_attention_heads", "intermediate_size", "max_position_embeddings"})


def is_hf_config(d: dict) -> bool:
    """A `transformers` config.json, not our ModelConfig JSON: written by save_pretrained (its
    `transformers_version`, `architectures`), or one without those two (hand-written or trimmed) whose
    `model_type` is not ours ("bert", "roberta", ...) or is "modernbert" with transformers' key names.
    A config of our "transformer" / "mix_lm" types is ours, whatever keys it holds (a key of theirs is
    then named as unknown, with our name for it)."""
    if not isinstance(d, dict):
        return False
    if "transformers_version" in d or "architectures" in d:
        return True
    model_type = d.get("model_type", "transformer")
    if not isinstance(model_type, str) or model_type in ("transformer", "mix_lm"):
        return False
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    return bool(unknown) and (model_type != "modernbert" or bool(unknown & HF_CONFIG_KEYS))


def config_from_hf(d: dict) -> ModelConfig:
    """Our ModelConfig for a `transformers` config.json that we can import (BERT, RoBERTa / XLM-R, ALBERT,
    ELECTRA, RoBERTa-PreLayerNorm, ModernBERT)."""
    readers = {"bert": bert_config_from_hf, "roberta": roberta_config_from_hf, "xlm-roberta": roberta_config_from_hf,
               "albert": albert_config_from_hf, "electra": electra_config_from_hf,
               "roberta-prelayernorm": roberta_prelayernorm_config_from_hf, "modernbert": modernbert_config_from_hf}
    if d.get("model_type") in readers:
        return readers[d["model_type"]](d)
    raise ValueError(f"a transformers {d.get('model_type')!r} config: only BERT, RoBERTa (XLM-R), ALBERT, "
                     f"ELECTRA, RoBERTa-PreLayerNorm and ModernBERT folders can be read as our model; for others, "
                     f"start from one of our checkpoints or configs/")
