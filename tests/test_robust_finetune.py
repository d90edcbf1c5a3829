"""Fine-tuning and evaluation data paths with files users bring: blank lines before a header, a tab inside a
TSV text, label sets that do not meet, UTF-16 / cp949 files, KLUE NER without blank lines between sentences,
an evaluation set without entities, a KorQuAD JSON given to ict under another name, a flat QA file without
titles. Each was a traceback, a silently wrong result or an error without its fix."""
from __future__ import annotations

import json
import logging
import math
import warnings

import pytest

from data.classification import load_classification_tsv, number_labels, resolve_num_labels
from data.metrics import ner_scores
from data.mrc import load_squad, split_by_article
from data.ner import load_klue_ner
from data.retrieval import is_squad_file, read_pairs_tsv, read_text_file

NSMC = "id\tdocument\tlabel\n1\t재밌다\t1\n2\t별로다\t0\n"


def test_classify_whitespace_before_the_header(tmp_path):
    """A file of blank lines is empty (it was an IndexError); blank lines before the header are skipped."""
    f = tmp_path / "blank.tsv"
    f.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.tsv is empty; expected a header line"):
        load_classification_tsv(f)
    f.write_text("\n\n" + NSMC, encoding="utf-8")
    assert [(e.id, e.text, e.label) for e in load_classification_tsv(f)] == [("1", "재밌다", 1), ("2", "별로다", 0)]


