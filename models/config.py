"""Model configuration: one dataclass, read from and written to `configs/<name>_config.json`."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

MODEL_TYPES = ("transformer", "mix_lm", "modernbert")
ACT_FNS = ("gelu", "relu", "swish", "gelu_tanh")  # gelu_tanh: the tanh approximation (ALBERT's gelu_new)


@dataclass
class ModelConfig:
    # "transformer" (a Switch Transformer when n_experts > 1), "mix_lm" (MixConv token mixing) or
    # "modernbert" (RoPE, GeGLU, no biases, pre-norm, alternating global/sliding-window attention).
    model_type: str = "transformer"
    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_heads: int = 12
    ff_dim: int = 3072
    act_fn: str = "gelu"
    dropout_prob: float = 0.1
    initializer_range: float = 0.02
    max_position_embedding: int = 512
    type_vocab_size: int = 2
    LN_eps: float = 1e-12
    ln_pos: int = 1  # 0 = pre-LN, 1 = post-LN (original BERT)
    # `layer_group` consecutive layers share one parameter set: 1 = BERT, num_hidden_layers = ALBERT.
    layer_group: int = 1
    # transformer: experts per Switch FFN (1 = dense FFN); mix_lm: number of MixConv channel groups.
    n_experts: int = 1
    # mix_lm: largest (odd) kernel; the groups get odd kernel sizes evenly spaced from 3 to it.
    kernel_size: int = 9
    # ALBERT's factorized embedding width; None = hidden_size.
    embedding_size: int | None = None
    # Switch Transformer FFN
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    router_aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.0
    # Which distinct layers get a Switch FFN: layer j does when (j + 1) % moe_layer_interval == 0.
    # 1 = every layer; 2 = every other layer, as in the Switch Transformer paper.
    moe_layer_interval: int = 1
    pad_token_id: int = 0
    # modernbert: layer i attends globally when i % global_attn_every_n_layers == 0, the others
    # within a window of local_attention tokens (local_attention // 2 on each side).
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self._check_types()

        def positive_int(key: str) -> None:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")

        if self.model_type not in MODEL_TYPES:
            switch = ("a Switch Transformer is \"model_type\": \"transformer\" with \"n_experts\" > 1 "
                      "(configs/switch_config.json)")
            hint = {"bert": "BERT is \"model_type\": \"transformer\"",
                    "albert": "ALBERT is \"model_type\": \"transformer\" with \"layer_group\" (shared layers) and "
                              "\"embedding_size\" (configs/albert_config.json)",
                    "switch": switch, "moe": switch}.get(str(self.model_type).lower().replace("-", "_"))
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}"
                             + (f": {hint}" if hint else ""))
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "ff_dim",
                    "max_position_embedding", "type_vocab_size", "layer_group", "n_experts",
                    "kernel_size", "moe_layer_interval", "global_attn_every_n_layers",
                    "local_attention"):
            positive_int(key)
        if self.embedding_size is not None:
            positive_int("embedding_size")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        if self.ln_pos not in (0, 1):
            raise ValueError(f"ln_pos must be 0 (pre-LN) or 1 (post-LN), got {self.ln_pos!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}); pick num_heads dividing hidden_size")
        if self.num_hidden_layers % self.layer_group:
            raise ValueError(f"num_hidden_layers ({self.num_hidden_layers}) must be divisible by "
                             f"layer_group ({self.layer_group}); use a divisor such as 1 or "
                             f"{self.num_hidden_layers}")
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {self.dropout_prob!r}")
        if self.initializer_range <= 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range!r}")
        if self.LN_eps <= 0:
            raise ValueError(f"LN_eps must be > 0, got {self.LN_eps!r}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("router_aux_loss_weight", "router_z_loss_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be a token id below "
                             f"vocab_size ({self.vocab_size})")
        for key in ("global_rope_theta", "local_rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.model_type == "modernbert":
            self._check_modernbert()
        if self.is_moe and self.moe_layer_interval > self.num_distinct_layers:
            raise ValueError(f"moe_layer_interval ({self.moe_layer_interval}) leaves none of the "
                             f"{self.num_distinct_layers} distinct layer(s) a Switch FFN (layer j gets one when "
                             f"(j + 1) % moe_layer_interval == 0), so n_experts {self.n_experts} would train a "
                             f"dense model; set \"moe_layer_interval\" to at most {self.num_distinct_layers} "
                             f"(1 = every layer), or \"n_experts\": 1 for a dense model")
        if self.model_type == "mix_lm":
            if self.kernel_size < 3 or self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd and >= 3 for mix_lm, got {self.kernel_size}")
            if self.n_experts > self.hidden_size:
                raise ValueError(f"n_experts ({self.n_experts}) is the number of MixConv channel "
                                 f"groups and cannot exceed hidden_size ({self.hidden_size})")

    def _check_modernbert(self) -> None:
        fixed = {"ln_pos": (0, "ModernBERT is pre-norm"), "layer_group": (1, "no layer sharing"),
                 "n_experts": (1, "dense GeGLU MLPs"), "embedding_size": (None, "no factorized embeddings")}
        for key, (value, why) in fixed.items():
            if getattr(self, key) != value:
                raise ValueError(f"model_type modernbert needs {key} {value!r} ({why}), got "
                                 f"{getattr(self, key)!r}; set \"{key}\": {json.dumps(value)} in the config")
        if self.head_dim % 2:
            raise ValueError(f"model_type modernbert needs an even head size for RoPE, got hidden_size "
                             f"{self.hidden_size} / num_heads {self.num_heads} = {self.head_dim}")
        if self.local_attention % 2:
            raise ValueError(f"local_attention ({self.local_attention}) must be even: the window spans "
                             f"local_attention // 2 tokens on each side")

    def _check_types(self) -> None:
        """Each value has its field's JSON type (a quoted "0.1" or null is refused by name) and
        every number is finite: NaN/inf would only surface later as NaN losses."""
        for f in dataclasses.fields(self):
            value, wanted = getattr(self, f.name), str(f.type)
            if value is None and "None" in wanted:
                continue
            if "float" in wanted:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                kind = "a number"
            elif "int" in wanted:
                ok = isinstance(value, int) and not isinstance(value, bool)
                kind = "an integer"
            else:
                ok, kind = isinstance(value, str), "a string"
            if not ok:
                example = f.default if f.default is not None else 128
                if isinstance(value, str) and kind != "a string":
                    try:  # a quoted number: show it unquoted
                        example = int(value) if kind == "an integer" else float(value)
                    except ValueError:
                        pass
                raise ValueError(f"{f.name} must be {kind}, got {json.dumps(value)} "
                                 f"({'JSON ' + _json_type(value)}); write it as \"{f.name}\": "
                                 f"{json.dumps(example)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}; "
                                 f"use e.g. \"{f.name}\": {json.dumps(f.default)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def num_distinct_layers(self) -> int:
        return self.num_hidden_layers // self.layer_group

    @property
    def is_moe(self) -> bool:
        return self.model_type == "transformer" and self.n_experts > 1

    def is_moe_layer(self, distinct_index: int) -> bool:
        return self.is_moe and (distinct_index + 1) % self.moe_layer_interval == 0

    @property
    def has_bias(self) -> bool:
        """Linear layers and LayerNorms of the encoder and MLM head carry biases (not ModernBERT)."""
        return self.model_type != "modernbert"

    def is_global_attention_layer(self, index: int) -> bool:
        return index % self.global_attn_every_n_layers == 0

    def mix_kernel_sizes(self) -> list[int]:
        """Kernel size of each MixConv group (mix_lm): odd sizes from 3 to kernel_size."""
        n = self.n_experts
        if n == 1:
            return [self.kernel_size]
        steps = (self.kernel_size - 3) // 2
        return [3 + 2 * round(i * steps / (n - 1)) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object {{\"key\": value, ...}}, got a JSON "
                             f"{_json_type(d)} at the top level; see configs/small_config.json")
        unknown = sorted(set(d) - known)
        if unknown:
            meant = [f"{k} -> {OURS_BY_HF_KEY[k]}" for k in unknown if OURS_BY_HF_KEY.get(k) in known]
            hint = f" (transformers' names; ours: {', '.join(meant)})" if meant else ""
            raise ValueError(f"unknown model config key(s) {unknown}{hint}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        """Reads a JSON file path (or a JSON string starting with '{')."""
        s = str(path_or_text)
        return cls.from_dict(read_json(s) if not s.lstrip().startswith("{") else parse_json(s))


# transformers' config.json names of our keys (a hand-written config mixing the two is told which is ours)
OURS_BY_HF_KEY = {"num_attention_heads": "num_heads", "intermediate_size": "ff_dim", "hidden_act": "act_fn",
                  "max_position_embeddings": "max_position_embedding", "layer_norm_eps": "LN_eps",
                  "hidden_dropout_prob": "dropout_prob", "norm_eps": "LN_eps", "hidden_activation": "act_fn",
                  "num_experts": "n_experts", "num_hidden_groups": "layer_group"}


def parse_json(text: str, source: str = "the model config") -> Any:
    """A JSON document; ValueError naming the line and what JSON does not allow (comments, trailing
    commas, single quotes) rather than the decoder's bare message. A repeated key is refused by name:
    json keeps the last value silently, so an edit further up would do nothing."""
    def no_repeats(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{source}: key {key!r} appears twice (values {json.dumps(seen[key])} and "
                                 f"{json.dumps(value)}; JSON keeps only the last); keep one of them")
            seen[key] = value
        return seen

    try:
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        line = text.removeprefix("\ufeff").splitlines()[e.lineno - 1].strip() if text.strip() else ""
        raise ValueError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                         + (f" ({line[:60]!r})" if line else " (the file is empty)")
                         + "; JSON has no comments (// or #), no trailing comma after the last item and only "
                           "double-quoted strings: see configs/small_config.json") from None


def read_json(path: str | Path) -> Any:
    """`parse_json` of a file (UTF-8, with or without the byte-order mark some editors write)."""
    return parse_json(Path(path).read_text(encoding="utf-8-sig"), source=str(path))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {str: "string", list: "list", dict: "object"}.get(type(value), "number")


def load_config(name_or_path: str | Path) -> ModelConfig:
    """"bert-base" -> configs/bert-base_config.json; anything else is a path to a JSON file (ours, or
    a `transformers` ModernBERT config.json), a folder holding a config.json, or a step-N checkpoint
    (meta.json's model_config)."""
    p = Path(name_or_path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "meta.json").is_file():
        try:  # a step-N checkpoint: the config it was trained with
            return ModelConfig.from_dict(read_json(p / "meta.json")["model_config"])
        except (KeyError, TypeError):
            raise ValueError(f"{p / 'meta.json'} records no \"model_config\"; it is not a step-N checkpoint of "
                             f"this trainer (give the config file instead)") from None
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        from .hf_compat import config_from_hf, is_hf_config

        d = read_json(p)
        return config_from_hf(d) if is_hf_config(d) else ModelConfig.from_dict(d)
    named = CONFIG_DIR / f"{name_or_path}_config.json"
    if named.is_file():
        return ModelConfig.from_json(named)
    if p.suffix == ".json":
        raise ValueError(f"model config file {str(p)!r} does not exist")
    available = sorted(f.name[: -len("_config.json")] for f in CONFIG_DIR.glob("*_config.json"))
    raise ValueError(f"no model config named {str(name_or_path)!r}: not a file and "
                     f"{named} does not exist; available names: {available}{hub_id_hint(name_or_path)}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_hint(spec: str | Path) -> str:
    """For a name such as klue/bert-base that is no local path: how to fetch it (runs read local folders
    only; compute nodes often have no network); "" for anything else."""
    text = str(spec)
    if not _HUB_ID.match(text) or Path(text).exists():
        return ""
    folder = text.replace("/", "-")
    return (f"; {text!r} looks like a Hugging Face Hub id, and runs read local folders only: download it first "
            f"(`huggingface-cli download {text} --local-dir {folder}`) and pass that folder ({folder}) instead")
