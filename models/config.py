"""Model configuration: one dataclass, read from and written to `configs/<name>_config.json`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

MODEL_TYPES = ("transformer", "mix_lm")
ACT_FNS = ("gelu", "relu", "swish")


@dataclass
class ModelConfig:
    # "transformer" (a Switch Transformer when n_experts > 1) or "mix_lm" (MixConv token mixing).
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

    def __post_init__(self) -> None:
        def positive_int(key: str) -> None:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")

        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "ff_dim",
                    "max_position_embedding", "type_vocab_size", "layer_group", "n_experts",
                    "kernel_size", "moe_layer_interval"):
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
        if self.model_type == "mix_lm":
            if self.kernel_size < 3 or self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd and >= 3 for mix_lm, got {self.kernel_size}")
            if self.n_experts > self.hidden_size:
                raise ValueError(f"n_experts ({self.n_experts}) is the number of MixConv channel "
                                 f"groups and cannot exceed hidden_size ({self.hidden_size})")

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
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
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
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        return cls.from_dict(json.loads(text))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """"bert-base" -> configs/bert-base_config.json; anything else is a path to a JSON file."""
    p = Path(name_or_path)
    if p.is_file():
        return ModelConfig.from_json(p)
    named = CONFIG_DIR / f"{name_or_path}_config.json"
    if named.is_file():
        return ModelConfig.from_json(named)
    if p.suffix == ".json":
        raise ValueError(f"model config file {str(p)!r} does not exist")
    available = sorted(f.name[: -len("_config.json")] for f in CONFIG_DIR.glob("*_config.json"))
    raise ValueError(f"no model config named {str(name_or_path)!r}: not a file and "
                     f"{named} does not exist; available names: {available}")
