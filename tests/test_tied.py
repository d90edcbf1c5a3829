"""The word embeddings and the MLM decoder sharing one weight-gradient tensor (models.tied): every
gradient equal to the nn.Embedding path, and the two full-size temporaries gone."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from models import ModelConfig, build_model
from models.heads import IGNORE_INDEX
from models.tied import TiedEmbedding

CONFIGS = Path(__file__).parent / "configs"
V = 2048


def config(name: str, **overrides) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()) | {"vocab_size": V}
                                 | overrides)


def batch(seed: int = 0, B: int = 4, L: int = 24, no_mask_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, L // 2:] = 0                                   # a padded row
    picked = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
    if no_mask_row:
        picked[-1] = False                                 # a row with nothing to predict
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    return ids.masked_fill(picked, 4), mask, labels


def inputs(objective: str, all_unmasked: bool = False) -> dict:
    ids, mask, labels = batch()
    if all_unmasked:
        labels = torch.full_like(labels, IGNORE_INDEX)
    if objective == "ict":
        qi, qm, ql = batch(1)
        return {"query_input_ids": qi, "query_attention_mask": qm, "query_mlm_labels": ql,
                "passage_input_ids": ids, "passage_attention_mask": mask, "passage_mlm_labels": labels}
    out = {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels}
    if objective == "sop":
        out["sop_labels"] = torch.tensor([0, 1, 1, 0])
    return out


def untied(model):
    """The same model with the plain nn.Embedding path (the reference)."""
    ref = copy.deepcopy(model)
    ref.encoder.embeddings.word_embeddings.usable = lambda: False
    return ref


def grads(model, kwargs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)                                   # the same dropout masks on both sides
    model(**kwargs)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,objective", [("tiny_transformer", "mlm"), ("tiny_transformer", "sop"),
                                            ("tiny_transformer", "ict"), ("tiny_albert", "sop"),
                                            ("tiny_modernbert", "mlm")])
@pytest.mark.parametrize("all_unmasked", [False, True])
def test_gradients_equal_the_embedding_path(name, objective, all_unmasked):
    torch.manual_seed(0)
    model = build_model(config(name, dropout_prob=0.1), "pretrain", objective=objective)
    assert isinstance(model.encoder.embeddings.word_embeddings, TiedEmbedding)
    model.train()
    kwargs = inputs(objective, all_unmasked)
    if all_unmasked and objective == "mlm":
        pytest.skip("no loss to train: nothing is predicted and there is no other head")
    ours, ref = grads(model, kwargs), grads(untied(model), kwargs)
    assert ours.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    word = "encoder.embeddings.word_embeddings.weight"
    assert ref[word].abs().sum() > 0
    # a second step on the same model (the slot is per forward)
    torch.testing.assert_close(grads(model, kwargs)[word], ref[word], rtol=1e-5, atol=1e-6)


def test_no_full_size_temporaries():
    """The (V, D) zero fill of the lookup's gradient and the (V, D) sum of the two gradients are gone."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(config("tiny_transformer"), "pretrain", objective="mlm")
    kwargs = inputs("mlm")

    def full_size_ops(m) -> list[str]:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            m(**kwargs)["loss"].backward()
        D = m.config.embedding_dim
        return sorted({e.name for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::add")
                       and any(list(s) == [V, D] for s in e.input_shapes)})

    assert full_size_ops(untied(model))              # the reference path has them
    assert full_size_ops(model) == []


def test_plain_path_where_the_weight_is_swapped():
    """Parameters DeepSpeed ZeRO-3 manages (ds_id), frozen embeddings and no-grad evaluation use
    nn.Embedding's own lookup."""
    torch.manual_seed(0)
    model = build_model(config("tiny_transformer"), "pretrain", objective="mlm")
    emb = model.encoder.embeddings.word_embeddings
    assert emb.usable()
    emb.weight.ds_id = 0
    assert not emb.usable()
    del emb.weight.ds_id
    emb.weight.requires_grad_(False)
    model(**inputs("mlm"))["loss"].backward()
    assert emb.weight.grad is None and emb.tied is None
    with torch.no_grad():
        model(**inputs("mlm"))
    assert emb.tied is None
