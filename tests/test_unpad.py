"""--unpad auto: length-bucketed training micro-batches and length-sorted evaluation batches give
the padded path's logits and losses (transformer and modernbert, real NSMC rows), the bucketed
order is deterministic, resumable and the same over 1 or 2 processes, and the launchers train
with it on 2 processes exactly like on 1."""
from __future__ import annotations

import contextlib
import dataclasses
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer_util import launch, losses, write_config
from trainer.sampler import EpochSampler, bucket_by_length, example_lengths

REPO = Path(__file__).resolve().parents[1]
NSMC_TRAIN = REPO.parent / "shared" / "data" / "nsmc" / "sentiment_train.tsv"
needs_nsmc = pytest.mark.skipif(not NSMC_TRAIN.exists(), reason="../shared/data not available")
MAX_LEN = 64


class FakeEngine:
    def __init__(self, model):
        self.model = model

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def autocast(self):
        return contextlib.nullcontext()


def _classify_task(config, unpad: str, eval_batch_size: int = 16):
    from trainer.dist import DistContext
    from trainer.tasks.classify import ClassifyTask

    task = ClassifyTask.__new__(ClassifyTask)
    task.args = Namespace(eval_batch_size=eval_batch_size, no_progress=True, unpad=unpad)
    task.ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    task.config = config
    return task


def _padding(lengths: np.ndarray, batches) -> float:
    """Padding tokens per real token when each batch is padded to its longest row (multiple of 8)."""
    from data.classification import padded_length

    padded = sum(len(b) * padded_length(int(lengths[b].max()), MAX_LEN) for b in batches)
    return padded / sum(int(lengths[b].sum()) for b in batches) - 1


