"""The last layer computed only at the rows the pretraining heads read (models.encoder.QueryRows):
losses, metrics and gradients equal to the full last layer's, on real Korean batches with padding."""
from __future__ import annotations

import dataclasses
import json
from unittest import mock
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.encoder import QueryRows
from models.heads import IGNORE_INDEX
from models.tasks import pretrain_hints

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
    assert rows.starts.tolist() == [0, 3, 3]
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


# --- pretrain_hints: the same rows and padding read on the host, where the batch is made ---------
HINT_CASES = {**CASES, "mix_lm (no query rows)": config("tiny_mix_lm"), "switch (no query rows)": config("tiny_switch")}
aten = torch.ops.aten
DEVICE_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops whose result the host must read back (int(t), bool(t), t.item(): each a GPU
    sync), or whose output shape depends on values (nonzero, masked_select: a sync too), and the
    reads that skip the dispatcher on a CPU tensor (tolist, numpy)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.patches = [mock.patch.object(torch.Tensor, name, self._recorded(name, getattr(torch.Tensor, name)))
                        for name in ("tolist", "numpy")]

    def _recorded(self, name, method):
        def read(t, *args, **kwargs):
            self.seen.append(name)
            return method(t, *args, **kwargs)
        return read

    def __enter__(self):
        for patch in self.patches:
            patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        for patch in self.patches:
            patch.stop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in DEVICE_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def step(model, batch, extra, hints):
    """Loss, metrics and gradients of one forward and backward, and the device reads it made."""
    model.zero_grad()
    with DeviceReads() as spy:
        out = model(**batch, **extra, **hints)
        out["loss"].backward()
    keys = [k for k in ("loss", "mlm_loss", "mlm_acc", "sop_logits", "sop_loss") if k in out]
    return ({k: out[k].detach() for k in keys},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, spy.seen)


@pytest.mark.parametrize("padding", [True, False], ids=["padded", "full rows"])
@pytest.mark.parametrize("objective", ["sop", "mlm"])
@pytest.mark.parametrize("case", list(HINT_CASES))
def test_host_hints_give_the_same_step_without_reading_the_device(case, objective, padding, batch):
    """With pretrain_hints (what the collate adds) the forward and backward read nothing back from
    the device (but a Switch layer's expert group sizes), and give bit-identical losses, metrics and
    gradients to the path that reads them."""
    if not padding:
        batch = batch | {"attention_mask": torch.ones_like(batch["attention_mask"])}
    torch.manual_seed(0)
    model = build_model(HINT_CASES[case], "pretrain", objective=objective)
    model.train()
    extra = {"sop_labels": torch.tensor([0, 1, 1, 0])} if objective == "sop" else {}
    hints = pretrain_hints(batch, objective)
    assert hints["padded"] is padding
    out, grads, reads = step(model, batch, extra, hints)
    ref, ref_grads, ref_reads = step(model, batch, extra, {})
    cfg = HINT_CASES[case]
    switch_layers = sum(cfg.is_moe_layer(i // cfg.layer_group) for i in range(cfg.num_hidden_layers))
    assert reads == ["tolist"] * switch_layers, reads
    assert len(ref_reads) > len(reads), ref_reads    # the spy sees the reads of the path without hints
    assert out.keys() == ref.keys() and grads.keys() == ref_grads.keys()
    for k in out:
        assert torch.equal(out[k], ref[k]), k
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n


def test_hints_of_a_batch_without_masked_tokens(batch):
    """A batch with nothing to predict: MLM loss 0 on both paths, still no device read."""
    batch = batch | {"mlm_labels": torch.full_like(batch["mlm_labels"], IGNORE_INDEX)}
    model = build_model(CASES["transformer (post-LN)"], "pretrain", objective="mlm")
    hints = pretrain_hints(batch, "mlm")
    assert hints["rows_index"].numel() == 0
    with DeviceReads() as spy:
        out = model(**batch, **hints)
    assert spy.seen == [] and out["mlm_loss"].item() == 0.0 == model(**batch)["mlm_loss"].item()


@pytest.mark.parametrize("objective", ["sop", "ict"])
def test_the_pretraining_collate_adds_the_hints(objective, tmp_path, tiny_corpus, tiny_tokenizer_dir):
    """The batches the training loop and validation get carry the hints, which match their labels."""
    from trainer.args import parse_args
    from trainer.dist import DistContext
    from trainer.tasks import build

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(json.loads((CONFIGS / "tiny_transformer.json").read_text()) | {"vocab_size": 2000}))
    args = parse_args(0, ["--model_name", "hints", "--model", str(cfg), "--output_dir", str(tmp_path / "out"),
                          "--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir),
                          "--max_seq_length", "64", "--train_batch_size", "4", "--num_steps", "1", "--no_progress",
                          "--objective", objective])
    task = build(args, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    ds = task.dataset
    batch = task.collate([ds[i] for i in range(4)])
    if objective == "ict":
        labels = torch.cat([batch["query_mlm_labels"].reshape(-1), batch["passage_mlm_labels"].reshape(-1)])
        assert torch.equal(batch["mlm_index"], (labels != IGNORE_INDEX).nonzero().squeeze(1))
        assert batch["query_padded"] == (not bool(batch["query_attention_mask"].all()))
        assert "mlm_index" in task.make_batch(2)
        return
    labels = batch["mlm_labels"]
    rows = QueryRows.from_mask((labels != IGNORE_INDEX) | (torch.arange(labels.shape[1]) == 0))
    assert batch["padded"] == (not bool(batch["attention_mask"].all()))
    assert torch.equal(batch["rows_index"], rows.index) and torch.equal(batch["rows_starts"], rows.starts)
    assert torch.equal(task.make_batch(2)["rows_index"], task.make_batch(2)["rows_index"])


@pytest.mark.parametrize("same_length", [True, False], ids=["one encoder call", "two calls"])
@pytest.mark.parametrize("case", ["transformer (post-LN)", "modernbert (local last layer)", "mix_lm (no query rows)"])
def test_ict_hints_give_the_same_step_without_reading_the_device(case, same_length, batch):
    """ICT pretraining (queries and passages, MLM on both sides): with the hints of each side's
    padding and of the labelled positions, no device reads and bit-identical results."""
    torch.manual_seed(0)
    model = build_model(HINT_CASES[case], "pretrain", objective="ict")
    model.train()
    q_len = 64 if same_length else 40
    side = lambda prefix, rows, L: {prefix + k: batch[k][rows, :L] for k in ("input_ids", "attention_mask",
                                                                             "token_type_ids", "mlm_labels")}
    short = int(batch["attention_mask"].sum(1).argmin())     # a row with padding on both sides
    ict = side("query_", [short, 1], q_len) | side("passage_", [0, short], 64)
    hints = pretrain_hints(ict, "ict")
    assert hints["query_padded"] and hints["passage_padded"] and hints["mlm_index"].numel() > 0
    out, grads, reads = step(model, ict, {}, hints)
    ref, ref_grads, ref_reads = step(model, ict, {}, {})
    assert reads == [] and ref_reads, (reads, ref_reads)
    assert out.keys() == ref.keys() == {"loss", "mlm_loss", "mlm_acc"} and grads.keys() == ref_grads.keys()
    for k in out:
        assert torch.equal(out[k], ref[k]), k
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
