"""Export a trained model as a Hugging Face `transformers` folder, or in our own format with a
note where `transformers` has no architecture that computes the same function.

    python -m trainer.export SRC OUT [--tokenizer DIR] [--format auto|ours] [--verify] [--overwrite]

SRC: a step-N checkpoint (torch.distributed.checkpoint, fairscale or DeepSpeed), a final/
directory, a run directory (its final/, else its latest step-N) or a model.safetensors with
config.json beside it.

OUT: a new or empty folder, or an earlier export (it lists its files in `.written_by_trainer.json`),
which is replaced; another folder only with --overwrite, a run directory never (trainer/safety.py).

What each model becomes (`hf_target`):
- transformer, post-LN, no sharing, no factorized embeddings -> BERT (BertForMaskedLM/BertModel);
- transformer, post-LN, layer_group > 1 or embedding_size != hidden_size -> ALBERT
  (num_hidden_groups = distinct layers; AlbertForMaskedLM/AlbertModel);
- transformer, pre-LN, no sharing, no factorized embeddings -> RoBERTa-PreLayerNorm
  (its embeddings, per-sublayer LayerNorms and final LayerNorm are ours; positions are offset
  by pad_token_id + 1 as in RoBERTa, so padding positions get another position vector);
- modernbert -> ModernBERT (ModernBertForMaskedLM/ModernBertModel; the SOP head has no
  counterpart and is left out);
- anything else (Switch MoE, Mix LM, pre-LN with sharing or factorization): our weights and
  config plus EXPORT_NOTE.md.
The weight names come from `models.hf_compat.key_table` (the BERT table), renamed per target,
and `models.hf_compat.modernbert_key_table` for ModernBERT. A `transformers` folder is also read
as a source (`load_source`), so it can start a run (`--checkpoint FOLDER`) or be exported again:
BERT, ALBERT, RoBERTa-PreLayerNorm and ModernBERT by the same tables (`from_hf_state` for ALBERT and
RoBERTa-PreLayerNorm), RoBERTa / XLM-R and ELECTRA as the BERT they are (`_as_bert`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models import ModelConfig, build_model
from models import hf_compat
from models.config import hub_id_hint
from models.hf_compat import key_table
from trainer import checkpoint, safety

# Substring renames (each applied once, in order) from the BERT names of
# `key_table(..., hf_prefix="bert.", heads=True)`. BERT's own names need none.
RENAMES: dict[str, list[tuple[str, str]]] = {
    "bert": [],
    "albert": [
        ("bert.", "albert."),                              # first: "albert." contains "bert."
        ("albert.encoder.layer.", "albert.encoder.albert_layer_groups."),
        (".attention.self.", ".albert_layers.0.attention."),
        (".attention.output.dense.", ".albert_layers.0.attention.dense."),
        (".attention.output.LayerNorm.", ".albert_layers.0.attention.LayerNorm."),
        (".intermediate.dense.", ".albert_layers.0.ffn."),
        (".output.dense.", ".albert_layers.0.ffn_output."),
        (".output.LayerNorm.", ".albert_layers.0.full_layer_layer_norm."),
        ("albert.pooler.dense.", "albert.pooler."),
        ("cls.seq_relationship.", "sop_classifier.classifier."),
        ("cls.predictions.transform.", "predictions."),
        ("cls.predictions.", "predictions."),
    ],
    "roberta-prelayernorm": [
        ("bert.", "roberta_prelayernorm."),
        # pre-LN: our mixer_norm runs before attention, ffn_norm before the intermediate dense
        (".attention.output.LayerNorm.", ".attention.LayerNorm."),
        (".output.LayerNorm.", ".intermediate.LayerNorm."),
        ("cls.predictions.transform.dense.", "lm_head.dense."),
        ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
        ("cls.predictions.bias", "lm_head.bias"),
        # its classification head is BERT's pooler and classifier under other names
        ("roberta_prelayernorm.pooler.dense.", "classifier.dense."),
        ("classifier.weight", "classifier.out_proj.weight"),
        ("classifier.bias", "classifier.out_proj.bias"),
    ],
}
PREFIX = {"bert": "bert.", "albert": "albert.", "roberta-prelayernorm": "roberta_prelayernorm.",
          "modernbert": "model."}
CLASS_PREFIX = {"bert": "Bert", "albert": "Albert", "roberta-prelayernorm": "RobertaPreLayerNorm",
                "modernbert": "ModernBert"}


@dataclass
class Source:
    """Our task model's weights (keys "encoder.*", "mlm_head.*", ...) and what describes them."""
    state: dict[str, Tensor]
    config: ModelConfig
    tokenizer_dir: Path | None = None
    info: dict = field(default_factory=dict)       # path, kind, step, train_mode, objective


# --- reading ---------------------------------------------------------------------------
def _tokenizer_dir(candidates: list[Path | str | None], cwd: str | None = None) -> Path | None:
    """The first candidate holding tokenizer.json; a relative one (as a run records its --tokenizer)
    is looked for here, then in the run's working directory `cwd`."""
    for c in filter(None, candidates):
        for d in [Path(c), *([Path(cwd) / c] if cwd and not Path(c).is_absolute() else [])]:
            if (d / "tokenizer.json").is_file():
                return d
    return None


