"""Switch Transformer feed-forward layer (Fedus et al. 2021): top-1 routing over E experts.

Shapes: T tokens (B * L flattened), H hidden size, F feed-forward size, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .encoder import activation


class SwitchFFN(nn.Module):
    """Each real token goes to its top-1 expert, up to capacity = ceil(factor * tokens / E) per
    expert (tokens in sequence order first). Overflow tokens get 0 here, so the residual carries
    them unchanged. Padding tokens are never routed and do not count towards capacity or losses,
    so appending padding does not change any output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, Fd = config.n_experts, config.hidden_size, config.ff_dim
        self.num_experts = E
        self.router = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, H, Fd))
        self.b_in = nn.Parameter(torch.zeros(E, Fd))
        self.w_out = nn.Parameter(torch.empty(E, Fd, H))
        self.b_out = nn.Parameter(torch.zeros(E, H))
        self.act = activation(config.act_fn)
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.aux_loss_weight = config.router_aux_loss_weight
        self.z_loss_weight = config.router_z_loss_weight
        self.reset_parameters_with_std(config.initializer_range)

    def reset_parameters_with_std(self, std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return math.ceil(factor * num_tokens / self.num_experts)

    def route(self, x: Tensor, real: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (T, H) -> router logits and probabilities (T, E) in fp32, gate (T,) top-1
        probability, expert (T,) index, with padding tokens sent to the dummy bucket E."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
            probs = logits.softmax(-1)
        gate, expert = probs.max(-1)
        if real is not None:
            expert = expert.masked_fill(~real, self.num_experts)
        return logits, probs, gate, expert

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E = self.num_experts
        real = token_mask.reshape(-1) if token_mask is not None else None
        logits, probs, gate, expert = self.route(x, real)

        counts = torch.bincount(expert, minlength=E + 1)           # (E + 1,), last = padding
        order = torch.argsort(expert, stable=True)                 # tokens grouped by expert
        counts_host = counts.tolist()                              # sizes the expert matmuls
        num_real = x.shape[0] - counts_host[E]
        cap = self.capacity(num_real)
        kept_idx, kept_out = [], []
        start = 0
        for e in range(E):
            n = min(counts_host[e], cap)
            if n:
                idx = order[start:start + n]
                h = self.act(torch.addmm(self.b_in[e], x.index_select(0, idx), self.w_in[e]))
                h = torch.addmm(self.b_out[e], h, self.w_out[e])
                kept_idx.append(idx)
                kept_out.append(h * gate.index_select(0, idx).unsqueeze(1).to(h.dtype))
            start += counts_host[e]
        if kept_idx:
            out = x.new_zeros(x.shape[0], shape[-1], dtype=kept_out[0].dtype)
            out = out.index_copy(0, torch.cat(kept_idx), torch.cat(kept_out))
        else:
            out = torch.zeros_like(x)
        return out.view(shape), self.router_loss(logits, probs, counts[:E], real, num_real)

    def router_loss(self, logits: Tensor, probs: Tensor, counts: Tensor, real: Tensor | None,
                    num_real: int) -> Tensor:
        """alpha * E * sum_i f_i * P_i (+ z-loss), over real tokens only; f_i counts tokens
        routed to expert i before capacity is applied, P_i is the mean router probability."""
        if num_real == 0:
            return logits.sum() * 0.0
        if real is not None:
            probs = probs * real.unsqueeze(1)
        f = counts.float() / num_real
        p = probs.sum(0) / num_real
        loss = self.aux_loss_weight * self.num_experts * (f * p).sum()
        if self.z_loss_weight > 0:
            z = torch.logsumexp(logits, dim=-1).square()
            if real is not None:
                z = z * real
            loss = loss + self.z_loss_weight * z.sum() / num_real
        return loss
