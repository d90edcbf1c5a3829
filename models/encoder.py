"""Transformer encoder backbone: embeddings, layers (pre/post-LN, shared layer groups).

Shapes: B batch, L sequence length, H hidden size, D embedding size (ALBERT factorization),
N number of heads, K head size (H / N), F feed-forward size, V vocabulary size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .activations import activation
from .config import ModelConfig
from .dropout import Dropout, attend
from .qkv import apply_rotary, split_heads
from .tied import TiedEmbedding
from .moe import SwitchFFN


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor        # (B, L, H); (R, H) when the encoder was given QueryRows
    aux_loss: Tensor                 # scalar: summed router losses (0 without MoE)


class QueryRows(NamedTuple):
    """The positions whose final hidden state is used (MLM's masked tokens, [CLS] for SOP). The
    last layer then computes keys and values at every position but its queries, attention output
    and feed-forward only at these R rows, so its output there is the full layer's (as NVIDIA's
    MLPerf BERT does): at BERT-base size 8.4 H^2 of its 12 H^2 per unused token are skipped.
    Built from the labels on the host where the batch is made (models.tasks.pretrain_hints), the
    forward reads nothing back from the device; `from_mask` on a GPU tensor waits for it."""
    index: Tensor      # (R,) flat positions b * L + l, ascending
    slots: Tensor      # (R,) b * M + j: each row's place in a (B, M) layout of queries
    positions: Tensor  # (B, M) the sequence position of each query slot (0 where unused)
    starts: Tensor     # (B,) the first of each sequence's rows among the R
    labelled: Tensor | None = None  # (R',) the rows among the R that carry an MLM label (None: all)

    @staticmethod
    def from_mask(need: Tensor) -> "QueryRows":
        """need (B, L) bool: the positions to compute (a sequence may have none)."""
        B, L = need.shape
        index = need.reshape(-1).nonzero().squeeze(1)
        counts = need.sum(1)
        M = max(int(counts.max()), 1)
        batch = index // L
        starts = counts.cumsum(0) - counts
        slots = batch * M + torch.arange(index.numel(), device=need.device) - starts[batch]
        positions = index.new_zeros(B * M).index_copy_(0, slots, index % L).view(B, M)
        return QueryRows(index, slots, positions, starts)

    def take(self, x: Tensor) -> Tensor:
        """x (B, L, ...) -> its selected rows (R, ...)."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)


def has_padding(attention_mask: Tensor | None, padded: bool | None = None) -> bool:
    """Whether attention_mask hides a position; `padded` (known where the batch was made) saves
    reading the mask back from the device."""
    if attention_mask is None:
        return False
    return bool(padded) if padded is not None else not bool(attention_mask.all())


def attend_rows(q: Tensor, k: Tensor, v: Tensor, rows: QueryRows, attn_mask: Tensor | None,
                dropout_p: float) -> Tensor:
    """SDPA for the selected query rows only. q (R, N, K); k, v (B, N, L, K); attn_mask None,
    (B, 1, 1, L) or (B or 1, 1, L, L) (True = attend) -> (R, N * K). The rows are laid out as
    (B, M) queries per sequence; unused slots take position 0's mask (never an empty row) and
    are dropped."""
    B, N, L, K = k.shape
    M = rows.positions.shape[1]
    qp = q.new_zeros(B * M, N, K).index_copy(0, rows.slots, q).view(B, M, N, K).transpose(1, 2)
    if attn_mask is not None and attn_mask.shape[-2] != 1:      # a mask row per query position
        full = attn_mask.expand(B, attn_mask.shape[1], L, L)
        attn_mask = full.gather(2, rows.positions[:, None, :, None].expand(B, full.shape[1], M, L))
    a = attend(qp, k, v, attn_mask, dropout_p)
    return a.transpose(1, 2).reshape(B * M, N * K).index_select(0, rows.slots)


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.embedding_dim
        self.word_embeddings = TiedEmbedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embedding, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.LN_eps)
        self.dropout = Dropout(config.dropout_prob)
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


def attention(qkv: Tensor, attn_mask: Tensor | None, dropout_p: float, rows: QueryRows | None = None,
              rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """qkv (B, L, 3, N, K) -> the attention output (B, L, N * K), or (R, N * K) at the QueryRows `rows`;
    rope: RoPE's (cos, sin) (L, K), applied to queries and keys."""
    B, L, _, N, K = qkv.shape
    if rows is not None:
        k, v = qkv[:, :, 1:].permute(2, 0, 3, 1, 4).unbind(0)     # (B, N, L, K) each
        q = rows.take(qkv[:, :, 0])                                # (R, N, K)
        if rope is not None:
            cos, sin = rope
            pos = rows.index % L
            q, k = apply_rotary(q, cos[pos, None], sin[pos, None]), apply_rotary(k, cos, sin)
        return attend_rows(q, k, v, rows, attn_mask, dropout_p)
    q, k, v = split_heads(qkv, rope)                              # (B, N, L, K) each
    a = attend(q, k, v, attn_mask, dropout_p)
    return a.transpose(1, 2).reshape(B, L, N * K)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch SDPA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.dropout_prob

    def forward(self, x: Tensor, attn_mask: Tensor | None, token_mask: Tensor | None = None,
                rows: QueryRows | None = None) -> Tensor:
        """x (B, L, H) -> (B, L, H), or (R, H) at the QueryRows `rows`."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        return self.out(attention(qkv, attn_mask, self.dropout_p if self.training else 0.0, rows))


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
        self.dropout = Dropout(config.dropout_prob)
        self.pre_ln = config.ln_pos == 0

    def forward(self, x: Tensor, attn_mask: Tensor | None, token_mask: Tensor | None,
                rows: QueryRows | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, L, H) -> (B, L, H); with `rows` (self-attention and a dense FFN only) -> (R, H)."""
        if rows is not None:
            y = rows.take(x)
            if self.pre_ln:
                y = y + self.dropout(self.mixer(self.mixer_norm(x), attn_mask, token_mask, rows))
                f, aux = self.ffn(self.ffn_norm(y), None)
                return y + self.dropout(f), aux
            y = self.mixer_norm(y + self.dropout(self.mixer(x, attn_mask, token_mask, rows)))
            f, aux = self.ffn(y, None)
            return self.ffn_norm(y + self.dropout(f)), aux
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

    @property
    def supports_query_rows(self) -> bool:
        """Whether forward's `rows` works: the last layer has self-attention and a dense FFN."""
        last = self.layers[(self.config.num_hidden_layers - 1) // self.config.layer_group]
        return isinstance(last.mixer, SelfAttention) and isinstance(last.ffn, FeedForward)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, rows: QueryRows | None = None,
                padded: bool | None = None) -> EncoderOutput:
        """rows: compute the last layer's output only there (QueryRows; supports_query_rows).
        padded: whether attention_mask has a 0 (None: read from it, a device sync)."""
        x = self.embeddings(input_ids, token_type_ids)
        token_mask = None
        attn_mask = None
        if has_padding(attention_mask, padded):
            token_mask = attention_mask.bool()                    # (B, L)
            attn_mask = token_mask[:, None, None, :]              # (B, 1, 1, L), True = attend
        aux_total = x.new_zeros((), dtype=torch.float32)
        group = self.config.layer_group
        last = self.config.num_hidden_layers - 1
        for i in range(self.config.num_hidden_layers):
            x, aux = self.layers[i // group](x, attn_mask, token_mask, rows if i == last else None)
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
