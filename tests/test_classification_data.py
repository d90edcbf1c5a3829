"""Sentiment TSV parsing (real NSMC slice), dataset/collate, padding rule, bad-input errors."""
import itertools
import json
from pathlib import Path

import pytest
import torch

from data.classification import (ClassificationDataset, ClassificationExample, load_classification_tsv,
                                 number_labels, pad_batch, padded_length, resolve_num_labels)

NSMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "nsmc"
needs_nsmc = pytest.mark.skipif(not (NSMC / "sentiment_train.tsv").exists(),
                                reason="../shared/data/nsmc not available")


@pytest.fixture(scope="module")
def nsmc_slice(tmp_path_factory) -> Path:
    """Header + first 300 rows of the real NSMC-style training file."""
    if not (NSMC / "sentiment_train.tsv").exists():
        pytest.skip("../shared/data/nsmc not available")
    out = tmp_path_factory.mktemp("nsmc") / "slice.tsv"
    with open(NSMC / "sentiment_train.tsv", "rb") as src, open(out, "wb") as dst:
        dst.writelines(itertools.islice(src, 301))
    return out


def test_padded_length_rule():
    assert padded_length(1, 128) == 8
    assert padded_length(8, 128) == 8
    assert padded_length(9, 128) == 16
    assert padded_length(19, 20) == 20          # capped, not 24
    ids, mask, cut = pad_batch([[2, 7, 3], [2, 7, 7, 7, 7, 7, 7, 7, 7, 3]], 0, 16)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64 and cut == 0
    assert mask.sum(1).tolist() == [3, 10]
    ids, mask, cut = pad_batch([[2, 5, 6, 7, 8, 9, 3]], 0, 4)
    assert cut == 1 and ids.tolist() == [[2, 5, 6, 3]]   # the closing [SEP] survives the cut


@needs_nsmc
def test_real_nsmc_slice(nsmc_slice, tiny_tokenizer):
    examples = load_classification_tsv(nsmc_slice)
    assert len(examples) == 300
    assert examples[0] == ClassificationExample("344843", "멜로의 대명사들이 모여 최악의 로멘스를 만들다", 0)
    assert {e.label for e in examples} == {0, 1}
    assert len(load_classification_tsv(NSMC / "sentiment_test.tsv", limit=50)) == 50
    ds = ClassificationDataset(examples, tiny_tokenizer, max_seq_length=32)
    assert ds.num_labels == 2 and len(ds) == 300
    loader = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=ds.collate)
    total_truncated = 0
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(v.dtype == torch.int64 for v in batch.values())
        b, length = batch["input_ids"].shape
        assert length <= 32 and (length % 8 == 0)
        assert batch["labels"].shape == (b,)
        assert (batch["input_ids"][:, 0] == tiny_tokenizer.cls_id).all()
        n = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][torch.arange(b), n - 1] == tiny_tokenizer.sep_id).all()
        assert (batch["token_type_ids"] == 0).all()
        total_truncated += int((n == 32).sum())
    assert ds.num_truncated > 0                               # some reviews exceed 30 tokens
    assert ds.num_truncated <= total_truncated


