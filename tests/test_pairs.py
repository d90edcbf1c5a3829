"""KLUE NLI / STS: readers and their errors, the stable hash split, pair encoding (segment ids),
STS metrics against hand-computed values, and both tasks from a tiny pretrain (loss falls)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data.pairs import SentencePairDataset, hash_split, load_klue_nli, load_klue_sts
from tests.pretrain_util import COMMON, KLUE, tiny_pretrain
from tests.test_tasks import assert_falls, eval_line, train_losses
from tests.trainer_util import launch

NLI, STS = KLUE / "nli_train.json", KLUE / "sts_train.json"
pytestmark = pytest.mark.skipif(not NLI.exists(), reason="../shared/data/klue not available")


def test_readers_and_split():
    nli, sts = load_klue_nli(NLI), load_klue_sts(STS)
    assert len(nli) == 1807 and {e.label for e in nli} == {0.0, 1.0, 2.0}
    assert nli[0].guid == "klue-nli-v1_dev_00002" and nli[0].label == 1.0   # neutral
    assert len(sts) == 308 and sts[0].label == 4.9 and sts[0].text_b.startswith("무엇보다도, 호스트들은")
    train, held = hash_split(nli, lambda e: e.guid, 0.2)
    assert len(train) + len(held) == 1807 and 0.15 < len(held) / 1807 < 0.25
    # the split depends on the guid only: the same for a shuffled or cut list
    again = hash_split(list(reversed(nli[:500])), lambda e: e.guid, 0.2)[1]
    assert {e.guid for e in again} == {e.guid for e in held if e in nli[:500]}


@pytest.mark.parametrize("record, message", [
    ({"guid": "x", "premise": "a", "hypothesis": "b", "gold_label": "maybe"}, "gold_label 'maybe'"),
    ({"guid": "x", "premise": "a", "gold_label": "neutral"}, "no text in 'hypothesis'"),
])
def test_nli_bad_labels(tmp_path, record, message):
    path = tmp_path / "nli.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=message):
        load_klue_nli(path)


@pytest.mark.parametrize("value", [5.5, -1, "3", None])
def test_sts_label_outside_0_5(tmp_path, value):
    path = tmp_path / "sts.json"
    path.write_text(json.dumps([{"guid": "x", "sentence1": "a", "sentence2": "b", "labels": {"label": value}}]))
    with pytest.raises(ValueError, match="numbers from 0 to 5"):
        load_klue_sts(path)


def test_kornli_and_korsts_tsv(tmp_path):
    """KorNLI's and KorSTS's TSV layouts (header line, tab-separated) read as the KLUE JSON does: texts
    by either name, NLI labels by name or id, STS scores as numbers; rows with an empty sentence are
    skipped (KorNLI has some); a row with another number of fields or a bad label names its line."""
    nli = tmp_path / "multinli.train.ko.tsv"
    nli.write_text("sentence1\tsentence2\tgold_label\n"
                   "개념적으로 크림 스키밍은 두 가지 기본 차원을 가지고 있다.\t제품과 지리학은 크림 스키밍을 작동시키는 것이다.\tneutral\n"
                   "시즌 중에 알고 있는 거 알아?\t\tentailment\n"
                   "우리 번호 중 하나가 당신의 지시를 세밀하게 수행할 것이다.\t우리 팀의 일원이 당신의 명령을 수행할 것이다.\t0\n",
                   encoding="utf-8")
    rows = load_klue_nli(nli)
    assert [(e.text_a[:4], e.text_b[:4], e.label) for e in rows] == [("개념적으", "제품과 ", 1.0), ("우리 번", "우리 팀", 0.0)]
    sts = tmp_path / "sts-train.tsv"
    sts.write_text("genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
                   "main-captions\tMSRvid\t2012test\t0001\t5.000\t비행기가 이륙하고 있다.\t비행기가 이륙하고 있다.\n"
                   "main-captions\tMSRvid\t2012test\t0004\t3.800\t한 남자가 큰 플루트를 연주하고 있다.\t남자가 플루트를 연주하고 있다.\n",
                   encoding="utf-8")
    rows = load_klue_sts(sts)
    assert [(e.guid, e.label) for e in rows] == [("0001", 5.0), ("0004", 3.8)]
    assert rows[1].text_a == "한 남자가 큰 플루트를 연주하고 있다."
    bad = tmp_path / "bad.tsv"
    for text, load, message in [
        ("sentence1\tsentence2\tgold_label\n가\t나\tmaybe\n", load_klue_nli, "line 2 has gold_label 'maybe'"),
        ("sentence1\tsentence2\tscore\n가\t나\t5.5\n", load_klue_sts, "line 2 has labels.label 5.5"),
        ("sentence1\tsentence2\tgold_label\n가\t나\n", load_klue_nli, "bad.tsv:2: 2 tab-separated field"),
        ("sentence1\tgold_label\n가\tneutral\n", load_klue_nli, "line 2 has no text in 'hypothesis' or 'sentence2'"),
        ("just a line of text\n", load_klue_nli, "neither JSON nor a tab-separated file"),
    ]:
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load(bad)


def test_pair_encoding(tiny_tokenizer):
    ex = load_klue_sts(STS)[:3]
    ds = SentencePairDataset(ex, tiny_tokenizer, 64, regression=True)
    batch = ds.collate([ds[0], ds[1], ds[2]])
    a, b = tiny_tokenizer.encode(ex[0].text_a), tiny_tokenizer.encode(ex[0].text_b)
    assert len(a) + len(b) + 3 <= 64
    ids, types, mask = batch["input_ids"][0], batch["token_type_ids"][0], batch["attention_mask"][0]
    n = int(mask.sum())
    assert n == len(a) + len(b) + 3 and ids[1:len(a) + 1].tolist() == a
    assert ids[0] == tiny_tokenizer.cls_id and ids[n - 1] == tiny_tokenizer.sep_id
    assert types[:len(a) + 2].tolist() == [0] * (len(a) + 2) and types[len(a) + 2:n].tolist() == [1] * (n - len(a) - 2)
    assert types[n:].sum() == 0 and batch["labels"].dtype.is_floating_point
    assert batch["labels"].tolist() == pytest.approx([e.label for e in ex])


def test_sts_scores_hand_computed():
    from data.metrics import sts_scores

    pred, gold = np.array([1.0, 2.0, 3.5, 4.0]), np.array([0.5, 3.0, 3.0, 5.0])
    pm, gm = pred - pred.mean(), gold - gold.mean()
    r = (pm * gm).sum() / np.sqrt((pm ** 2).sum() * (gm ** 2).sum())
    out = sts_scores(pred, gold)
    assert out["pearson"] == pytest.approx(r)
    # >= 3: predicted {3.5, 4.0}, gold {3.0, 3.0, 5.0}: tp 2, fp 0, fn 1 -> F1 = 4/5
    assert out["f1"] == pytest.approx(80.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    return tiny_pretrain(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


@pytest.mark.parametrize("mode, path, metrics", [pytest.param("nli", NLI, {"accuracy"}, marks=pytest.mark.slow),
                                                 ("sts", STS, {"pearson", "f1"})])
def test_pair_task_loss_falls(env, mode, path, metrics):
    proc = launch("train.py", ["--model_name", mode, "--model", str(env.cfg), "--output_dir", str(env.out), *COMMON,
                               "--train_mode", mode, "--train_file", str(path), "--checkpoint", str(env.pre / "step-10"),
                               "--max_train_examples", "32", "--max_eval_examples", "30", "--eval_fraction", "0.2",
                               "--train_batch_size", "16", "--num_steps", "24"])
    assert_falls(train_losses(env.out / mode), mode)
    assert set(eval_line(proc.stdout)) == metrics


def test_bad_pair_input_stops_before_work(env, tmp_path, monkeypatch, capsys):
    from tests.test_bad_input import _run_main

    bad = tmp_path / "sts.json"
    records = json.loads(STS.read_text(encoding="utf-8"))[:20]
    records[7]["labels"]["label"] = 6.2
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    code, err = _run_main(["--model_name", "bad", "--model", str(env.cfg), "--output_dir", str(tmp_path), *COMMON,
                           "--train_mode", "sts", "--train_file", str(bad), "--checkpoint", str(env.pre / "final"),
                           "--num_steps", "2"], monkeypatch, capsys)
    assert code and "example 7" in err and "6.2" in err and "0 to 5" in err
    assert not (tmp_path / "bad").exists()


def test_readers_accept_a_utf8_byte_order_mark(tmp_path):
    """Files saved by Windows editors start with a UTF-8 BOM: every task reader reads them as without."""
    from data.classification import load_classification_tsv
    from data.mrc import load_squad
    from data.ner import load_klue_ner

    bom = "\ufeff"
    files = {
        "nli.json": (json.dumps([{"guid": "a", "premise": "가", "hypothesis": "나", "gold_label": "neutral"}]),
                     load_klue_nli, lambda r: (r[0].text_a, r[0].label), ("가", 1.0)),
        "sts.tsv": ("sentence1\tsentence2\tscore\n가\t나\t4.5\n", load_klue_sts, lambda r: r[0].label, 4.5),
        "squad.json": (json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "서울은 수도", "qas": [
            {"id": "1", "question": "?", "answers": [{"text": "서울", "answer_start": 0}]}]}]}]}),
            load_squad, lambda r: r[0].answers[0].text, "서울"),
        "ner.tsv": ("## g1\t<서울:LC>\n서\tB-LC\n울\tI-LC\n", load_klue_ner, lambda r: (r[0].guid, r[0].tags), ("g1", ["B-LC", "I-LC"])),
        "cls.tsv": ("id\tdocument\tlabel\n1\t좋다\t1\n", load_classification_tsv, lambda r: (r[0].id, r[0].label), ("1", 1)),
    }
    for name, (text, load, pick, want) in files.items():
        (tmp_path / name).write_text(bom + text, encoding="utf-8")
        assert pick(load(tmp_path / name)) == want, name