def test_classify_row_with_more_fields_than_the_header_is_refused(tmp_path):
    """A tab inside a text (a TSV that pandas quoted) shifted the label column onto a piece of text, silently;
    now the row is named. Trailing empty fields (a tab at the end of the line) are still fine."""
    f = tmp_path / "pandas.tsv"
    f.write_text('id\tdocument\tlabel\n1\t좋은 영화\t1\n2\t"좋은\t영화"\t1\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pandas.tsv:3: 4 tab-separated field\(s\), more than the header's 3 .*"
                                         r"a tab inside the text\?.*save the file as .csv"):
        load_classification_tsv(f)
    f.write_text("id\tdocument\tlabel\n1\t좋은 영화\t1\t\n2\t별로\t0\n", encoding="utf-8")
    assert [(e.text, e.label) for e in load_classification_tsv(f)] == [("좋은 영화", 1), ("별로", 0)]
    c = tmp_path / "reviews.csv"
    c.write_text("id,document,label\n1,좋아요, 정말,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"reviews.csv:2: 4 comma-separated field\(s\).*a comma inside the text"):
        load_classification_tsv(c)


def test_classify_label_sets_that_share_nothing_are_refused(tmp_path, caplog):
    """Train labelled 0/1, evaluation labelled negative/positive: that made a 4-class head scored on classes it
    never trained on (any accuracy, no error). A label of the evaluation file alone is logged."""
    train, evals = tmp_path / "train.tsv", tmp_path / "test.tsv"
    train.write_text(NSMC, encoding="utf-8")
    evals.write_text("id\tdocument\tlabel\n3\t최고\tpositive\n4\t최악\tnegative\n", encoding="utf-8")
    sources = {"--train_file train.tsv": load_classification_tsv(train),
               "--eval_file test.tsv": load_classification_tsv(evals)}
    assert number_labels(sources) == ["0", "1", "negative", "positive"]
    with pytest.raises(ValueError, match=r"the labels of --train_file train.tsv share none with the other file's "
                                         r"\(label counts --train_file train.tsv: \{0: 1, 1: 1\}; --eval_file test.tsv: "
                                         r"\{2: 1, 3: 1\}\).*indices in one, names in the other"):
        resolve_num_labels(sources)
    with pytest.raises(ValueError, match="share none"):     # --num_labels does not make them meet
        resolve_num_labels(sources, num_labels=4)

    evals.write_text("id\tdocument\tlabel\n3\t최고\t1\n4\t그냥\t2\n", encoding="utf-8")
    sources = {"--train_file train.tsv": load_classification_tsv(train),
               "--eval_file test.tsv": load_classification_tsv(evals)}
    with caplog.at_level(logging.WARNING, logger="data.classification"):
        assert resolve_num_labels(sources) == 3
    assert "label(s) [2] of --eval_file test.tsv (rows {2: 1}) are in no row of --train_file train.tsv" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.classification"):     # one file: nothing to compare
        assert resolve_num_labels({"train": load_classification_tsv(train)}) == 2
    assert caplog.text == ""


def test_not_utf8_task_files_name_their_fix(tmp_path):
    """UTF-16 (Excel's "Unicode text") was told to convert from cp949; the ict pairs and encoder readers gave a
    bare UnicodeDecodeError without the file."""
    u16 = tmp_path / "reviews.tsv"
    u16.write_text(NSMC, encoding="utf-16")
    with pytest.raises(ValueError, match=r"reviews.tsv is not UTF-8 text .*UTF-16.*`iconv -f utf-16 -t utf-8 "):
        load_classification_tsv(u16)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_bytes("query\tpassage\n수도는?\t서울은 수도다\n".encode("cp949"))
    with pytest.raises(ValueError, match=r"pairs.tsv is not UTF-8 text .*`iconv -f cp949 -t utf-8 "):
        read_pairs_tsv(pairs)
    with pytest.raises(ValueError, match=r"pairs.tsv is not UTF-8 text .*`iconv -f cp949 -t utf-8 "):
        read_text_file(pairs)
    pairs.write_text("query\tpassage\n수도는?\t서울은 수도다\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"pairs.tsv is not UTF-8 text .*`iconv -f utf-16"):
        read_text_file(pairs)


def test_ict_pairs_file_holding_json_names_the_fix(tmp_path):
    """ict takes a KorQuAD file under any name (`datasets`' flat .jsonl was read as TSV: 'got 1 field(s)');
    JSON lines of pairs, read as TSV, name their fix; a TSV query starting with '[' or '{' stays a TSV."""
    flat = tmp_path / "squad_kor_v1.jsonl"
    flat.write_text(json.dumps({"id": "1", "title": "서울", "context": "서울은 한국의 수도이다.", "question": "수도는?",
                                "answers": {"text": ["서울"], "answer_start": [0]}}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"squad_kor_v1.jsonl holds JSON, not 'query<TAB>passage' lines: a KorQuAD / "
                                         r"SQuAD file .*data.mrc.load_squad; ict's --train_file and --eval_file take "
                                         r"it as such under any name"):
        read_pairs_tsv(flat)
    assert [e.question for e in load_squad(flat)] == ["수도는?"]       # what the file is
    dump = tmp_path / "pairs.jsonl"
    dump.write_text('{"query": "수도는?", "passage": "서울은 수도다"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.jsonl holds JSON lines .*`jq -r '\[.query, .passage\] \| @tsv'"):
        read_pairs_tsv(dump)
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("[공지] 수도는?\t서울은 수도다\n", encoding="utf-8")       # a query starting with '[' is text
    assert [(p.query, p.passage) for p in read_pairs_tsv(tsv)] == [("[공지] 수도는?", "서울은 수도다")]
    braces = tmp_path / "braces.tsv"
    braces.write_text("{공지} 수도는?\t서울은 수도다\n", encoding="utf-8")
    nested = tmp_path / "korquad"   # the nested layout, pretty-printed, without a suffix
    nested.write_text(json.dumps({"version": "1", "data": []}, indent=2), encoding="utf-8")
    squad_list = tmp_path / "squad_list.txt"
    squad_list.write_text('[{"question": "q", "context": "c"}]', encoding="utf-8")
    assert [is_squad_file(p) for p in (flat, nested, squad_list, tmp_path / "x.json")] == [True] * 4
    assert [is_squad_file(p) for p in (dump, tsv, braces)] == [False] * 3


def _klue(guid: str, text: str, tags: list[str]) -> str:
    return f"## {guid}\t{text}\n" + "".join(f"{c}\t{t}\n" for c, t in zip(text, tags))


def test_klue_ner_without_blank_lines_between_sentences(tmp_path):
    """A '## guid<TAB>sentence' line starts a sentence also where the blank line before it is missing (all the
    sentences of such a file were read as one, under the first guid)."""
    one = _klue("klue-ner-v1_dev_00001", "이순신 장군", ["B-PS", "I-PS", "I-PS", "O", "O", "O"])
    two = _klue("klue-ner-v1_dev_00002", "서울에서", ["B-LC", "I-LC", "O", "O"])
    header = "## 토큰, 레이블 구분자 : \\t\n## 컬럼명 : CHAR\tTAG\n"
    with_blanks, without = tmp_path / "blank.tsv", tmp_path / "joined.tsv"
    with_blanks.write_text(header + one + "\n" + two + "\n", encoding="utf-8")
    without.write_text(header + one + two, encoding="utf-8")
    want = [(s.guid, s.text, s.tags) for s in load_klue_ner(with_blanks)]
    assert [g for g, _, _ in want] == ["klue-ner-v1_dev_00001", "klue-ner-v1_dev_00002"]
    assert [(s.guid, s.text, s.tags) for s in load_klue_ner(without)] == want


def test_ner_scores_without_any_entity_are_numbers():
    """An evaluation slice without entities (gold and prediction all O) gave entity_macro_f1 NaN and numpy
    warnings; it is 0 like the micro scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ner_scores([["O", "O"], []], [["O", "O"], []], ["O", "B-PS", "I-PS"])
    assert not any(math.isnan(v) for v in out.values())
    assert out["entity_f1"] == 0.0 and out["entity_macro_f1"] == 0.0 and out["char_f1"] == 100.0
    out = ner_scores([["B-PS", "I-PS", "O", "B-LC"]], [["B-PS", "I-PS", "O", "O"]])
    assert out["entity_macro_f1"] == pytest.approx(50.0) and out["entity_f1/PS"] == 100.0 and out["entity_f1/LC"] == 0.0


def test_split_by_article_of_one_article_names_the_fix(tmp_path):
    """A flat QA file without titles is one article: --eval_fraction cannot hold any out; the error said only
    'needs at least 2 articles'."""
    flat = tmp_path / "qa.jsonl"
    flat.write_text("".join(json.dumps({"id": str(i), "context": "서울은 한국의 수도이다.", "question": f"질문 {i}",
                                        "answers": {"text": ["서울"], "answer_start": [0]}}, ensure_ascii=False) + "\n"
                            for i in range(3)), encoding="utf-8")
    with pytest.raises(ValueError, match=r"needs at least 2 articles, got 1 \(every question has the title ''\).*"
                                         r"--eval_file.*\"title\" per question"):
        split_by_article(load_squad(flat), 0.2)


def test_json_lines_of_one_example(tmp_path):
    """JSON lines holding one record parse as one JSON object: a one-question flat QA file was refused ('no
    "data" list') and a one-pair NLI file ('not a non-empty JSON list'); both read as JSON lines now."""
    from data.pairs import load_klue_nli

    qa = tmp_path / "one.jsonl"
    qa.write_text(json.dumps({"id": "q1", "title": "서울", "context": "서울은 한국의 수도이다.", "question": "수도는?",
                              "answers": {"text": ["서울"], "answer_start": [0]}}, ensure_ascii=False) + "\n", encoding="utf-8")
    [ex] = load_squad(qa)
    assert (ex.id, ex.question, ex.answers[0].text, ex.answers[0].start) == ("q1", "수도는?", "서울", 0)
    nli = tmp_path / "nli.jsonl"
    nli.write_text(json.dumps({"guid": "g1", "premise": "비가 온다", "hypothesis": "날씨가 맑다",
                               "gold_label": "contradiction"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [(e.guid, e.label) for e in load_klue_nli(nli)] == [("g1", 2.0)]
