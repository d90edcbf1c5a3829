"""Mix LM: self-attention replaced by MixConv token mixing (MixNet, Tan & Le 2019).

The hidden channels are split into n_experts groups; group g is convolved along the sequence
with a depthwise 1-D kernel of odd size k_g (evenly spaced from 3 to kernel_size), then a
pointwise projection mixes the channels. Padding positions are zeroed before the convolution,
so they never leak into real positions.

Shapes: B batch, L sequence length, H hidden size, C channels of one group.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .encoder import Encoder, EncoderLayer, FeedForward


class MixConv(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        H, n = config.hidden_size, config.n_experts
        self.kernel_sizes = config.mix_kernel_sizes()
        # MixNet's equal split; the first groups take the remainder. The depthwise kernels keep
        # PyTorch's default init (uniform +-1/sqrt(k), an averaging filter of order 1).
        self.channels = [H // n + (1 if g < H % n else 0) for g in range(n)]
        self.convs = nn.ModuleList(
            nn.Conv1d(c, c, k, padding=k // 2, groups=c)
            for c, k in zip(self.channels, self.kernel_sizes))
        self.out = nn.Linear(H, H)

    def forward(self, x: Tensor, attn_mask: Tensor | None, token_mask: Tensor | None) -> Tensor:
        if token_mask is not None:
            x = x * token_mask.unsqueeze(-1).to(x.dtype)
        xt = x.transpose(1, 2)                                    # (B, H, L)
        if len(self.convs) == 1:
            y = self.convs[0](xt)
        else:
            parts = torch.split(xt, self.channels, dim=1)         # (B, C, L) each
            y = torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1)
        return self.out(y.transpose(1, 2))


class MixLMEncoder(Encoder):
    def make_layer(self, config: ModelConfig, index: int) -> nn.Module:
        return EncoderLayer(config, MixConv(config), FeedForward(config))