def load_source(src: str | Path) -> Source:
    """Read weights + model config from any of the forms listed in the module docstring."""
    src = Path(src)
    if src.is_dir() and (src / "config.json").is_file() and hf_compat.is_hf_config(
            json.loads((src / "config.json").read_text())):
        return _load_hf_source(src / "config.json")
    if src.is_dir() and not (src / checkpoint.META).is_file() and not (src / checkpoint.WEIGHTS).is_file():
        if (src / "final" / checkpoint.WEIGHTS).is_file():
            src = src / "final"
        elif found := checkpoint.list_checkpoints(src):
            src = found[-1]
        else:
            raise FileNotFoundError(f"{src}: not a step-N checkpoint, final/ directory or run directory "
                                    f"(no {checkpoint.META}, no {checkpoint.WEIGHTS}, no step-N/)")
    if src.is_dir() and (src / checkpoint.META).is_file():
        meta = checkpoint.read_meta(src)
        args = meta.get("args", {})
        return Source(checkpoint.read_step_weights(src), ModelConfig.from_dict(meta["model_config"]),
                      _tokenizer_dir([meta.get("tokenizer"), args.get("tokenizer")], args.get("cwd")),
                      {"path": str(src), "kind": "step", "step": meta.get("step"),
                       "train_mode": args.get("train_mode"), "objective": args.get("objective"),
                       "label_names": meta.get("label_names")})
    weights = src / checkpoint.WEIGHTS if src.is_dir() else src
    if not weights.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint or weights file{hub_id_hint(src)}")
    config_path = weights.parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} missing: an exported model needs its config.json beside "
                                f"{weights.name}")
    if hf_compat.is_hf_config(json.loads(config_path.read_text())):
        return _load_hf_source(config_path, weights)
    args_path = weights.parent / "args.json"
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    metadata = checkpoint.read_safetensors(weights, metadata_only=True)[1]
    step = metadata.get("step", "")
    return Source(checkpoint.load_weights(weights), ModelConfig.from_json(config_path),
                  _tokenizer_dir([weights.parent, args.get("tokenizer")], args.get("cwd")),
                  {"path": str(weights), "kind": "weights", "step": int(step) if step.isdigit() else None,
                   "train_mode": args.get("train_mode"), "objective": args.get("objective"),
                   "label_names": checkpoint.label_names_in(metadata)})


def _hf_weights_file(folder: Path) -> Path:
    """The folder's weights: model.safetensors, pytorch_model.bin, or the index of their shards (what
    save_pretrained(max_shard_size=...) writes for a model larger than that)."""
    for name in (checkpoint.WEIGHTS, checkpoint.HF_BIN, *checkpoint.HF_INDEXES):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: a transformers folder without model.safetensors or pytorch_model.bin "
                            f"(nor the index of their shards, {' / '.join(checkpoint.HF_INDEXES)})")


def _read_hf_file(weights: Path) -> dict[str, Tensor]:
    if weights.suffix == ".bin":
        try:
            return torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: name it
            raise checkpoint.CheckpointError(f"{weights}: cannot be read ({type(e).__name__}: {e})") from None
    return checkpoint.read_safetensors(weights)[0]


