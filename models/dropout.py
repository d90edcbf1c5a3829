"""Dropout and attention dropout, faster on the CPU.

torch's CPU dropout draws one Bernoulli per element into a float mask, divides it by 1 - p and
multiplies (three passes over a float tensor, 4 bytes per element kept for backward); with
attention dropout, CPU SDPA leaves its fused kernel for the math path, which does the same to the
(B, N, L, L) probabilities. Here the keep mask comes from 64 random bits at a time (torch's
generator, so seeds, checkpointed RNG state and activation recomputation behave as before, and
`--compile`, which draws through the same generator on the CPU, gets the eager masks), one
16-bit slice per element compared to a threshold: p is rounded to a multiple of 2^-16 (0.1 ->
0.1000061; FlashAttention rounds to 2^-8) and kept values are scaled by 1 / (1 - that p), so the
expectation is exact. The mask is kept as bools for backward. On a BERT-base CPU step the
dropouts cost 2.7-3.9x less (bench/model_throughput.py --torch_dropout is the ablation).

On other devices (CUDA has fused dropout kernels) and where p rounds to 0 or 1, these are torch's
own dropout and SDPA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16


def _levels(x: Tensor, p: float) -> int:
    """p in units of 2^-16 where this module's path applies, else 0 (use torch's)."""
    if x.device.type != "cpu":
        return 0
    drop = round(p * _LEVELS)
    return drop if 0 < drop < _LEVELS else 0


def keep_mask(shape: torch.Size | tuple[int, ...], drop: int, device: torch.device | None = None) -> Tensor:
    """bool tensor of `shape`, each element False with probability drop / 2^16, independently."""
    n = math.prod(shape)
    # 64 uniform bits per draw (torch.randint: traced by torch.compile, where --compile's
    # fallback_random draws the eager values); the range misses one value of 2^64
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:n].view(shape) >= drop - _LEVELS // 2


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training), with the fast keep mask where it applies."""
    drop = _levels(x, p) if training else 0
    if not drop:
        return F.dropout(x, p, training)
    # (where, not a multiply by the bools: that would first convert them to x's dtype)
    return torch.where(keep_mask(x.shape, drop, x.device), x, 0.0).mul_(_LEVELS / (_LEVELS - drop))


class Dropout(nn.Dropout):
    """nn.Dropout (same attributes, no state) through `dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p) for q (..., Lq, K), k and v
    (..., L, K), attn_mask bool (True = attend) or additive, broadcastable to (..., Lq, L). With
    dropout on the CPU in float32 or float64 the scores are computed here (what SDPA's math path
    does there) and the probabilities dropped with the fast mask; a query row that may attend
    nowhere gets a uniform average instead of SDPA's zeros (finite either way: only padding rows
    can be such rows). Half and bfloat16 keep SDPA, which computes them in float32."""
    if q.dtype not in (torch.float32, torch.float64) or not _levels(q, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill_(attn_mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    return torch.matmul(dropout(scores.softmax(-1), dropout_p), v)
