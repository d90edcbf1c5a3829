"""Encoder models (BERT/ALBERT transformer, Switch Transformer, Mix LM, ModernBERT) and task heads.

    config = load_config("small")                 # configs/small_config.json, or a JSON path
    model = build_model(config, "pretrain", objective="sop")
    out = model(**batch)                          # {"loss", "mlm_loss", "mlm_acc", ...}
"""
from .config import ModelConfig, load_config
from .encoder import Encoder, EncoderOutput, TransformerEncoder
from .flops import estimate_flops_per_token
from .mix_lm import MixLMEncoder
from .modernbert import ModernBertEncoder
from .tasks import REGISTRY, TASKS, build_model

__all__ = ["ModelConfig", "load_config", "REGISTRY", "TASKS", "build_model", "Encoder",
           "EncoderOutput", "TransformerEncoder", "MixLMEncoder", "ModernBertEncoder",
           "estimate_flops_per_token"]
