"""models.dropout: the CPU keep masks (rate, independence, seeding), dropout's values and gradients,
and attention with dropout against SDPA (same probabilities, masks of every kind, gradients)."""
from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.dropout as md
from models import build_model, load_config


def test_keep_mask_rate_and_independence():
    torch.manual_seed(0)
    n = 1 << 20
    for p in (0.1, 0.3, 0.5):
        drop = round(p * 65536)
        keep = md.keep_mask((n,), drop)
        assert keep.dtype == torch.bool and keep.shape == (n,)
        rate = 1 - keep.double().mean().item()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(rate - drop / 65536) < 5 * sigma, (p, rate)
        # every slice of the 64-bit draws is used alike, and neighbours are uncorrelated
        by_slot = 1 - keep.view(-1, 4).double().mean(0)
        assert (by_slot - drop / 65536).abs().max() < 5 * sigma * 2, by_slot
        both = (~keep[:-1] & ~keep[1:]).double().mean().item()
        assert abs(both - rate * rate) < 5 * (rate * rate / n) ** 0.5 + 1e-4
    odd = md.keep_mask((3, 5, 7), 6554)          # numel not a multiple of 4
    assert odd.shape == (3, 5, 7)


def test_keep_mask_follows_the_seed():
    torch.manual_seed(5)
    a = md.keep_mask((4, 1000), 6554)
    b = md.keep_mask((4, 1000), 6554)
    torch.manual_seed(5)
    assert torch.equal(md.keep_mask((4, 1000), 6554), a)
    assert not torch.equal(a, b)


def test_dropout_values_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(64, 257, requires_grad=True)
    y = md.dropout(x, 0.1)
    scale = 65536 / (65536 - 6554)
    kept = y != 0
    assert 0.85 < kept.double().mean().item() < 0.95
    torch.testing.assert_close(y[kept], x.detach()[kept] * scale, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept * scale, rtol=0, atol=1e-6)
    # the mean is kept (the scale uses the rounded p)
    ones = torch.ones(1 << 20)
    assert abs(md.dropout(ones, 0.1).mean().item() - 1) < 3e-3


def test_dropout_falls_back_to_torch():
    x = torch.randn(1000)
    assert md.dropout(x, 0.1, training=False) is x
    assert torch.equal(md.dropout(x, 0.0), x)
    assert torch.equal(md.dropout(x, 1.0), torch.zeros_like(x))     # rounds to 2^16: torch's
    torch.manual_seed(3)
    tiny = md.dropout(x, 1e-6)                                        # rounds to 0: torch's
    torch.manual_seed(3)
    assert torch.equal(tiny, F.dropout(x, 1e-6))


def test_dropout_module_is_an_nn_dropout():
    d = md.Dropout(0.25)
    assert isinstance(d, nn.Dropout) and d.p == 0.25 and repr(d) == repr(nn.Dropout(0.25))
    assert d.state_dict() == {}
    x = torch.randn(8, 8)
    assert torch.equal(d.eval()(x), x)
    torch.manual_seed(0)
    y = d.train()(x)
    assert ((y == 0) | torch.isclose(y, x * 65536 / (65536 - 16384))).all()


def test_dropout_compiles_whole_and_draws_the_eager_masks():
    """torch.compile traces the keep masks without a graph break; with --compile's fallback_random
    (trainer.engines.base.compile_layers) they are the eager masks."""
    import torch._inductor.config as inductor_config

    def f(x):
        return md.dropout(x, 0.3) * 2
    torch._dynamo.reset()
    x = torch.randn(16, 300)
    with mock.patch.object(inductor_config, "fallback_random", True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(4)
        got = compiled(x)
    torch.manual_seed(4)
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)


def _all_kept(shape, drop, device=None):
    return torch.ones(shape, dtype=torch.bool, device=device)


MASKS = {
    "none": lambda B, L: None,
    "padding": lambda B, L: (torch.arange(L) < torch.tensor([L, L - 3])[:, None])[:, None, None, :],
    # a sliding window over padding leaves rows that may attend nowhere (the last padded queries)
    "window+padding": lambda B, L: (((torch.arange(L)[:, None] - torch.arange(L)).abs() <= 2)
                                    & (torch.arange(L) < torch.tensor([L, 3])[:, None, None]))[:, None],
    "additive": lambda B, L: torch.randn(B, 1, L, L),
}


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_attend_matches_sdpa(kind):
    """With every probability kept, attention with dropout is SDPA without dropout times the scale:
    outputs and gradients, for every mask kind; rows that may attend nowhere stay finite."""
    torch.manual_seed(0)
    B, N, L, K = 2, 3, 11, 8
    q, k, v = (torch.randn(B, N, L, K, requires_grad=True) for _ in range(3))
    mask = MASKS[kind](B, L)
    scale = 65536 / (65536 - 6554)
    with mock.patch.object(md, "keep_mask", _all_kept):
        out = md.attend(q, k, v, mask, 0.1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * scale
    assert torch.isfinite(out).all()
    rows = torch.ones(B, 1, L, 1, dtype=torch.bool) if mask is None or mask.dtype != torch.bool \
        else mask.expand(B, 1, L, L).any(-1, keepdim=True)          # rows with somewhere to attend
    torch.testing.assert_close(out * rows, ref * rows, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out) * rows
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attend_drops_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    seen, real = {}, md.keep_mask

    def recording(shape, drop, device=None):
        seen["keep"] = real(shape, drop, device)
        return seen["keep"]
    with mock.patch.object(md, "keep_mask", recording):
        out = md.attend(q, k, v, None, 0.2)
    drop = round(0.2 * 65536)
    probs = torch.softmax(q @ k.transpose(-2, -1) / 4, -1) * seen["keep"] * 65536 / (65536 - drop)
    torch.testing.assert_close(out, probs @ v, rtol=1e-5, atol=1e-6)
    assert seen["keep"].shape == (2, 4, 64, 64)
    assert 0.17 < 1 - seen["keep"].double().mean().item() < 0.23
    # without dropout it is SDPA itself
    torch.testing.assert_close(md.attend(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v))


def test_models_use_it_and_stay_seeded():
    """A training step of a model with dropout uses the fast path (in its hidden and attention
    dropouts) and is reproducible from the seed; eval is deterministic."""
    cfg = dataclasses.replace(load_config("tests/configs/tiny_transformer.json"), dropout_prob=0.1)
    torch.manual_seed(0)
    model = build_model(cfg, "pretrain", objective="mlm")
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    calls = []
    real = md.keep_mask

    def counting(shape, drop, device=None):
        calls.append(tuple(shape))
        return real(shape, drop, device)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        with mock.patch.object(md, "keep_mask", counting):
            losses.append(model(input_ids=ids, mlm_labels=labels)["loss"].item())
    assert losses[0] == losses[1]
    heads = cfg.num_heads
    assert any(len(s) == 4 and s[1] == heads for s in calls)     # attention probabilities
    assert any(len(s) == 3 and s[-1] == cfg.hidden_size for s in calls)   # hidden states
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids, mlm_labels=labels)["loss"]
        b = model(input_ids=ids, mlm_labels=labels)["loss"]
    assert torch.equal(a, b)


def test_attend_keeps_sdpa_for_half_types():
    """CPU SDPA computes bfloat16 / float16 attention in float32; those stay with it."""
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.bfloat16) for _ in range(3))
    with mock.patch.object(md, "keep_mask", side_effect=AssertionError("fast path taken")):
        torch.manual_seed(0)
        got = md.attend(q, k, v, None, 0.1)
    torch.manual_seed(0)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
