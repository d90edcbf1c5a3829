"""ModernBERT (Warner et al., 2024): the encoder `transformers.ModernBertModel` computes.

Token embeddings + a LayerNorm (no position or token-type embeddings), pre-norm layers with
bias-free LayerNorms and linears, one fused qkv projection, rotary position embeddings (RoPE)
with a large theta on global layers and a small one on local layers, global attention every
`global_attn_every_n_layers` layers (layer 0 included) and a sliding window of
`local_attention` tokens (|i - j| <= local_attention // 2) on the others, a GeGLU MLP and a
final LayerNorm. Layer 0 has no attention norm: the embedding norm precedes it.

Shapes: B batch, L sequence length, H hidden size, N heads, K head size (H / N), F MLP width
(ff_dim; the input projection makes 2F: value and gate), V vocabulary size.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .dropout import Dropout
from .tied import TiedEmbedding
from .activations import activation
from .encoder import EncoderOutput, QueryRows, attention, has_padding


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float,
                   device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin (L, K) of RoPE: frequency theta^(-2i/K) for the pair (i, i + K/2) of each head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.arange(seq_len, dtype=torch.float, device=device)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """(L, L) bool, True = attend: key j is within window // 2 positions of query i."""
    pos = torch.arange(seq_len, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window // 2


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps, bias=False)
        self.dropout = Dropout(config.dropout_prob)
        self.max_positions = config.max_position_embedding

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        if L > self.max_positions:
            raise ValueError(f"sequence length {L} exceeds max_position_embedding "
                             f"({self.max_positions}); shorten inputs (--max_seq_length)")
        return self.dropout(self.norm(self.word_embeddings(input_ids)))


class RotarySelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout_p = config.dropout_prob
        self.out_dropout = Dropout(config.dropout_prob)

    def forward(self, x: Tensor, attn_mask: Tensor | None, cos: Tensor, sin: Tensor,
                rows: QueryRows | None = None) -> Tensor:
        """x (B, L, H) -> (B, L, H), or (R, H) at the QueryRows `rows`."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        a = attention(qkv, attn_mask, self.dropout_p if self.training else 0.0, rows, (cos, sin))
        return self.out_dropout(self.out(a))


class GatedFeedForward(nn.Module):
    """GeGLU (act_fn gelu; swish gives SwiGLU): fc_out(act(value) * gate), no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, 2 * config.ff_dim, bias=False)
        self.fc_out = nn.Linear(config.ff_dim, config.hidden_size, bias=False)
        self.act = activation(config.act_fn)
        self.dropout = Dropout(config.dropout_prob)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(self.dropout(self.act(value) * gate))


class ModernBertLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = (nn.LayerNorm(config.hidden_size, eps=config.LN_eps, bias=False)
                          if index > 0 else nn.Identity())
        self.attn = RotarySelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps, bias=False)
        self.mlp = GatedFeedForward(config)
        self.is_global = config.is_global_attention_layer(index)

    def forward(self, x: Tensor, attn_mask: Tensor | None, cos: Tensor, sin: Tensor,
                rows: QueryRows | None = None) -> Tensor:
        """x (B, L, H) -> (B, L, H), or (R, H) at the QueryRows `rows`."""
        if rows is not None:
            y = rows.take(x) + self.attn(self.attn_norm(x), attn_mask, cos, sin, rows)
            return y + self.mlp(self.mlp_norm(y))
        x = x + self.attn(self.attn_norm(x), attn_mask, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertEncoder(nn.Module):
    """Embeddings, num_hidden_layers ModernBertLayers, final norm; the Encoder interface
    (`embeddings.word_embeddings`, `blocks()`, forward -> EncoderOutput). Token types are
    accepted and ignored: ModernBERT has no token-type embeddings."""

    supports_query_rows = True  # forward's `rows`: every layer is self-attention + a dense MLP

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ModernBERT's init: truncated normal (+-2 std); residual outputs scaled by 1/sqrt(2 layers)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2.0 * self.config.num_hidden_layers)
        init_truncated(self.embeddings.word_embeddings.weight, std)
        for layer in self.layers:
            init_truncated(layer.attn.qkv.weight, std)
            init_truncated(layer.attn.out.weight, out_std)
            init_truncated(layer.mlp.fc_in.weight, std)
            init_truncated(layer.mlp.fc_out.weight, out_std)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def attention_masks(self, attention_mask: Tensor | None, seq_len: int, device: torch.device,
                        padded: bool | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(global, local) masks for SDPA, True = attend; None = attend everywhere.
        global (B, 1, 1, L): real keys. local (B or 1, 1, L, L): real keys within the window;
        a padding query sees its whole window, so no row is empty (an empty row gives NaN,
        which would reach real tokens through the values of later layers)."""
        key_ok = None
        if has_padding(attention_mask, padded):
            key_ok = attention_mask.bool()                        # (B, L)
        global_mask = key_ok[:, None, None, :] if key_ok is not None else None
        if seq_len - 1 <= self.config.local_attention // 2:       # the window covers the sequence
            return global_mask, global_mask
        window = sliding_window_mask(seq_len, self.config.local_attention, device)[None, None]
        if key_ok is None:
            return None, window
        return global_mask, window & (key_ok[:, None, None, :] | ~key_ok[:, None, :, None])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, rows: QueryRows | None = None,
                padded: bool | None = None) -> EncoderOutput:
        """rows: compute the last layer's output only there (QueryRows). padded: whether
        attention_mask has a 0 (None: read from it, a device sync)."""
        x = self.embeddings(input_ids)
        L, device = input_ids.shape[1], input_ids.device
        global_mask, local_mask = self.attention_masks(attention_mask, L, device, padded)
        c = self.config
        rope_global = rotary_cos_sin(L, c.head_dim, c.global_rope_theta, device)
        rope_local = rotary_cos_sin(L, c.head_dim, c.local_rope_theta, device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            mask, rope = (global_mask, rope_global) if layer.is_global else (local_mask, rope_local)
            x = layer(x, mask, *rope, rows if i == last else None)
        return EncoderOutput(self.final_norm(x), x.new_zeros((), dtype=torch.float32))


def init_truncated(weight: Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
