"""Switch Transformer feed-forward layer (Fedus et al. 2021): top-1 routing over E experts.

Shapes: T tokens (B * L flattened), H hidden size, F feed-forward size, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .config import ModelConfig


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
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts_host = counts.tolist()                              # sizes the expert matmuls
        num_real = x.shape[0] - counts_host[E]
        if num_real == 0:
            return torch.zeros_like(x).view(shape), self.router_loss(logits, probs, counts[:E],
                                                                     real, num_real)
        cap = self.capacity(num_real)
        # Sorted rows: [kept_0, dropped_0, kept_1, dropped_1, ..., padding]. Gathers with a
        # permutation and its inverse (instead of index_select/index_copy per expert) keep the
        # backward pass to gathers too, and split/unbind backward to one cat/stack each.
        sizes = []
        for e in range(E):
            kept = min(counts_host[e], cap)
            sizes += [kept, counts_host[e] - kept]
        sizes.append(counts_host[E])
        rows = _permute_rows(x, order, inverse).split(sizes)
        gates = gate.index_select(0, order).split(sizes)
        w_in, b_in = self.w_in.unbind(0), self.b_in.unbind(0)
        w_out, b_out = self.w_out.unbind(0), self.b_out.unbind(0)
        outs: list[Tensor | int] = []
        for e in range(E):
            if sizes[2 * e]:
                h = self.act(torch.addmm(b_in[e], rows[2 * e], w_in[e]))
                h = torch.addmm(b_out[e], h, w_out[e])
                outs.append(h * gates[2 * e].unsqueeze(1).to(h.dtype))
            outs.append(sizes[2 * e + 1])                          # overflow: zeros
        outs.append(sizes[-1])                                     # padding: zeros
        dtype = next(o.dtype for o in outs if isinstance(o, Tensor))
        ys = torch.cat([o if isinstance(o, Tensor) else x.new_zeros(o, shape[-1], dtype=dtype)
                        for o in outs if not isinstance(o, int) or o])
        out = _permute_rows(ys, inverse, order)
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


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose backward is the gather grad[inverse] rather than a scatter-add."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _permute_rows(x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    return _PermuteRows.apply(x, perm, inverse)
