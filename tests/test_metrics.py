"""EM/F1 (official KorQuAD 1.0 definitions), recall@k and accuracy against hand-computed values."""
import numpy as np
import pytest
import torch

from data.metrics import (accuracy, exact_match_score, f1_score, normalize_answer, recall_at_k,
                          squad_em_f1)


def test_normalize_answer_korean_punctuation_and_spaces():
    assert normalize_answer('"서울특별시."') == "서울특별시"
    assert normalize_answer("《삼국사기》 ") == "삼국사기"
    assert normalize_answer("‘광복절’") == "광복절"
    assert normalize_answer("(주)삼성전자") == "주 삼성전자"        # ( ) become spaces first
    assert normalize_answer("  1989년   2월\t15일 ") == "1989년 2월 15일"
    assert normalize_answer("〈KBS〉 News!") == "kbs news"
    assert normalize_answer("...") == ""


def test_exact_match_keeps_single_spaces():
    assert exact_match_score("'서울특별시'", "서울특별시")
    assert exact_match_score("1989년  2월 15일.", "1989년 2월 15일")
    # whitespace runs collapse, but a space is not removed: the official EM says no here
    assert not exact_match_score("서울 특별시", "서울특별시")


def test_f1_is_character_level():
    assert f1_score("서울 특별시", "서울특별시") == pytest.approx(1.0)   # spaces dropped in F1
    # 6 vs 5 characters, 5 shared: P=5/6, R=1 -> F1 = 10/11
    assert f1_score("서울특별시청", "서울특별시") == pytest.approx(10 / 11)
    # [대한민국서울] vs [서울시]: 2 shared: P=2/6, R=2/3 -> F1 = 4/9
    assert f1_score("대한민국 서울", "서울 시") == pytest.approx(4 / 9)
    # multiset overlap: 하하하 vs 하하 -> P=2/3, R=1 -> 0.8
    assert f1_score("하하하", "하하") == pytest.approx(0.8)
    assert f1_score("《》", "서울") == 0.0          # empty after normalization
    assert f1_score("부산", "서울") == 0.0


def test_squad_em_f1_by_hand():
    gold = {"q1": ["서울특별시", "서울"], "q2": ["1989년 2월 15일"], "q3": ["임종석"], "q4": ["부산"]}
    preds = {"q1": "서울.", "q2": "1989년 2월", "q3": "임종석 의원"}   # q4 unanswered
    out = squad_em_f1(preds, gold)
    # q1: EM 1 (vs "서울"), F1 1; q2: chars 1989년2월 (7) vs 1989년2월15일 (10): P=1 R=.7 F1=14/17
    # q3: 3 shared of pred 5 / gold 3: P=.6 R=1 F1=.75; q4 missing: 0
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 14 / 17 + 0.75 + 0) / 4)
    assert out["total"] == 4 and out["missing"] == 1


def test_squad_em_f1_unanswerable_questions():
    """SQuAD 2.0's rule for a question without gold answers: right (EM 1, F1 1) only when the prediction is
    empty (after normalization)."""
    gold = {"q1": ["서울"], "q2": [], "q3": [], "q4": []}
    out = squad_em_f1({"q1": "서울", "q2": "", "q3": "부산", "q4": " . "}, gold)
    assert out["exact_match"] == pytest.approx(75.0) and out["f1"] == pytest.approx(75.0)
    assert out["unanswerable"] == 3 and out["total"] == 4


def test_squad_em_f1_accepts_examples():
    from data.mrc import Answer, Example
    exs = [Example("a", "질문?", "맥락 서울", [Answer("서울", 3)], "t", "0-0")]
    assert squad_em_f1({"a": "서울"}, exs)["exact_match"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no gold questions"):
        squad_em_f1({}, [])


def test_recall_at_k_scores_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.2],     # gold 0 -> rank 0
                       [0.3, 0.4, 0.8, 0.1],     # gold 1 -> rank 1
                       [0.5, 0.5, 0.5, 0.5],     # gold 3 -> tie with all: rank 3 (ties count against)
                       [0.1, 0.2, 0.3, 0.0]])    # gold {0, 2}: best is 2 -> rank 0
    gold = [0, 1, 3, [0, 2]]
    out = recall_at_k(scores, gold, ks=(1, 2, 3, 10))
    assert out["recall@1"] == pytest.approx(2 / 4)
    assert out["recall@2"] == pytest.approx(3 / 4)
    assert out["recall@3"] == pytest.approx(3 / 4)
    assert out["recall@10"] == pytest.approx(1.0)       # k above the number of passages
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1) / 4)
    t = recall_at_k(torch.tensor(scores), torch.tensor([0, 1, 3, 2]), ks=(1,))
    assert t["recall@1"] == pytest.approx(2 / 4)


def test_recall_at_k_ranked_ids():
    ranked = [["p3", "p1", "p2"], ["p2", "p3"], ["p9"]]
    out = recall_at_k(ranked, ["p1", "p2", "p1"], ks=(1, 2))
    assert out == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3),
                   "mrr": pytest.approx((1 / 2 + 1 + 0) / 3)}


def test_recall_at_k_bad_input():
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(np.zeros((2, 3)), [0], ks=(1,))
    with pytest.raises(ValueError, match="out of range"):
        recall_at_k(np.zeros((1, 3)), [3], ks=(1,))
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(np.zeros((1, 3)), [0], ks=(0,))


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.1, 0.2]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    assert accuracy([1, 1, 0], [1, 0, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels"):
        accuracy([1, 1], [1])
