"""models.qkv: split_heads (and its RoPE) against the plain permute / unbind / apply_rotary path:
values and gradients, with and without RoPE, float32 and bfloat16, and an unused output."""
from __future__ import annotations

import pytest
import torch

from models.modernbert import rotary_cos_sin
from models.qkv import apply_rotary, rotate, split_heads


def rot(x, cos, sin):
    """RoPE as transformers writes it, in x's dtype (apply_rotary computes in float32)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def reference(qkv, rope):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if rope is not None:
        q, k = rot(q, *rope), rot(k, *rope)
    return q, k, v


@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_heads_values_and_gradients(with_rope, dtype):
    torch.manual_seed(0)
    B, L, N, K = 2, 7, 3, 8
    rope = rotary_cos_sin(L, K, 10000.0) if with_rope else None
    if rope is not None and dtype == torch.float64:
        rope = tuple(t.double() for t in rope)
    qkv = torch.randn(B, L, 3, N, K, dtype=dtype, requires_grad=True)
    got, want = split_heads(qkv, rope), reference(qkv, rope)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        assert a.shape == (B, N, L, K)
        torch.testing.assert_close(a, b, **tol)
    grads = [torch.randn(B, N, L, K, dtype=dtype) for _ in range(3)]
    g_got = torch.autograd.grad(got, qkv, grads)[0]
    g_want = torch.autograd.grad(want, qkv, grads)[0]
    assert g_got.shape == qkv.shape and g_got.is_contiguous()
    torch.testing.assert_close(g_got, g_want, **tol)
    # only some outputs used: the others' slots are zero
    g_got = torch.autograd.grad(split_heads(qkv, rope)[1].sum(), qkv)[0]
    g_want = torch.autograd.grad(reference(qkv, rope)[1].sum(), qkv)[0]
    torch.testing.assert_close(g_got, g_want, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: split_heads(t, rope), (qkv,))


def test_rotate_bfloat16_and_inverse():
    torch.manual_seed(0)
    cos, sin = rotary_cos_sin(16, 32, 160000.0)
    x = torch.randn(2, 4, 16, 32)
    xb = x.bfloat16()
    torch.testing.assert_close(rotate(xb, cos, sin).float(), apply_rotary(xb, cos, sin).float(),
                               rtol=1e-2, atol=1e-2)
    assert rotate(xb, cos, sin).dtype == torch.bfloat16
    # the inverse undoes the rotation
    torch.testing.assert_close(rotate(rotate(x, cos, sin), cos, sin, inverse=True), x, rtol=1e-5, atol=1e-5)


def test_split_heads_under_no_grad_and_compile():
    torch.manual_seed(0)
    qkv = torch.randn(1, 5, 3, 2, 4)
    rope = rotary_cos_sin(5, 4, 10000.0)
    with torch.no_grad():
        for a, b in zip(split_heads(qkv, rope), reference(qkv, rope)):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: split_heads(t, rope), backend="eager", fullgraph=True)
    for a, b in zip(compiled(qkv), reference(qkv, rope)):
        torch.testing.assert_close(a, b)