def _read_hf_weights(weights: Path) -> dict[str, Tensor]:
    """A transformers weights file, or all the shards an index (`*.index.json`) names, as one state dict."""
    if not weights.name.endswith(".index.json"):
        return _read_hf_file(weights)
    try:
        weight_map = json.loads(weights.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise checkpoint.CheckpointError(f"{weights}: not a shard index of transformers (a JSON object with a "
                                         f"\"weight_map\" of tensor name -> shard file: {e!r}); save the model "
                                         f"again with save_pretrained") from None
    missing = [name for name in shards if not (weights.parent / name).is_file()]
    if missing:
        raise checkpoint.CheckpointError(f"{weights} names {len(shards)} shard(s) and {len(missing)} are missing "
                                         f"beside it ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                                         f"copy the whole folder again")
    state: dict[str, Tensor] = {}
    for name in shards:
        state.update(_read_hf_file(weights.parent / name))
    return state


def _warn_left_out(weights: Path, why: str) -> None:
    print(f"[import] warning: {weights}: {why} is not imported; the encoder is", file=sys.stderr, flush=True)


def _without_head(state: dict[str, Tensor], prefix: str, weights: Path, why: str) -> dict[str, Tensor]:
    _warn_left_out(weights, why)
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _as_bert(hf_state: dict[str, Tensor], hf_config: dict, arch: str | None, weights: Path):
    """A RoBERTa / XLM-R or ELECTRA folder's (state, config, architecture) under BERT's names, and
    ELECTRA's embedding projection as our weights (None or {} without one): `hf_compat.roberta_as_bert`,
    `hf_compat.electra_as_bert`. ELECTRA heads without a counterpart here are named in a warning."""
    family, projection = hf_config["model_type"], None
    if family == "electra":
        hf_state, projection = hf_compat.electra_as_bert(hf_state)
        lost = ("its replaced-token detection head" if any(k.startswith("discriminator_") for k in hf_state) else
                "its classification head (dense, gelu, out_proj; ours is BERT's tanh pooler)"
                if "classifier.dense.weight" in hf_state else None)
        if lost:
            _warn_left_out(weights, f"{lost} has no counterpart here, so it")
    else:
        hf_state = hf_compat.roberta_as_bert(hf_state, hf_config)
    for name in ("XLMRoberta", "Roberta", "Electra"):
        arch = arch and arch.replace(name, "Bert")
    return hf_state, dict(hf_config, model_type="bert"), arch, projection


def _load_hf_source(config_path: Path, weights: Path | None = None) -> Source:
    """A `transformers` BERT, RoBERTa / XLM-R, ELECTRA, ALBERT, RoBERTa-PreLayerNorm or ModernBERT folder
    (ours exported, or anyone's) as our weights and config; `weights` default: the folder's
    (`_hf_weights_file`), looked for once the config is known to be ours."""
    hf_config = json.loads(config_path.read_text())
    config = hf_compat.config_from_hf(hf_config)
    weights = weights or _hf_weights_file(config_path.parent)
    hf_state = _read_hf_weights(weights)
    family = hf_config["model_type"]
    arch = (hf_config.get("architectures") or [None])[0]
    projection = None  # ELECTRA's embeddings_project (our factorized embeddings' projection)
    if family in (*hf_compat.ROBERTA_TYPES, "electra"):
        hf_state, hf_config, arch, projection = _as_bert(hf_state, hf_config, arch, weights)
    table = hf_config["model_type"]   # the weight names now: bert, albert, roberta-prelayernorm, modernbert
    # our own BERT exports keep our config beside: their sequence classifier is our SOP head
    ours = (weights.parent / "ko_model_config.json").is_file()
    try:
        state = (hf_compat.modernbert_from_hf_state(hf_state, config, arch) if table == "modernbert" else
                 hf_compat.bert_from_hf_state(hf_state, dataclasses.replace(config, embedding_size=None), arch,
                                              sop=ours) | (projection or {}) if table == "bert" else
                 from_hf_state(hf_state, config, table))   # ALBERT, RoBERTa-PreLayerNorm: as we export them
    except KeyError as e:
        raise ValueError(f"{weights}: {e.args[0]}; not a complete {family} checkpoint") from None
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    # heads computing another function than ours are left out (initialised fresh where a run needs them)
    if (family == "modernbert" and "classifier_head.classifier.weight" in state
            and hf_config.get("classifier_pooling", "cls") != "cls"):
        state = _without_head(state, "classifier_head.", weights, f"its classifier pools with classifier_pooling "
                              f"{hf_config['classifier_pooling']!r} and ours reads the [CLS] vector, so its "
                              f"classification head")
    if hf_compat.untied_decoder(hf_config, hf_state):
        state = _without_head(state, "mlm_head.", weights, "its MLM decoder is not tied to the word embeddings "
                              "(tie_word_embeddings false) and ours always is, so its MLM head")
    if family == "electra" and config.act_fn != "gelu" and "mlm_head.bias" in state:
        state = _without_head(state, "mlm_head.", weights, f"ELECTRA's generator head always applies gelu and this "
                              f"model's act_fn is {config.act_fn}, so its MLM head")
    return Source(state, config, _tokenizer_dir([weights.parent]),
                  {"path": str(weights), "kind": "transformers", "step": None, "train_mode": None,
                   "objective": "mlm" if "mlm_head.bias" in state else None})


# --- mapping ---------------------------------------------------------------------------
def hf_target(config: ModelConfig) -> tuple[str | None, str]:
    """(HF family or None, why): which `transformers` architecture computes our model exactly."""
    if config.model_type == "modernbert":
        return "modernbert", "ModernBERT = transformers' ModernBERT"
    if config.model_type != "transformer":
        return None, (f"model_type {config.model_type!r} (MixConv token mixing) has no "
                      f"`transformers` architecture")
    if config.is_moe:
        return None, (f"n_experts {config.n_experts}: Switch Transformer FFNs inside a BERT-style "
                      f"encoder have no `transformers` architecture (SwitchTransformers is T5)")
    factorized = config.embedding_dim != config.hidden_size
    if config.ln_pos == 1:
        if config.layer_group > 1 or factorized:
            return "albert", "post-LN with shared layer groups or factorized embeddings = ALBERT"
        return "bert", "post-LN, no sharing = BERT"
    if config.layer_group > 1 or factorized:
        return None, ("pre-LN (ln_pos 0) with shared layers or factorized embeddings: ALBERT is "
                      "post-LN and RoBERTa-PreLayerNorm shares nothing, so no `transformers` "
                      "architecture computes it")
    return "roberta-prelayernorm", "pre-LN, no sharing = RoBERTa-PreLayerNorm"


def _bert_shaped(config: ModelConfig) -> ModelConfig:
    """The config whose BERT key table names our distinct layers (the table refuses the others)."""
    return dataclasses.replace(config, ln_pos=1, layer_group=1, embedding_size=None,
                               num_hidden_layers=config.num_distinct_layers)


def _rename(name: str, target: str) -> str:
    for old, new in RENAMES[target]:
        name = name.replace(old, new)
    return name


def to_hf_state(state: dict[str, Tensor], config: ModelConfig, target: str,
                expected: set[str] | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Our weights -> `target`'s names (ForPreTraining/ForMaskedLM naming, tied decoder left to HF),
    only those in `expected` (the keys of the exported class, `hf_class_keys`) when given: a key
    the class lacks would be reported UNEXPECTED by every load. Returns (HF state, our keys that
    were not exported)."""
    if target == "modernbert":
        out, left = hf_compat.modernbert_to_hf_state(state, config)
        return {k: v.detach().float().contiguous() for k, v in out.items()}, left
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, hf in key_table(_bert_shaped(config), ours_prefix="encoder.", hf_prefix="bert.", heads=True,
                              task_heads=True):
        if ours not in state:
            if ours.startswith("encoder."):
                raise KeyError(f"checkpoint lacks encoder weight {ours}")
            continue                                     # a head this task model does not have
        names = [_rename(h, target) for h in hf]
        if target == "roberta-prelayernorm" and names[0].startswith("cls."):
            continue                                     # RoBERTa has no SOP classifier
        if expected is not None and not set(names) <= expected:
            continue                                     # e.g. the SOP pooler of a ...ForMaskedLM export
        parts = state[ours].chunk(len(names)) if len(names) > 1 else (state[ours],)
        out.update({n: p.contiguous() for n, p in zip(names, parts)})
        used.add(ours)
    p = PREFIX[target]
    if target == "albert":
        proj_w, proj_b = "encoder.embeddings.projection.weight", "encoder.embeddings.projection.bias"
        if proj_w in state:
            out[p + "encoder.embedding_hidden_mapping_in.weight"] = state[proj_w]
            out[p + "encoder.embedding_hidden_mapping_in.bias"] = state[proj_b]
            used |= {proj_w, proj_b}
        else:                                            # ALBERT always projects: identity
            out[p + "encoder.embedding_hidden_mapping_in.weight"] = torch.eye(config.hidden_size)
            out[p + "encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(config.hidden_size)
    if target == "roberta-prelayernorm":
        for s in ("weight", "bias"):
            out[f"{p}LayerNorm.{s}"] = state[f"encoder.final_norm.{s}"]
            used.add(f"encoder.final_norm.{s}")
        # RoBERTa numbers real tokens from pad_token_id + 1 (padding gets pad_token_id)
        pos = state["encoder.embeddings.position_embeddings.weight"]
        offset = config.pad_token_id + 1
        shifted = pos.new_zeros(pos.shape[0] + offset, pos.shape[1])
        shifted[offset:] = pos
        out[p + "embeddings.position_embeddings.weight"] = shifted
    out = {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in out.items()}
    return out, sorted(set(state) - used)


def from_hf_state(hf_state: dict[str, Tensor], config: ModelConfig, target: str) -> dict[str, Tensor]:
    """`to_hf_state` backwards, for ALBERT and RoBERTa-PreLayerNorm folders (ours exported, or anyone's):
    our encoder, and each head whose weights are all there (an ALBERT pooler alone is neither our SOP
    nor our classification head). Missing encoder weights raise KeyError naming them."""
    p = PREFIX[target]
    strip = "" if any(k.startswith(p) for k in hf_state) else p    # ...Model folders have no prefix
    found, heads = {}, {}
    for ours, hf in key_table(_bert_shaped(config), ours_prefix="encoder.", hf_prefix="bert.", heads=True,
                              task_heads=True):
        names = [_rename(h, target) for h in hf]
        names = [n[len(strip):] if strip and n.startswith(strip) else n for n in names]
        complete = all(n in hf_state for n in names)
        if ours.startswith("encoder."):
            if not complete:
                raise KeyError(f"{target} weights lack {next(n for n in names if n not in hf_state)}")
        else:
            heads.setdefault(ours.split(".")[0], []).append(complete)
        if complete:
            found[ours] = hf_compat._joined(hf_state, tuple(names))
    out = {k: v for k, v in found.items() if k.startswith("encoder.") or all(heads[k.split(".")[0]])}
    base = "" if strip else p
    if target == "albert":
        proj = base + "encoder.embedding_hidden_mapping_in."
        w, b = hf_state[proj + "weight"], hf_state[proj + "bias"]
        if config.embedding_dim != config.hidden_size:
            out["encoder.embeddings.projection.weight"], out["encoder.embeddings.projection.bias"] = w, b
        elif not (torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)) and not b.any()):
            raise ValueError("its embedding_size equals hidden_size but embedding_hidden_mapping_in is not the "
                             "identity: our layers take the embeddings unprojected at that size")
    else:  # RoBERTa's position offset and token types (as a RoBERTa folder's); its final LayerNorm is ours
        for key in ("encoder.embeddings.position_embeddings.weight", "encoder.embeddings.token_type_embeddings.weight"):
            out[key] = hf_compat.roberta_embedding(key, out[key], config.pad_token_id + 1)
        for s in ("weight", "bias"):
            out[f"encoder.final_norm.{s}"] = hf_state[base + f"LayerNorm.{s}"]
    return out


def hf_class_keys(cfg) -> set[str]:
    """The state-dict keys of the class `cfg.architectures[0]` (built on the meta device: no memory)."""
    import transformers

    with torch.device("meta"):
        return set(getattr(transformers, cfg.architectures[0])(cfg).state_dict())


def task_head(state: dict[str, Tensor]) -> tuple[str | None, int]:
    """(the fine-tuning head `transformers` has a class for, its number of outputs): "classify"
    (...ForSequenceClassification; 1 output = regression), "qa" (...ForQuestionAnswering), or None."""
    if "classifier_head.classifier.weight" in state:
        return "classify", state["classifier_head.classifier.weight"].shape[0]
    if "span_head.qa_outputs.weight" in state:
        return "qa", 2
    return None, 0


TASK_CLASS = {"classify": "ForSequenceClassification", "qa": "ForQuestionAnswering"}


def label_names(train_mode: str | None, num_labels: int, recorded: list[str] | None = None) -> list[str] | None:
    """The names of a classifier's outputs: those a classify run numbered its label names by
    (`recorded`; classes beyond them, from a larger --num_labels, keep transformers' LABEL_i), or the
    task's (KLUE NLI's three classes, STS's similarity); None for class indices."""
    from data.pairs import NLI_LABELS

    if recorded and len(recorded) <= num_labels:
        return [*recorded, *(f"LABEL_{i}" for i in range(len(recorded), num_labels))]
    if train_mode == "nli" and num_labels == len(NLI_LABELS):
        return list(NLI_LABELS)
    if train_mode == "sts" and num_labels == 1:
        return ["similarity"]
    return None


def hf_config(config: ModelConfig, target: str, has_mlm: bool, has_sop: bool, tokenizer_ids: dict | None = None,
              task: tuple[str | None, int] = (None, 0), names: list[str] | None = None):
    """A transformers config object for `target`; `task` (from `task_head`) picks the fine-tuning class,
    `names` its labels' names (`label_names`)."""
    import transformers

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_heads,
                  intermediate_size=config.ff_dim, hidden_act=hf_compat.HF_ACTIVATIONS[config.act_fn],
                  hidden_dropout_prob=config.dropout_prob, attention_probs_dropout_prob=config.dropout_prob,
                  max_position_embeddings=config.max_position_embedding, type_vocab_size=config.type_vocab_size,
                  initializer_range=config.initializer_range, layer_norm_eps=config.LN_eps,
                  pad_token_id=config.pad_token_id, tie_word_embeddings=True)
    ids = tokenizer_ids or {}
    kind, num_labels = task
    labels = ({"num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else
               "single_label_classification"} if kind == "classify" else {})
    if labels and names:
        labels.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if target == "modernbert":
        specials = {"bos_token_id": ids.get("cls", 2), "cls_token_id": ids.get("cls", 2),
                    "eos_token_id": ids.get("sep", 3), "sep_token_id": ids.get("sep", 3)}
        arch = ["ModernBert" + (TASK_CLASS[kind] if kind else "ForMaskedLM" if has_mlm else "Model")]
        return transformers.ModernBertConfig(**hf_compat.modernbert_hf_config(config, architectures=arch, **specials,
                                                                              **labels))
    head = "ForPreTraining" if has_sop and target != "roberta-prelayernorm" else "ForMaskedLM" if has_mlm else "Model"
    if target == "roberta-prelayernorm" and has_mlm and config.act_fn != "gelu":
        head = "Model"   # RoBERTa's LM head applies gelu whatever hidden_act says
    if kind is not None:
        head = TASK_CLASS[kind]
    common.update(labels)
    arch = [CLASS_PREFIX[target] + head]
    if target == "bert":
        return transformers.BertConfig(**common, architectures=arch)
    if target == "albert":
        return transformers.AlbertConfig(**common, embedding_size=config.embedding_dim,
                                         num_hidden_groups=config.num_distinct_layers, inner_group_num=1,
                                         classifier_dropout_prob=config.dropout_prob, architectures=arch,
                                         bos_token_id=ids.get("cls", 2), eos_token_id=ids.get("sep", 3))
    common["max_position_embeddings"] += config.pad_token_id + 1
    return transformers.RobertaPreLayerNormConfig(**common, architectures=arch,
                                                  bos_token_id=ids.get("cls", 2), eos_token_id=ids.get("sep", 3))


# --- our model, for verification -------------------------------------------------------
def task_model(state: dict[str, Tensor]) -> tuple[str, dict]:
    """(task, build_model keyword arguments) of the task model these weights belong to."""
    kind, num_labels = task_head(state)
    if kind == "classify":
        return "classify", {"num_labels": num_labels}
    if kind == "qa":
        return "mrc", {}
    if "tag_head.classifier.weight" in state:
        from data.ner import CHAR_SLOTS

        return "ner", {"num_labels": state["tag_head.classifier.weight"].shape[0] // CHAR_SLOTS, "slots": CHAR_SLOTS,
                       "crf": "crf.transitions" in state}
    if "mlm_head.bias" in state:
        return "pretrain", {"objective": "sop" if "sop_head.classifier.weight" in state else "mlm"}
    return "encoder", {}


def build_ours(source: Source) -> torch.nn.Module:
    """Our task model (`task_model`) holding the source's weights."""
    task, kwargs = task_model(source.state)
    model = build_model(source.config, task, **kwargs)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in source.state.items() if k in own}, strict=True)
    return model.eval()


@torch.no_grad()
def ours_outputs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(last hidden state (B, L, H), MLM logits at every position (B, L, V) or None)."""
    hidden = model.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
    logits = model.mlm_head(hidden, model.word_embeddings) if hasattr(model, "mlm_head") else None
    return hidden, logits


@torch.no_grad()
def verify(out_dir: Path, source: Source, seed: int = 0) -> dict[str, float]:
    """Load the export with `transformers` (offline) and compare with our model on random ids
    with padding: max |difference| of last hidden states (real tokens), MLM logits and the
    classification / span logits of a fine-tuned model."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(out_dir, local_files_only=True)
    ours = build_ours(source)
    g = torch.Generator().manual_seed(seed)
    modern = source.config.model_type == "modernbert"
    # ModernBERT: longer than the local window, so sliding-window layers differ from global ones
    L = source.config.local_attention + 8 if modern else 16
    B, L = 3, min(L, source.config.max_position_embedding)
    pad = source.config.pad_token_id
    ids = torch.randint(0, source.config.vocab_size - 1, (B, L), generator=g)
    ids += (ids >= pad).long()  # every id but the pad id: special ids too (a tokenizer's <s> may be 0)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L // 2:] = 0
    mask[2, L - 3:] = 0
    ids[mask == 0] = source.config.pad_token_id
    types = torch.zeros_like(ids)
    types[:, L // 3:] = 1 if source.config.type_vocab_size > 1 else 0
    h_ours, logits_ours = ours_outputs(ours, ids, mask, types)
    real = mask.bool()
    result = {}
    inputs = dict(input_ids=ids, attention_mask=mask) | ({} if modern else dict(token_type_ids=types))
    # the exported class itself (AutoModel would list its head weights as UNEXPECTED), and its encoder
    full = getattr(transformers, cfg.architectures[0]).from_pretrained(out_dir, local_files_only=True).eval()
    h_hf = full.base_model(**inputs).last_hidden_state
    result["hidden_max_abs_diff"] = (h_hf - h_ours)[real].abs().max().item()
    if logits_ours is not None and any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in cfg.architectures):
        out = full(**inputs)
        logits_hf = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
        result["logits_max_abs_diff"] = (logits_hf - logits_ours)[real].abs().max().item()
    kind, _ = task_head(source.state)
    if kind is not None and cfg.architectures[0].endswith(TASK_CLASS[kind]):
        out, ours_out = full(**inputs), ours(ids, mask, None if modern else types)
        if kind == "classify":
            result["task_logits_max_abs_diff"] = (out.logits - ours_out["logits"]).abs().max().item()
        else:  # ours never predicts a padding position (-inf there); compare the real tokens
            result["task_logits_max_abs_diff"] = max(
                (out[f"{e}_logits"] - ours_out[f"{e}_logits"])[real].abs().max().item() for e in ("start", "end"))
    return result


# --- writing ---------------------------------------------------------------------------
def write_tokenizer(tokenizer_dir: Path | None, out: Path, max_length: int, segments: bool = True) -> dict:
    """tokenizer.json with the [CLS] A [SEP] (B [SEP]) template, vocab.txt, tokenizer_config.json,
    special_tokens_map.json (AutoTokenizer loads them offline), pretokenizer.json. A foreign tokenizer
    (one a transformers folder brought) keeps its tokenizer.json but for the template, under the
    generic PreTrainedTokenizerFast. `segments`: the model takes token_type_ids (not ModernBERT), so
    the tokenizer returns them (the [CLS] A [SEP] B [SEP] pairs our runs train on mark B as type 1).
    Returns {"morpheme": analyzer or None, "foreign": bool, "ids": special ids} or {} without a tokenizer."""
    if tokenizer_dir is None:
        return {}
    from tokenizers import Tokenizer, processors

    from data.tokenizer import KoTokenizer

    ko = KoTokenizer.load(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # as written (KoTokenizer changes a flag)
    named = ko.named()
    specials = {f"{r}_token": named[r] for r in ("unk", "sep", "pad", "cls", "mask") if r in named}
    # the inputs our runs trained on: [CLS] A [SEP] (B [SEP]), whatever a foreign tokenizer's own template was
    cls, sep = named["cls"], named["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, ko.cls_id), (sep, ko.sep_id)])
    tok.save(str(out / "tokenizer.json"))
    if (tokenizer_dir / "vocab.txt").is_file():
        shutil.copy2(tokenizer_dir / "vocab.txt", out / "vocab.txt")
    if ko.foreign:  # the generic class applies tokenizer.json as it is (a BERT class could rebuild its parts)
        config = dict(specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length)
    else:
        config = dict(specials, tokenizer_class="BertTokenizerFast", do_lower_case=False, strip_accents=False,
                      tokenize_chinese_chars=False, model_max_length=max_length)
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"] if segments else \
        ["input_ids", "attention_mask"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    morpheme = None
    pre = tokenizer_dir / "pretokenizer.json"
    if pre.is_file():
        shutil.copy2(pre, out / "pretokenizer.json")
        morpheme = json.loads(pre.read_text()).get("morpheme")
    return {"morpheme": morpheme, "foreign": ko.foreign, "ids": {"cls": ko.cls_id, "sep": ko.sep_id}}


def _tokenizer_note(tok: dict) -> str:
    if not tok:
        return "No tokenizer was found for this checkpoint: pass `--tokenizer DIR` to include one.\n"
    if tok["morpheme"]:
        return (f"**The tokenizer is morpheme-aware ({tok['morpheme']}).** Hugging Face tokenizers cannot "
                f"express that pre-tokenizer, so `tokenizer.json` alone gives different pieces: split every "
                f"input into morphemes first (each eojeol cut at morpheme boundaries, later pieces prefixed "
                f"with `##`), e.g. with this repository's `data.tokenizer.KoTokenizer.load(<this folder>)`, "
                f"which reads `pretokenizer.json`.\n")
    if tok.get("foreign"):
        return ("The tokenizer is the one the model was imported with (its `tokenizer.json`, with the "
                "[CLS] A [SEP] B [SEP] template our runs train on): it loads with `AutoTokenizer` "
                "(PreTrainedTokenizerFast) and adds those special tokens itself.\n")
    return ("The tokenizer (WordPiece, no lowercasing, no accent stripping: those would split Hangul "
            "into jamo) loads with `AutoTokenizer`/`BertTokenizerFast` and adds [CLS]/[SEP] itself.\n")


def export(src: str | Path, out: str | Path, tokenizer: str | Path | None = None,
           fmt: str = "auto", do_verify: bool = False, overwrite: bool = False) -> dict:
    """Write the export folder; returns a summary (target, architectures, files, verification).
    `out` may be new, empty or an earlier export (safety.staged_dir); anything else needs
    `overwrite`, and a run directory is never replaced."""
    out = Path(out)
    part = safety.run_part(out)
    if part is not None:  # e.g. re-exporting step-6 over the run's final/ (an export of ours: no --overwrite needed)
        raise safety.UnsafeWrite(f"{out} is {part}; it is never replaced by an export, not even with --overwrite: "
                                 f"pick another output folder, e.g. {out.parent / 'hf'}")
    safety.check_replaceable(out, overwrite=overwrite, source=Path(src))  # before reading the source
    source = load_source(src)
    from data.tokenizer import KoTokenizer, check_vocab_size, tokenizer_folder

    if tokenizer is not None:  # a tokenizer folder, or its tokenizer.json (as --tokenizer takes elsewhere)
        source.tokenizer_dir = tokenizer_folder(tokenizer)
    if source.tokenizer_dir is not None:  # before anything is written: ids the embeddings never saw are no export
        ko = KoTokenizer.load(source.tokenizer_dir)
        try:
            check_vocab_size(ko, source.config.vocab_size)
        except ValueError as e:
            raise ValueError(f"the tokenizer {source.tokenizer_dir} does not fit this model: {str(e).split('; ')[0]}; "
                             f"pass --tokenizer with the tokenizer the model was trained with") from None
        if ko.pad_id is not None and ko.pad_id != source.config.pad_token_id:
            # our models never read pad_token_id (the attention mask says what is padding), so a run with a
            # foreign tokenizer (RoBERTa's <pad> is 1) keeps the config's 0; transformers' RoBERTa numbers
            # positions by `input_ids != pad_token_id`, which would take its <s> (0) for padding
            source.config = dataclasses.replace(source.config, pad_token_id=ko.pad_id)
    else:
        print(f"[export] warning: no tokenizer found for {src}: the export holds none (its README says so); "
              f"pass --tokenizer DIR to include it", file=sys.stderr, flush=True)
    target, why = hf_target(source.config) if fmt == "auto" else (None, "--format ours was asked for")
    summary = {"source": source.info, "target": target or "ours", "reason": why}
    with safety.staged_dir(out, overwrite=overwrite, source=Path(src),
                           info={"by": "python -m trainer.export", "source": source.info}) as tmp:
        tok = write_tokenizer(source.tokenizer_dir, tmp, source.config.max_position_embedding,
                              segments=target != "modernbert")
        if target is None:
            _write_ours(source, tmp, why, tok)
        else:
            _write_hf(source, tmp, target, why, tok, summary, out.name)
    summary["files"] = sorted(p.name for p in out.iterdir() if p.name != safety.MARKER)
    if do_verify and target is not None:
        summary["verify"] = verify(out, source)
    return summary


def _write_hf(source: Source, out: Path, target: str, why: str, tok: dict, summary: dict, name: str) -> None:
    has_mlm = "mlm_head.bias" in source.state
    has_sop = "sop_head.classifier.weight" in source.state
    task = task_head(source.state)
    names = (label_names(source.info.get("train_mode"), task[1], source.info.get("label_names"))
             if task[0] == "classify" else None)
    cfg = hf_config(source.config, target, has_mlm, has_sop, tok.get("ids"), task, names)
    state, left = to_hf_state(source.state, source.config, target, hf_class_keys(cfg))
    cfg.save_pretrained(out)
    checkpoint.write_safetensors(state, out / "model.safetensors", {"format": "pt"})
    (out / "ko_model_config.json").write_text(source.config.to_json())
    summary["architectures"] = cfg.architectures
    summary["not_exported"] = left
    arch = cfg.architectures[0]
    family = CLASS_PREFIX[target]
    auto_task = next((f"AutoModel{c}" for c in TASK_CLASS.values() if arch.endswith(c)), None)
    lines = [f"# {name}: `transformers` {family} export", "",
             f"Exported by `python -m trainer.export` from `{source.info.get('path')}` "
             f"(step {source.info.get('step')}, train_mode {source.info.get('train_mode')}, "
             f"objective {source.info.get('objective')}). Our model is {why}.", "",
             "```python",
             f"from transformers import AutoModel, {auto_task or 'AutoModelForMaskedLM'}, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(PATH)",
             "encoder = AutoModel.from_pretrained(PATH)            # hidden states",
             ]
    if has_mlm and not arch.endswith("Model"):
        lines.append("mlm = AutoModelForMaskedLM.from_pretrained(PATH)    # MLM logits")
    if auto_task:
        what = ("start/end logits" if auto_task.endswith("QuestionAnswering") else
                "the regression output" if task[1] == 1 else
                f"logits over {task[1]} labels ({', '.join(names) if names else 'LABEL_0 ...'})")
        lines.append(f"model = {auto_task}.from_pretrained(PATH)  # {what}")
    lines += ["```", "", f"Config: `config.json` ({family}, architectures {cfg.architectures}); our own "
              "config is kept in `ko_model_config.json`.", ""]
    if not arch.endswith("Model"):
        lines += [f"The weights are exactly those of `{arch}`, which loads with no missing or unexpected keys "
                  f"(its `.base_model` is the encoder). A class with fewer heads (`AutoModel`, the encoder "
                  f"alone; `AutoModelForMaskedLM` of a pretraining export) lists the weights of the heads it "
                  f"leaves out as UNEXPECTED in transformers' load report: harmless, nothing it uses is "
                  f"missing.", ""]
    lines.append(_tokenizer_note(tok))
    if target == "roberta-prelayernorm":
        lines.append("RoBERTa numbers positions from pad_token_id + 1 and gives padding tokens position "
                     "pad_token_id, so hidden states at *padding* positions differ from ours; real "
                     "tokens match. Use right padding with attention_mask as usual.\n")
        if has_mlm and source.config.act_fn != "gelu":
            lines.append(f"RoBERTa's LM head always applies gelu but this model uses {source.config.act_fn}: "
                         "the MLM head is included in the weights but `AutoModelForMaskedLM` would not "
                         "reproduce our logits; use the encoder.\n")
    if has_sop and target in ("roberta-prelayernorm", "modernbert"):
        lines.append(f"The SOP classifier is not exported ({family} has no pretraining sequence head).\n")
    if target == "modernbert":
        lines.append("ModernBERT has no token-type embeddings: the tokenizer returns input_ids and "
                     "attention_mask only.\n")
    if left:
        lines.append("Weights of ours not exported (task heads without a `transformers` counterpart here): "
                     + ", ".join(f"`{k}`" for k in left) + ".\n")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _build_model_call(task: str, kwargs: dict) -> str:
    return f"build_model(config, {task!r}" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"


def _write_ours(source: Source, out: Path, why: str, tok: dict) -> None:
    checkpoint.save_weights(source.state, out / checkpoint.WEIGHTS,
                            {"step": str(source.info.get("step") or ""),
                             "train_mode": str(source.info.get("train_mode") or "")})
    source.config.to_json(out / "config.json")
    note = f"""# Export note: `transformers` cannot load this model

Source: `{source.info.get('path')}` (step {source.info.get('step')}, train_mode {source.info.get('train_mode')}).

**Why:** {why}. A BERT/ALBERT folder would load without errors and compute something else, so
this folder holds our own format instead:

- `model.safetensors`: our weights (tied tensors stored once; the aliases are in the metadata),
- `config.json`: our `ModelConfig` (not a `transformers` config),
- the tokenizer files.

Load it with this repository's `models` package:

```python
from models import ModelConfig, build_model
from trainer.checkpoint import load_weights
config = ModelConfig.from_json("PATH/config.json")
model = {_build_model_call(*task_model(source.state))}
model.load_state_dict(load_weights("PATH/model.safetensors"), strict=True)
```
or continue training / fine-tune from it with `--checkpoint PATH/model.safetensors`.

{_tokenizer_note(tok)}"""
    (out / "EXPORT_NOTE.md").write_text(note)
    (out / "README.md").write_text(note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="step-N checkpoint, final/ directory, run directory or model.safetensors")
    p.add_argument("out", help="output folder: new, empty or an earlier export (replaced); never a run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT even if it holds files an export did not write (never a run directory)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run used)")
    p.add_argument("--format", choices=("auto", "ours"), default="auto",
                   help="auto: a transformers architecture where one computes our model exactly, else "
                        "our format; ours: always our format")
    p.add_argument("--verify", action="store_true",
                   help="load the export with transformers and print the max difference to our model")
    a = p.parse_args(argv)
    try:
        summary = export(a.src, a.out, a.tokenizer, a.format, a.verify, a.overwrite)
    except (ValueError, FileNotFoundError) as e:  # a damaged or missing source: one line, no traceback
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
