"""MRC data: KorQuAD parsing, article split, doc-stride windows, collate, postprocess, errors."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data.metrics import squad_em_f1
from data.mrc import (Answer, Example, MRCDataset, build_features, load_squad, postprocess,
                      split_by_article, squad_counts, write_predictions)

KORQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "korquad" / "KorQuAD_v1.0_dev.json"
needs_korquad = pytest.mark.skipif(not KORQUAD.exists(), reason=f"{KORQUAD} not available")

FILLER = ["고려는 918년에 왕건이 세운 나라이다.", "수도는 개경이었으며 불교를 숭상하였다.",
          "몽골의 침입으로 오랜 기간 고통을 겪었다.", "고려청자는 지금도 높은 평가를 받는다.",
          "말기에는 권문세족의 횡포가 심하였다."]
ANSWER_SENTENCE = "조선을 세운 왕은 태조 이성계, 곧 조선의 첫 임금이다."


def long_example() -> Example:
    sentences = FILLER * 4 + [ANSWER_SENTENCE] + FILLER * 4
    context = " ".join(sentences)
    start = context.index("태조 이성계")
    return Example("long-0", "조선을 세운 왕은 누구인가?", context, [Answer("태조 이성계", start)],
                   "조선", "0-0")


@pytest.fixture(scope="module")
def mecab_tokenizer(tiny_corpus, tmp_path_factory):
    """Morpheme-aware tokenizer (as used for KorQuAD): particles split off nouns, so answer
    spans fall on token boundaries."""
    pytest.importorskip("mecab")
    from data.tokenizer import train_tokenizer
    return train_tokenizer([tiny_corpus], vocab_size=2000, out_dir=tmp_path_factory.mktemp("mtok"),
                           morpheme="mecab", num_threads=1)


@needs_korquad
def test_real_korquad_counts():
    assert squad_counts(KORQUAD) == {"articles": 140, "paragraphs": 964, "questions": 5774}
    examples = load_squad(KORQUAD)
    assert len(examples) == 5774
    assert len({e.id for e in examples}) == 5774
    ex = examples[0]
    assert ex.id == "6548850-0-0" and ex.title == "임종석"
    for e in examples:
        a = e.answers[0]
        assert e.context[a.start: a.start + len(a.text)] == a.text


@needs_korquad
def test_split_by_article_is_disjoint_and_deterministic():
    train, dev = split_by_article(KORQUAD, dev_fraction=0.1, seed=0)
    assert {e.title for e in train}.isdisjoint({e.title for e in dev})
    assert len({e.title for e in dev}) == 14
    assert len(train) + len(dev) == 5774
    train2, dev2 = split_by_article(load_squad(KORQUAD), dev_fraction=0.1, seed=0)
    assert [e.id for e in dev] == [e.id for e in dev2]
    _, dev3 = split_by_article(KORQUAD, dev_fraction=0.1, seed=1)
    assert {e.title for e in dev3} != {e.title for e in dev}
    with pytest.raises(ValueError, match="dev_fraction"):
        split_by_article(train, dev_fraction=1.0)


def test_doc_stride_windows_cover_context_and_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = long_example()
    max_len, stride = 48, 12
    feats = build_features([ex], tok, max_seq_length=max_len, doc_stride=stride, max_query_length=16)
    ctx_ids, ctx_offs = tok.encode_with_offsets(ex.context)
    assert len(ctx_ids) > 3 * max_len                      # really needs several windows
    fs = feats.features
    assert feats.stats["features"] == len(fs) > 3
    q_len = len(tok.encode(ex.question))
    covered = set()
    for w, f in enumerate(fs):
        c0 = f.context_start
        assert c0 == q_len + 2 and len(f.input_ids) <= max_len
        assert f.input_ids[0] == tok.cls_id and f.input_ids[c0 - 1] == tok.sep_id
        assert f.input_ids[-1] == tok.sep_id
        assert f.token_type_ids == [0] * c0 + [1] * (len(f.input_ids) - c0)
        n = len(f.token_offsets)
        assert n == len(f.input_ids) - c0 - 1
        # window w starts stride * w context tokens in, and its ids/offsets are that slice
        s = stride * w
        assert f.input_ids[c0: c0 + n] == ctx_ids[s: s + n]
        assert [tuple(o) for o in f.token_offsets] == [tuple(o) for o in ctx_offs[s: s + n]]
        covered.update(range(s, s + n))
    assert covered == set(range(len(ctx_ids)))
    with_answer = [f for f in fs if f.start_position > 0]
    assert len(with_answer) >= 2                           # overlapping windows both hold it
    for f in fs:
        if f.start_position == 0:
            assert f.end_position == 0
            continue
        i, j = f.start_position - f.context_start, f.end_position - f.context_start
        assert ex.context[f.token_offsets[i][0]: f.token_offsets[j][1]] == "태조 이성계"
    # every token has exactly one max-context window
    for t in range(len(ctx_ids)):
        owners = [w for w, f in enumerate(fs)
                  if stride * w <= t < stride * w + len(f.token_offsets)
                  and f.max_context[t - stride * w]]
        assert len(owners) == 1


def _oracle_logits(feats, peak=10.0):
    starts, ends = [], []
    for f in feats.features:
        s = np.zeros(len(f.input_ids))
        e = np.zeros(len(f.input_ids))
        s[f.start_position] = e[f.end_position] = peak
        starts.append(s)
        ends.append(e)
    return starts, ends


def test_postprocess_recovers_gold_and_respects_constraints(tiny_tokenizer):
    ex = long_example()
    feats = build_features([ex], tiny_tokenizer, max_seq_length=48, doc_stride=12,
                           max_query_length=16)
    starts, ends = _oracle_logits(feats)
    assert postprocess(feats, starts, ends) == {"long-0": "태조 이성계"}
    # a window without the answer gets higher logits, but end before start: invalid
    other = next(w for w, f in enumerate(feats.features) if f.start_position == 0)
    c0 = feats.features[other].context_start
    starts[other][:] = ends[other][:] = -100.0
    starts[other][c0 + 5] = 50.0
    ends[other][c0 + 2] = 50.0
    assert postprocess(feats, starts, ends) == {"long-0": "태조 이성계"}
    # ... and a span longer than max_answer_length is invalid too
    gold = next(f for f in feats.features if f.start_position > 0)
    gold_len = gold.end_position - gold.start_position + 1
    ends[other][c0 + 2] = -100.0
    ends[other][c0 + 5 + gold_len] = 50.0                  # span of gold_len + 1 tokens
    assert postprocess(feats, starts, ends, max_answer_length=gold_len) == {"long-0": "태조 이성계"}
    f = feats.features[other]
    expected = ex.context[f.token_offsets[5][0]: f.token_offsets[5 + gold_len][1]]
    assert other == 0 and f.max_context[5]                 # only window 0 holds token 5
    assert postprocess(feats, starts, ends, max_answer_length=30) == {"long-0": expected}
    # (N, L) tensor input padded past each feature's length works the same
    width = max(len(s) for s in starts) + 3
    pad = lambda rows: torch.tensor(np.stack([np.pad(r, (0, width - len(r))) for r in rows]))
    s0, e0 = _oracle_logits(feats)
    assert postprocess(feats, pad(s0), pad(e0)) == {"long-0": "태조 이성계"}
    with pytest.raises(ValueError, match="features"):
        postprocess(feats, s0[:1], e0[:1])


def test_unanswerable_questions(tiny_tokenizer, tmp_path):
    """SQuAD 2.0: an `is_impossible` question (its plausible_answers ignored) has no answers, every window
    of it is trained to point at [CLS], and with null_answers its prediction is empty where [CLS]'s score
    (start + end, the lowest over the windows) beats the best span, else the span."""
    path = tmp_path / "squad2.json"
    context = "태조 이성계는 1392년에 조선을 세웠다. 수도는 한양이었다."
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "조선", "paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "조선을 세운 사람은?", "answers": [{"text": "태조 이성계", "answer_start": 0}]},
        {"id": "n", "question": "고려의 수도는?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "한양", "answer_start": 28}]}]}]}]}, ensure_ascii=False), encoding="utf-8")
    examples = load_squad(path)
    assert [len(e.answers) for e in examples] == [1, 0]
    feats = build_features(examples, tiny_tokenizer, max_seq_length=64, doc_stride=16, max_query_length=16)
    assert all(f.start_position == f.end_position == 0 for f in feats.features if f.example_id == "n")
    starts, ends = _oracle_logits(feats)          # answered: its span scores 20, [CLS] 0; unanswerable: [CLS] 20
    plain = postprocess(feats, starts, ends)
    assert plain["a"] == "태조 이성계" and plain["n"] != ""       # SQuAD 1.1 rule: always a span
    assert postprocess(feats, starts, ends, null_answers=True) == {"a": "태조 이성계", "n": ""}
    for f, s, e in zip(feats.features, starts, ends):           # [CLS] above the span for the answered one too
        if f.example_id == "a":
            s[0] = e[0] = 11.0
    assert postprocess(feats, starts, ends, null_answers=True) == {"a": "", "n": ""}
    assert squad_em_f1(postprocess(feats, starts, ends, null_answers=True), examples)["exact_match"] == 50.0


def test_flat_layout_of_datasets(tmp_path):
    """`datasets`' squad_kor_v1 / squad saved with to_json: one object per question (context, question,
    answers as lists), as JSON lines or a JSON list: the same questions, in the same order, as the nested
    file they came from."""
    if not KORQUAD.exists():
        pytest.skip("../shared/data not available")
    nested = json.loads(KORQUAD.read_text(encoding="utf-8"))
    nested["data"] = nested["data"][:4]
    (tmp_path / "nested.json").write_text(json.dumps(nested, ensure_ascii=False), encoding="utf-8")
    rows = [{"id": qa["id"], "title": art["title"], "context": para["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for art in nested["data"] for para in art["paragraphs"] for qa in para["qas"]]
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "flat.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    want = [(e.id, e.title, e.context, e.question, e.answers) for e in load_squad(tmp_path / "nested.json")]
    for name in ("flat.jsonl", "flat.json"):
        assert [(e.id, e.title, e.context, e.question, e.answers) for e in load_squad(tmp_path / name)] == want
    rows[0]["answers"] = {"text": ["a", "b"], "answer_start": [0]}
    (tmp_path / "flat.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]"):
        load_squad(tmp_path / "flat.json")


def test_collate_pads_to_multiple_of_8(tiny_tokenizer):
    ex = long_example()
    short = Example("short-0", "고려의 수도는?", "고려의 수도는 개경이었다.", [Answer("개경", 8)], "고려", "1-0")
    feats = build_features([ex, short], tiny_tokenizer, max_seq_length=44, doc_stride=12,
                           max_query_length=16)
    ds = MRCDataset(feats)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions",
                          "end_positions"}
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert batch["input_ids"].shape[1] == 44               # 44 (cap) not 48
    lengths = [len(f.input_ids) for f in feats.features]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    last = ds.collate([ds[len(ds) - 1]])                    # the short example alone
    assert last["input_ids"].shape[1] % 8 == 0 and last["input_ids"].shape[1] >= lengths[-1]
    assert (last["input_ids"][0, lengths[-1]:] == tiny_tokenizer.pad_id).all()
    f = feats.features[-1]
    assert f.start_position > 0
    i, j = f.start_position - f.context_start, f.end_position - f.context_start
    assert short.context[f.token_offsets[i][0]: f.token_offsets[j][1]] == "개경"
    with_index = MRCDataset(feats, include_feature_index=True)
    assert with_index.collate([with_index[2], with_index[0]])["feature_index"].tolist() == [2, 0]


@needs_korquad
def test_real_korquad_slice_oracle_em_f1(mecab_tokenizer, tmp_path):
    examples = load_squad(KORQUAD)
    first_titles = list(dict.fromkeys(e.title for e in examples))[:3]
    examples = [e for e in examples if e.title in first_titles]
    assert len(examples) > 40
    feats = build_features(examples, mecab_tokenizer, max_seq_length=128, doc_stride=48,
                           max_query_length=32)
    assert feats.stats["answers_misaligned"] == 0
    assert feats.stats["answers_not_in_any_window"] == 0
    ds = MRCDataset(feats)
    assert len(pickle.loads(pickle.dumps(ds))) == len(ds)   # safe for DataLoader workers
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=ds.collate)
    starts, ends = [], []
    for batch in loader:                      # logits shaped like a model's: (B, L) per batch
        s = torch.zeros(batch["input_ids"].shape)
        e = torch.zeros(batch["input_ids"].shape)
        rows = torch.arange(len(s))
        s[rows, batch["start_positions"]] = 10.0
        e[rows, batch["end_positions"]] = 10.0
        starts.extend(s)
        ends.extend(e)
    preds = postprocess(feats, starts, ends)
    exact = sum(preds[e.id] == e.answers[0].text for e in examples) / len(examples)
    assert exact >= 0.97
    scores = squad_em_f1(preds, examples)
    assert scores["exact_match"] >= 97.0 and scores["f1"] >= 99.0 and scores["missing"] == 0
    out = write_predictions(preds, tmp_path / "sub" / "predictions.json")
    text = out.read_text(encoding="utf-8")
    assert json.loads(text) == preds and examples[0].answers[0].text in text  # UTF-8, not \u escapes


def test_question_truncation_is_counted(tiny_tokenizer):
    ex = long_example()
    ex.question = " ".join(["조선을 세운 왕은 누구인가?"] * 10)
    feats = build_features([ex], tiny_tokenizer, max_seq_length=48, doc_stride=12, max_query_length=8)
    assert feats.stats["questions_truncated"] == 1
    assert all(f.context_start == 10 for f in feats.features)
    with pytest.raises(ValueError, match="max_seq_length"):
        build_features([ex], tiny_tokenizer, max_seq_length=10, doc_stride=4, max_query_length=8)


def test_bad_input_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_squad(missing)
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json.*not UTF-8 JSON"):
        load_squad(not_json)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": "x", "articles": []}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong.json.*no \"data\" list.*SQuAD 1.1"):
        load_squad(wrong)
    korquad2 = tmp_path / "korquad2.json"
    korquad2.write_text(json.dumps({"version": "KorQuAD_2.0", "data": [{"title": "t", "context": "<p>서울</p>", "qas": [
        {"id": "1", "question": "?", "answer": {"text": "서울", "answer_start": 3}}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"korquad2.json: data\[0\]: .*the KorQuAD 2.0 layout"):
        load_squad(korquad2)
    no_start = tmp_path / "nostart.json"
    no_start.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "서울은 수도이다.", "qas": [{"id": "1", "question": "수도는?",
                                           "answers": [{"text": "서울"}]}]}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"nostart.json: data\[0\].paragraphs\[0\].qas\[0\]"
                                         r".answers\[0\].*answer_start"):
        load_squad(no_start)
    dup = tmp_path / "dup.json"
    qa = {"id": "1", "question": "수도는?", "answers": [{"text": "서울", "answer_start": 0}]}
    dup.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "서울은 수도이다.", "qas": [qa, qa]}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate question id"):
        load_squad(dup)
