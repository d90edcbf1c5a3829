"""Transformer encoder backbone: embeddings, layers (pre/post-LN, shared layer groups).

Shapes: B batch, L sequence length, H hidden size, D embedding size (ALBERT factorization),
N number of heads, K head size (H / N), F feed-forward size, V vocabulary size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .config import ModelConfig
from .moe import SwitchFFN


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor        # (B, L, H)
    aux_loss: Tensor                 # scalar: summed router losses (0 without MoE)


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.embedding_dim
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embedding, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.LN_eps)
        self.dropout = nn.Dropout(config.dropout_prob)
        # ALBERT's embedding_hidden_mapping_in: D -> H.
        self.projection = nn.Linear(d, config.hidden_size) if d != config.hidden_size else None
        self.max_positions = config.max_position_embedding

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        L = input_ids.shape[1]
        if L > self.max_positions:
            raise ValueError(f"sequence length {L} exceeds max_position_embedding "
                             f"({self.max_positions}); shorten inputs (--max_seq_length)")
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.norm(x))
        if self.projection is not None:
            x = self.projection(x)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch SDPA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.dropout_prob

    def forward(self, x: Tensor, attn_mask: Tensor | None,
                token_mask: Tensor | None = None) -> Tensor:
        B, L, H = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # (B, N, L, K) each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(B, L, H))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.ff_dim)
        self.fc_out = nn.Linear(config.ff_dim, config.hidden_size)
        self.act = activation(config.act_fn)

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.fc_out(self.act(self.fc_in(x))), None


class EncoderLayer(nn.Module):
    """A token mixer (self-attention here) and an FFN, each with a residual and a LayerNorm
    placed after the residual (ln_pos 1, BERT) or before the sublayer (ln_pos 0)."""

    def __init__(self, config: ModelConfig, mixer: nn.Module, ffn: nn.Module):
        super().__init__()
        self.mixer = mixer
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps)
        self.ffn = ffn
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.pre_ln = config.ln_pos == 0

    def forward(self, x: Tensor, attn_mask: Tensor | None,
                token_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.pre_ln:
            x = x + self.dropout(self.mixer(self.mixer_norm(x), attn_mask, token_mask))
            f, aux = self.ffn(self.ffn_norm(x), token_mask)
            return x + self.dropout(f), aux
        x = self.mixer_norm(x + self.dropout(self.mixer(x, attn_mask, token_mask)))
        f, aux = self.ffn(x, token_mask)
        return self.ffn_norm(x + self.dropout(f)), aux


class Encoder(nn.Module):
    """Embeddings + num_hidden_layers layers; layer i runs distinct layer i // layer_group."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(self.make_layer(config, j)
                                    for j in range(config.num_distinct_layers))
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.LN_eps)
                           if config.ln_pos == 0 else None)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def make_layer(self, config: ModelConfig, index: int) -> nn.Module:
        raise NotImplementedError  # subclasses choose the token mixer and FFN

    def blocks(self) -> list[nn.Module]:
        """The distinct layers (a shared ALBERT layer once): the unit for per-layer wrapping."""
        return list(self.layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> EncoderOutput:
        x = self.embeddings(input_ids, token_type_ids)
        token_mask = None
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            token_mask = attention_mask.bool()                    # (B, L)
            attn_mask = token_mask[:, None, None, :]              # (B, 1, 1, L), True = attend
        aux_total = x.new_zeros((), dtype=torch.float32)
        group = self.config.layer_group
        for i in range(self.config.num_hidden_layers):
            x, aux = self.layers[i // group](x, attn_mask, token_mask)
            if aux is not None:
                aux_total = aux_total + aux
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, aux_total)


class TransformerEncoder(Encoder):
    """BERT/ALBERT encoder; with n_experts > 1 its FFNs are Switch Transformer MoE layers."""

    def make_layer(self, config: ModelConfig, index: int) -> nn.Module:
        if config.is_moe_layer(index):
            ffn: nn.Module = SwitchFFN(config)
        else:
            ffn = FeedForward(config)
        return EncoderLayer(config, SelfAttention(config), ffn)


def init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters_with_std"):
        module.reset_parameters_with_std(std)