def test_bad_input_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        load_classification_tsv(tmp_path / "missing.tsv")
    no_label = tmp_path / "nolabel.tsv"
    no_label.write_text("id\tdocument\n1\t좋아요\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"nolabel.tsv.*lacks the column\(s\) \['label'\]"):
        load_classification_tsv(no_label)
    bad_label = tmp_path / "badlabel.tsv"
    bad_label.write_text("id\tdocument\tlabel\n1\t좋아요\t1\n2\t별로예요\t \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"badlabel.tsv:3: the label \(column 'label'\) is empty"):
        load_classification_tsv(bad_label)
    short_row = tmp_path / "short.tsv"
    short_row.write_text("id\tdocument\tlabel\n1\t좋아요\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short.tsv:2: 2 tab-separated"):
        load_classification_tsv(short_row)
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.tsv is empty"):
        load_classification_tsv(empty)
    ok = tmp_path / "ok.tsv"
    ok.write_text("id\tdocument\tlabel\n1\t좋아요\t2\n2\t\t0\n", encoding="utf-8")
    exs = load_classification_tsv(ok)
    assert [e.id for e in exs] == ["1"]                      # the empty document is skipped
    with pytest.raises(ValueError, match="num_labels"):
        ClassificationDataset(exs, tiny_tokenizer, num_labels=2)


def test_label_names_are_numbered_alike_in_every_file(tmp_path, tiny_tokenizer):
    """Labels that are not class indices (names, negative numbers) become classes in sorted order (numbers
    by value first), the same in the training and the evaluation file; a checkpoint's names keep their
    order when they cover the files'; class indices stay as they are."""
    train, evals = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    train.write_text("id\tdocument\tlabel\n1\t좋아요\tpositive\n2\t별로\tnegative\n3\t그냥\tneutral\n",
                     encoding="utf-8")
    evals.write_text("id\tdocument\tlabel\n4\t최고\tpositive\n", encoding="utf-8")
    a, b = load_classification_tsv(train), load_classification_tsv(evals)
    assert [e.label for e in a] == ["positive", "negative", "neutral"]
    with pytest.raises(ValueError, match="label name 'positive'.*number_labels"):
        ClassificationDataset(a, tiny_tokenizer)
    assert number_labels({"train": a, "eval": b}) == ["negative", "neutral", "positive"]
    assert [e.label for e in a] == [2, 0, 1] and [e.label for e in b] == [2]
    assert resolve_num_labels({"train": a, "eval": b}) == 3
    assert ClassificationDataset(a, tiny_tokenizer, num_labels=3)[0]["label"] == 2

    b = load_classification_tsv(evals)      # evaluation rows alone: the checkpoint's order, not their own
    assert number_labels({"eval": b}, known=["negative", "neutral", "positive"]) == ["negative", "neutral", "positive"]
    assert b[0].label == 2
    assert number_labels({"eval": load_classification_tsv(evals)}, known=["bad", "good"]) == ["positive"]

    signed = [ClassificationExample(str(i), "글", lab) for i, lab in enumerate(["1", "-1", "10", "2", "0"])]
    for e in signed:
        e.label = int(e.label) if e.label.isdigit() else e.label          # as the reader keeps them
    assert number_labels({"t": signed}) == ["-1", "0", "1", "2", "10"]
    assert [e.label for e in signed] == [2, 0, 4, 3, 1]
    indices = [ClassificationExample("1", "글", 1), ClassificationExample("2", "글", 0)]
    assert number_labels({"t": indices}) is None and [e.label for e in indices] == [1, 0]


def _read(path: Path, text: str) -> list[tuple]:
    """(id, text, label) of each example of `text` written to `path`."""
    path.write_text(text, encoding="utf-8")
    return [(e.id, e.text, e.label) for e in load_classification_tsv(path)]


def test_header_without_id_and_other_text_names(tmp_path):
    """`text` or `sentence` for the text column, no id column (rows named by line), extra columns ignored."""
    f = tmp_path / "t.tsv"
    assert _read(f, "label\tsource\ttext\npositive\tweb\t좋아요\nnegative\tweb\t별로\n") == [
        ("2", "좋아요", "positive"), ("3", "별로", "negative")]
    assert _read(f, "sentence\tlabel\n좋아요\t1\n") == [("2", "좋아요", 1)]
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['document'\].*may also be named text or sentence"):
        _read(f, "id\tbody\tlabel\n1\t좋아요\t1\n")


def test_csv_files(tmp_path):
    """A .csv file (or a header of comma-separated names with the label column) is read with CSV quoting:
    a quoted text may hold commas, quotes and line breaks; errors name the line."""
    f = tmp_path / "reviews.csv"
    assert _read(f, 'id,document,label\n1,"재밌다, 정말 ""최고""",positive\n2,"줄바꿈\n있는 리뷰",negative\n3,별로,negative\n') == [
        ("1", '재밌다, 정말 "최고"', "positive"), ("2", "줄바꿈\n있는 리뷰", "negative"), ("3", "별로", "negative")]
    assert _read(tmp_path / "reviews.txt", "text,label\n좋아요,1\n") == [("2", "좋아요", 1)]   # no .csv: the header tells
    with pytest.raises(ValueError, match=r"reviews.csv:4: 1 comma-separated field\(s\), expected 2"):
        _read(f, 'document,label\n"좋아요",1\n"별로",0\n나빠요\n')


def test_json_files_klue_ynat_layout(tmp_path):
    """A JSON list (KLUE YNAT: the headline under "title", topic names as labels) or JSON lines (a `datasets`
    dump: "text", integer labels) read as the TSV does; ids from guid/id, else the position."""
    ynat = tmp_path / "ynat-v1.1_train.json"
    ynat.write_text(json.dumps([
        {"guid": "ynat-v1_train_00000", "title": "유튜브 내달 2일까지 크리에이터 지원 공간 운영", "label": "생활문화",
         "url": "https://news.naver.com/x", "date": "2016.06.30. 오전 10:36"},
        {"guid": "ynat-v1_train_00001", "title": "내년부터 국가RD 평가 때 논문건수는 반영 않는다", "label": "사회"}],
        ensure_ascii=False, indent=1), encoding="utf-8")
    rows = load_classification_tsv(ynat)
    assert [(e.id, e.label) for e in rows] == [("ynat-v1_train_00000", "생활문화"), ("ynat-v1_train_00001", "사회")]
    assert number_labels({"t": rows}) == ["사회", "생활문화"] and [e.label for e in rows] == [1, 0]
    dump = tmp_path / "train.jsonl"
    dump.write_text('{"text": "좋다", "label": 1}\n{"text": "별로", "label": 0}\n{"text": "", "label": 0}\n', encoding="utf-8")
    assert [(e.id, e.text, e.label) for e in load_classification_tsv(dump)] == [("0", "좋다", 1), ("1", "별로", 0)]
    dump.write_text('[{"text": "좋다", "label": null}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.jsonl: example 0 has the label None in 'label'"):
        load_classification_tsv(dump)
    dump.write_text('[{"body": "좋다", "label": 1}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"example 0 has no text \(document or text or sentence or title"):
        load_classification_tsv(dump)
