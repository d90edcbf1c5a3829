"""Retrieval data: KorQuAD eval set, question-passage pairs, ICT pairs, text reader, collates."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data.mrc import load_squad, split_by_article
from data.retrieval import (EncodeDataset, Pair, PairDataset, ict_pairs_from_documents,
                            korquad_eval_set, korquad_pairs, read_dat_documents, read_text_file,
                            split_sentences)

KORQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "korquad" / "KorQuAD_v1.0_dev.json"
needs_korquad = pytest.mark.skipif(not KORQUAD.exists(), reason=f"{KORQUAD} not available")


@needs_korquad
def test_korquad_eval_set():
    es = korquad_eval_set(KORQUAD)
    # 964 paragraphs, 3 of them repeat an earlier paragraph's text word for word
    assert len(es.passages) == 961 == len(set(es.passages)) == len(set(es.passage_ids))
    assert len(es.queries) == len(es.gold) == len(es.query_ids) == 5774
    examples = load_squad(KORQUAD)
    assert all(es.passages[g] == e.context for g, e in zip(es.gold, examples))
    assert es.titles[es.gold[0]] == "임종석"
    # a perfect scorer gets recall 1 at every k; a constant one gets nothing at k=1
    perfect = np.zeros((len(es.gold), len(es.passages)), dtype=np.float32)
    perfect[np.arange(len(es.gold)), es.gold] = 1.0
    assert es.evaluate(perfect, ks=(1, 5)) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}
    assert es.evaluate(np.zeros_like(perfect), ks=(1,))["recall@1"] == 0.0
    # questions of one split, passages of the whole file
    _, dev = split_by_article(examples, 0.1, seed=0)
    es_dev = korquad_eval_set(KORQUAD, dev)
    assert len(es_dev.passages) == 961 and len(es_dev.queries) == len(dev)


def test_pair_dataset_collate(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [Pair("영화 제목이 뭐야?", "이 영화는 정말 재미있었다. 배우들의 연기가 좋았다.", "좋은 영화"),
             Pair("감독은 누구?", " ".join(["감독의 연출이 훌륭하다."] * 40), "감독")]
    ds = PairDataset(pairs, tok, max_query_length=16, max_passage_length=60)
    assert ds.num_truncated_queries == 0 and ds.num_truncated_passages == 1
    batch = ds.collate([ds[0], ds[1]])
    assert set(batch) == {"query_input_ids", "query_attention_mask", "passage_input_ids",
                          "passage_attention_mask"}
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert batch["query_input_ids"].shape[1] % 8 == 0 and batch["query_input_ids"].shape[1] <= 16
    assert batch["passage_input_ids"].shape == (2, 60)        # capped at max, not rounded to 64
    q0 = batch["query_input_ids"][0, : batch["query_attention_mask"][0].sum()].tolist()
    assert q0 == [tok.cls_id, *tok.encode("영화 제목이 뭐야?"), tok.sep_id]
    p0 = batch["passage_input_ids"][0, : batch["passage_attention_mask"][0].sum()].tolist()
    title = tok.encode("좋은 영화")
    assert p0 == [tok.cls_id, *title, tok.sep_id,
                  *tok.encode("이 영화는 정말 재미있었다. 배우들의 연기가 좋았다."), tok.sep_id]
    assert batch["passage_input_ids"][1, -1].item() == tok.sep_id
    assert (batch["query_input_ids"][batch["query_attention_mask"] == 0] == tok.pad_id).all()


@needs_korquad
def test_korquad_pairs(tiny_tokenizer):
    examples = load_squad(KORQUAD)[:50]
    pairs = korquad_pairs(examples)
    assert len(pairs) == 50 and pairs[0].query == examples[0].question
    assert pairs[0].passage == examples[0].context and pairs[0].title is None
    assert korquad_pairs(examples, with_title=True)[0].title == "임종석"
    ds = PairDataset(pairs, tiny_tokenizer, max_query_length=32, max_passage_length=128)
    assert ds.num_truncated_passages > 0                      # KorQuAD paragraphs are long
    batch = ds.collate([ds[i] for i in range(8)])
    assert batch["passage_input_ids"].shape == (8, 128)
    # DataLoader workers get a pickled copy: no tokenizer (mecab is unpicklable) inside
    assert len(pickle.loads(pickle.dumps(ds))) == 50


def test_ict_pairs_and_dat_reader(tmp_path):
    dat = tmp_path / "c.dat"
    dat.write_text("첫 문장.\n둘째 문장.\n셋째 문장.\n\n\n다른 문서 하나.\n다른 문서 둘.\n\n홀로 문장.\n",
                   encoding="utf-8")
    docs = read_dat_documents(dat)
    assert docs == [["첫 문장.", "둘째 문장.", "셋째 문장."], ["다른 문서 하나.", "다른 문서 둘."],
                    ["홀로 문장."]]
    assert read_dat_documents(dat, max_documents=1) == docs[:1]
    pairs = ict_pairs_from_documents(docs, sentences_per_passage=6, keep_query_prob=0.0, seed=3)
    assert len(pairs) == 2                                    # the one-sentence document yields none
    for pair, doc in zip(pairs, docs):
        assert pair.query in doc and pair.query not in pair.passage
        rest = [s for s in doc if s != pair.query]
        assert pair.passage == " ".join(rest)
    assert ict_pairs_from_documents(docs, seed=3, keep_query_prob=0.0) == pairs  # deterministic
    kept = ict_pairs_from_documents(docs, keep_query_prob=1.0)
    assert all(p.query in p.passage for p in kept)
    with pytest.raises(FileNotFoundError, match="nope.dat"):
        read_dat_documents(tmp_path / "nope.dat")


def test_split_sentences():
    assert split_sentences("서울은 수도이다. 부산은 항구다! 어디가 좋아? 모두") == \
        ["서울은 수도이다.", "부산은 항구다!", "어디가 좋아?", "모두"]
    assert split_sentences("3.14는 원주율이다.") == ["3.14는 원주율이다."]


def test_read_text_file_and_encode_dataset(tmp_path, tiny_tokenizer):
    plain = tmp_path / "plain.txt"
    plain.write_text("첫 번째 문단입니다.\n\n두 번째 문단입니다.\n", encoding="utf-8")
    assert read_text_file(plain) == (["1", "3"], ["첫 번째 문단입니다.", "두 번째 문단입니다."])
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ndoc-a\t가나다 라마.\ndoc-b\t바사\t아자\n", encoding="utf-8")
    assert read_text_file(tsv) == (["doc-a", "doc-b"], ["가나다 라마.", "바사\t아자"])
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("a\t가나다\n탭 없는 줄\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mixed.tsv:2: no tab"):
        read_text_file(mixed)
    dup = tmp_path / "dup.tsv"
    dup.write_text("a\t가\na\t나\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup.tsv:2: duplicate id 'a'"):
        read_text_file(dup)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_text_file(tmp_path / "absent.txt")
    jsonl = tmp_path / "passages.jsonl"     # a JSON-lines dump would be encoded braces and all
    jsonl.write_text('{"doc_id": 7, "passage": "서울은 수도이다"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"passages.jsonl holds JSON lines .*`jq -r '\[.doc_id, .passage\] \| @tsv'"):
        read_text_file(jsonl)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text lines"):
        read_text_file(blank)

    _, texts = read_text_file(plain)
    ds = EncodeDataset(texts + ["아주 " * 50], tiny_tokenizer, max_seq_length=20)
    assert ds.num_truncated == 1 and len(ds) == 3
    batch = ds.collate([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (3, 20) and batch["input_ids"].dtype == torch.int64
    small = ds.collate([ds[0]])
    n = int(small["attention_mask"].sum())
    assert small["input_ids"].shape[1] == -(-n // 8) * 8
    assert small["input_ids"][0, :n].tolist() == [tiny_tokenizer.cls_id,
                                                   *tiny_tokenizer.encode(texts[0]),
                                                   tiny_tokenizer.sep_id]
