"""The last layer computed only at the rows the pretraining heads read (models.encoder.QueryRows):
losses, metrics and gradients equal to the full last layer's, on real Korean batches with padding."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.encoder import QueryRows
from models.heads import IGNORE_INDEX

CONFIGS = Path(__file__).parent / "configs"


def config(name: str, **overrides) -> ModelConfig:
    """A tiny test config with room for the tiny tokenizer's 2,000 pieces."""
    return ModelConfig.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()) | {"vocab_size": 2048}
                                 | overrides)


CASES = {
    "transformer (post-LN)": config("tiny_transformer"),
    "transformer pre-LN": config("tiny_transformer", ln_pos=0),
    "albert (shared layer)": config("tiny_albert"),
    "modernbert (local last layer)": config("tiny_modernbert", num_hidden_layers=4),
    "modernbert (global last layer)": config("tiny_modernbert", num_hidden_layers=3),
}


@pytest.fixture(scope="module")
def batch(tiny_corpus, tiny_tokenizer):
    """NSMC reviews, right-padded to 64 (longer than the tiny ModernBERT window of 8), 15% masked;
    the last row has no masked token."""
    text = [t for t in tiny_corpus.read_text(encoding="utf-8").splitlines() if t.strip()]
    lines = [" ".join(text[:30]), text[3], " ".join(text[7:12]), text[20]]
    tok = tiny_tokenizer
    rows = [[tok.cls_id] + tok.encode(t)[:62] + [tok.sep_id] for t in lines]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_id)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    g = torch.Generator().manual_seed(0)
    picked = (torch.rand(ids.shape, generator=g) < 0.15) & mask.bool()
    picked[:, 0] = False
    picked[-1] = False
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    assert L == 64 and mask.sum(1).min() < 20 and picked.sum() > 10
    return {"input_ids": ids.masked_fill(picked, tok.mask_id), "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids), "mlm_labels": labels}


def dense_reference(model, batch, sop_labels):
    """The heads on the full last layer's output (the path without QueryRows)."""
    hidden, _ = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    out = model.mlm_head.loss(hidden, batch["mlm_labels"], model.word_embeddings)
    loss = out["mlm_loss"]
    if model.sop_head is not None:
        logits = model.sop_head(hidden).float()
        out["sop_logits"] = logits
        loss = loss + F.cross_entropy(logits, sop_labels)
    out["loss"] = loss
    return out


@pytest.mark.parametrize("objective", ["sop", "mlm"])
@pytest.mark.parametrize("case", list(CASES))
def test_last_layer_at_query_rows_equals_the_full_layer(case, objective, batch):
    torch.manual_seed(0)
    model = build_model(CASES[case], "pretrain", objective=objective)
    assert model.encoder.supports_query_rows
    model.train()     # dropout 0 in the tiny configs: train mode, no randomness
    sop = torch.tensor([0, 1, 1, 0])
    extra = {"sop_labels": sop} if objective == "sop" else {}
    ours = model(**batch, **extra)
    ours["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = dense_reference(model, batch, sop)
    ref["loss"].backward()
    for key in ["loss", "mlm_loss", "mlm_acc"] + (["sop_logits"] if objective == "sop" else []):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_query_rows_layout():
    need = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    rows = QueryRows.from_mask(need)
    assert rows.index.tolist() == [0, 2, 3, 9]
    assert rows.positions.tolist() == [[0, 2, 3], [0, 0, 0], [1, 0, 0]]
    assert rows.slots.tolist() == [0, 1, 2, 6]
    x = torch.arange(12).view(3, 4)
    assert rows.take(x).tolist() == [0, 2, 3, 9]


def test_models_without_query_rows_keep_the_full_path(batch):
    """Mix LM (convolutions read neighbours) and a Switch last layer (routing capacity depends on
    the token count) run the full last layer."""
    for name in ("tiny_mix_lm", "tiny_switch"):
        cfg = config(name)
        model = build_model(cfg, "pretrain", objective="mlm")
        if name == "tiny_switch":
            assert cfg.is_moe_layer(cfg.num_distinct_layers - 1)
        assert not model.encoder.supports_query_rows
        out = model(**batch)
        assert torch.isfinite(out["loss"])


def test_dropout_still_applies_at_the_query_rows(batch):
    """In training mode with dropout the sparse last layer draws masks (two calls differ) and in
    eval mode it is deterministic and equal to the dense path."""
    cfg = dataclasses.replace(CASES["transformer (post-LN)"], dropout_prob=0.1)
    torch.manual_seed(0)
    model = build_model(cfg, "pretrain", objective="mlm")
    model.train()
    a, b = model(**batch)["loss"].item(), model(**batch)["loss"].item()
    assert a != b
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["loss"], dense_reference(model, batch, None)["loss"])