def test_epoch_order_is_numpys_permutation_in_half_the_memory():
    """The epoch's order is held as int32 (4 bytes per sample per process) and is exactly
    rng.permutation's (int64) order: checkpoints of earlier versions resume on the same samples."""
    from trainer.sampler import permutation

    for n in (1, 7, 100_003):
        order = permutation(n, np.random.default_rng([5, 2]))
        assert order.dtype == np.int32
        np.testing.assert_array_equal(order, np.random.default_rng([5, 2]).permutation(n))
    reference = np.random.default_rng([5, 2]).permutation(1000)[:1000 // 24 * 24]
    batches = list(EpochSampler(1000, 8, 3, 1, seed=5).batches(epoch=2))
    assert batches == [reference[s + 8:s + 16].tolist() for s in range(0, len(reference), 24)]


def test_bucketed_order_deterministic_resumable_and_rank_split():
    lengths = np.random.default_rng(1).integers(3, MAX_LEN + 1, size=1000)
    one = EpochSampler(1000, 8, 1, 0, seed=5, lengths=lengths)
    batches = list(one.batches(epoch=2))
    assert batches == list(EpochSampler(1000, 8, 1, 0, seed=5, lengths=lengths).batches(epoch=2))
    plain = list(EpochSampler(1000, 8, 1, 0, seed=5).batches(epoch=2))
    # the same samples in the epoch, regrouped by length within windows of 64 batches
    assert sorted(i for b in batches for i in b) == sorted(i for b in plain for i in b)
    assert _padding(lengths, batches) < 0.25 * _padding(lengths, plain)
    # the batch order inside a window is shuffled, not longest-first
    firsts = [lengths[b[0]] for b in batches[:64]]
    assert firsts != sorted(firsts, reverse=True)
    assert list(one.batches(epoch=3)) != batches
    # resuming mid-epoch continues the same order
    assert list(one.batches(epoch=2, start=40 * 8)) == batches[40:]
    # 2 processes x 4 take the two halves of the 1 x 8 micro-batches
    halves = [list(EpochSampler(1000, 4, 2, r, seed=5, lengths=lengths).batches(epoch=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == batches
    order = np.arange(16)
    assert sorted(bucket_by_length(order, lengths[:16], 4, np.random.default_rng(0))) == list(range(16))


@needs_nsmc
@pytest.mark.parametrize("config_name", ["tiny_transformer.json", "tiny_modernbert.json", "tiny_mix_lm.json"])
def test_unpadded_batches_give_padded_logits_and_losses(config_name, tiny_tokenizer):
    """Evaluation: length-sorted batches give the logits of the plain order (and of every row
    alone, with no padding at all) to 1e-5. Training: every bucketed micro-batch, padded to its own
    longest row, gives the loss and logits of the same rows padded to --max_seq_length."""
    from data.classification import ClassificationDataset, load_classification_tsv, pad_batch
    from models import build_model, load_config

    config = dataclasses.replace(load_config(REPO / "tests" / "configs" / config_name),
                                 vocab_size=tiny_tokenizer.vocab_size)
    if config.model_type == "modernbert":  # rows longer than the window: local layers see a window
        assert config.local_attention // 2 < 20
    torch.manual_seed(0)
    model = build_model(config, "classify", num_labels=2)
    ds = ClassificationDataset(load_classification_tsv(NSMC_TRAIN, limit=96), tiny_tokenizer, MAX_LEN, 2)
    lengths = example_lengths(ds)
    assert lengths.max() > 40 and lengths.min() < 10

    unpadded = _classify_task(config, "auto").predict(FakeEngine(model), ds, range(len(ds)), ["logits"])["logits"]
    padded = _classify_task(config, "off").predict(FakeEngine(model), ds, range(len(ds)), ["logits"])["logits"]
    unpadded, padded = np.concatenate(unpadded), np.concatenate(padded)
    np.testing.assert_allclose(unpadded, padded, atol=1e-5, rtol=0)
    model.eval()
    with torch.no_grad():
        alone = np.concatenate([model(**ds.collate([ds[i]]))["logits"].numpy() for i in range(0, len(ds), 7)])
    np.testing.assert_allclose(unpadded[::7], alone, atol=1e-5, rtol=0)

    model.train()  # dropout 0 in the tiny configs: deterministic
    sampler = EpochSampler(len(ds), 16, 1, 0, seed=0, lengths=lengths)
    widths = []
    for rows in sampler.batches(epoch=0):
        samples = [ds[i] for i in rows]
        batch = ds.collate(samples)
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], ds.pad_id, MAX_LEN, multiple=MAX_LEN)
        full = dict(batch, input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        out, ref = model(**batch), model(**full)
        widths.append(batch["input_ids"].shape[1])
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
    assert min(widths) < MAX_LEN / 2


def test_unpad_only_where_exact(tiny_tokenizer):
    from models import load_config

    transformer = load_config(REPO / "tests" / "configs" / "tiny_transformer.json")
    switch = load_config(REPO / "tests" / "configs" / "tiny_switch.json")
    assert switch.is_moe
    assert _classify_task(transformer, "auto").unpads("train") and _classify_task(transformer, "auto").unpads("eval")
    assert not _classify_task(transformer, "off").unpads("eval")
    assert not _classify_task(switch, "auto").unpads("train")  # expert capacity is shared by a batch
    from trainer.tasks.mrc import MRCTask

    assert "eval" in MRCTask.unpad and "train" not in MRCTask.unpad


@needs_nsmc
def test_classify_bucketed_two_processes_and_resume(tmp_path, tiny_tokenizer_dir):
    """train.py classify with --unpad auto (the default): 2 processes x 4 train and evaluate like
    1 x 8; resuming step-4 repeats steps 5-8 of the uninterrupted run, across an epoch boundary."""
    cfg = write_config(tmp_path / "tiny.json")
    out = tmp_path / "out"
    common = ["--model", str(cfg), "--output_dir", str(out), "--tokenizer", str(tiny_tokenizer_dir),
              "--train_mode", "classify", "--train_file", str(NSMC_TRAIN), "--max_train_examples", "64",
              "--eval_fraction", "0.25", "--max_seq_length", str(MAX_LEN), "--num_workers", "0", "--no_progress",
              "--logging_steps", "1", "--learning_rate", "5e-3", "--num_steps", "8", "--save_steps", "4"]
    one = launch("train.py", ["--model_name", "one", "--train_batch_size", "8", *common])
    two = launch("train.py", ["--model_name", "two", "--train_batch_size", "4", *common], nproc=2)
    assert "[unpad] training micro-batches of similar lengths" in one.stdout
    l1, l2 = losses(out / "one"), losses(out / "two")
    assert len(l1) == 8 and l2 == pytest.approx(l1, abs=1e-5)
    eval_line = lambda p: next(ln for ln in p.stdout.splitlines() if ln.startswith("[eval] "))
    assert eval_line(one) == eval_line(two)

    launch("train.py", ["--model_name", "one", "--train_batch_size", "8", *common,
                        "--checkpoint", str(out / "one" / "step-4")])
    assert losses(out / "one") == pytest.approx(l1, abs=1e-6)
