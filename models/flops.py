"""FLOP accounting for MFU: matmul/conv multiply-adds count 2 FLOPs; training = 3x forward."""
from __future__ import annotations

from .config import ModelConfig


def estimate_flops_per_token(config: ModelConfig, seq_len: int, masked_fraction: float = 0.15,
                             training: bool = True, query_rows: bool = True) -> float:
    """FLOPs per input token of the encoder plus an MLM head run on `masked_fraction` of the
    tokens (1.0 for a head over all tokens, as HF's BertForMaskedLM). Attention counts QK^T
    and AV (4 * L * H per token per layer); a Switch layer counts one expert plus the router;
    shared layers count once per use; ModernBERT's local layers attend to at most local_attention + 1
    keys and its GeGLU MLP counts 6 * H * F. Where the encoder computes its last layer only at the
    rows the heads read (models.encoder.QueryRows: BERT-family self-attention with a dense FFN last,
    and ModernBERT), that layer's attention, output projection and FFN count `masked_fraction` of
    the tokens (its qkv projection all of them; `query_rows=False`: all of it every token). Embedding lookups, norms and softmax are left out."""
    H, Fd, D, V, L = (config.hidden_size, config.ff_dim, config.embedding_dim, config.vocab_size,
                      seq_len)
    flops = 2 * D * H if D != H else 0
    last = config.num_hidden_layers - 1
    rows_last = query_rows and (config.model_type == "modernbert" or (
        config.model_type == "transformer" and not config.is_moe_layer(last // config.layer_group)))
    for i in range(config.num_hidden_layers):
        j = i // config.layer_group
        q = masked_fraction if i == last and rows_last else 1.0    # fraction of rows with queries
        if config.model_type == "modernbert":
            keys = L if config.is_global_attention_layer(i) else min(L, config.local_attention + 1)
            flops += 2 * H * 3 * H + q * (2 * H * H + 4 * keys * H + 6 * H * Fd)
            continue
        if config.model_type == "mix_lm":
            H_, n = H, config.n_experts
            channels = [H_ // n + (1 if g < H_ % n else 0) for g in range(n)]
            mix = sum(2 * c * k for c, k in zip(channels, config.mix_kernel_sizes()))
            flops += mix + 2 * H * H
            flops += 4 * H * Fd
        else:
            flops += 2 * H * 3 * H + q * (2 * H * H + 4 * L * H + 4 * H * Fd)
        if config.is_moe_layer(j):
            flops += 2 * H * config.n_experts
    flops += masked_fraction * (2 * H * D + 2 * D * V)
    return float(3 * flops if training else flops)
