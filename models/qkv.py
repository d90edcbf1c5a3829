"""Queries, keys and values from the fused projection, with RoPE, and a backward that writes their
gradients straight into the projection's layout.

Through autograd, `qkv.permute(...).unbind(0)` gives back its three gradients by stacking them into
(3, B, N, L, K) and then copying that into the projection's (B, L, 3, N, K) layout: two passes, the
second a transposing copy (on a ModernBERT-base CPU step the pair took 5% of the step, the `cat`s of
RoPE's halves in forward and backward another 3%). `split_heads` returns the same views (q and k
rotated, in float32 arithmetic as transformers does, without `cat`), and its backward allocates the
(B, L, 3, N, K) gradient once and writes each gradient (q's and k's rotated back) into its slot.
Inside torch.compile the plain ops are used (inductor fuses those itself).
"""
from __future__ import annotations

import torch
from torch import Tensor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., K) rotated by position (RoPE; cos, sin broadcast to x), in float32 (as transformers
    does), cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None, inverse: bool = False) -> Tensor:
    """RoPE: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) for x's halves x1, x2
    (cos, sin broadcast to x, float32), into `out` (default a new contiguous tensor of x's dtype).
    inverse: the transpose (the gradient of the rotation: rotation by minus the angle)."""
    h = x.shape[-1] // 2
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    if inverse:     # d/dx1 = c1 g1 + s2 g2, d/dx2 = c2 g2 - s1 g1
        torch.mul(x1, c1, out=o1).addcmul_(x2, s2)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s1, value=-1)
    else:           # o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2
        torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
    return out


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor | None, sin: Tensor | None):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ctx.shape, ctx.rope = qkv.shape, cos is not None
        if ctx.rope:
            ctx.save_for_backward(cos, sin)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        ref = next(g for g in grads if g is not None)
        grad = torch.empty(ctx.shape, dtype=ref.dtype, device=ref.device)
        slots = grad.permute(2, 0, 3, 1, 4).unbind(0)                # (B, N, L, K) views into grad
        cos, sin = ctx.saved_tensors if ctx.rope else (None, None)
        for j, (g, slot) in enumerate(zip(grads, slots)):
            if g is None:
                slot.zero_()
            elif ctx.rope and j < 2:
                rotate(g, cos, sin, out=slot, inverse=True)
            else:
                slot.copy_(g)
        return grad, None, None


def plain_split_heads(qkv: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`split_heads` by plain ops, whose gradients autograd stacks and copies back (under torch.compile,
    which fuses them itself)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    return q, k, v


def split_heads(qkv: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, L, 3, N, K) -> q, k, v (B, N, L, K); rope: RoPE's (cos, sin) (L, K), applied to q and k."""
    if torch.compiler.is_compiling():
        return plain_split_heads(qkv, rope)
    cos, sin = rope if rope is not None else (None, None)
    return _SplitHeads.apply(qkv, cos, sin)
