"""Evaluation metrics for the downstream tasks: KorQuAD EM/F1, retrieval recall@k, accuracy.

Shape letters: Q number of queries, P number of passages, B batch, C number of classes.

EM/F1 follow the official KorQuAD 1.0 evaluation script (``evaluate-v1.0.py``, distributed at
https://korquad.github.io/KorQuad%201.0/, itself derived from the SQuAD v1.1 script):

* ``normalize_answer``: replace the symbols ``' " 《 》 < > 〈 〉 ( ) ‘ ’`` by a space, lower-case,
  drop every character of ``string.punctuation``, then collapse runs of whitespace to one space
  (``' '.join(text.split())``).
* EM: the normalized prediction equals the normalized gold string (so "서울 특별시" and
  "서울특별시" are NOT an exact match: the single space survives normalization).
* F1 is computed over CHARACTERS, not words: both normalized strings are split on whitespace
  and the characters of all pieces are pooled (spaces dropped); F1 is the harmonic mean of the
  multiset-overlap precision and recall; 0 when nothing overlaps (also when either side is
  empty after normalization).
* Per question, the maximum over its gold answers; averaged over ALL questions of the data set,
  an unanswered question scoring 0; reported in percent (0..100).
* A question without gold answers (SQuAD 2.0's / KorQuAD 2.0's unanswerable ones) is scored as the
  SQuAD 2.0 script does: EM and F1 are 1 when the prediction is empty, else 0.
"""
from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "squad_em_f1",
    "recall_at_k",
    "accuracy",
    "ner_scores",
    "sts_scores",
]

# Symbols the official script replaces by a space before removing string.punctuation.
_KORQUAD_SYMBOLS = re.compile("['\"《》<>〈〉()‘’]")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """KorQuAD 1.0 ``normalize_answer``: symbols -> space, lower, strip punctuation, fix spaces."""
    s = _KORQUAD_SYMBOLS.sub(" ", s)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Official KorQuAD EM for one (prediction, gold) pair."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def _chars(s: str) -> list[str]:
    return [ch for tok in normalize_answer(s).split() for ch in tok]


def f1_score(prediction: str, ground_truth: str) -> float:
    """Official KorQuAD character-level F1 for one (prediction, gold) pair, in 0..1."""
    pred, gold = _chars(prediction), _chars(ground_truth)
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred)
    recall = num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(examples) -> dict[str, list[str]]:
    """Accept ``{id: [gold texts]}`` or an iterable of ``data.mrc.Example``."""
    if isinstance(examples, Mapping):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in examples.items()}
    gold: dict[str, list[str]] = {}
    for ex in examples:
        gold[ex.id] = [a.text for a in ex.answers]
    return gold


def squad_em_f1(predictions: Mapping[str, str], examples) -> dict[str, float]:
    """KorQuAD 1.0 EM and F1 (percent) of ``predictions`` (id -> answer text).

    ``examples``: the gold questions, a list of ``data.mrc.Example`` or a dict id -> gold text(s).
    Every gold question counts; a missing prediction scores 0 (as in the official script).
    Returns ``{"exact_match", "f1", "total", "missing"}``.
    """
    gold = _gold_texts(examples)
    em = f1 = 0.0
    missing = 0
    for qid, answers in gold.items():
        if qid not in predictions:
            missing += 1
            continue
        pred = predictions[qid]
        if not answers:  # unanswerable (SQuAD 2.0): right only when nothing is predicted
            em += float(not normalize_answer(pred))
            f1 += float(not normalize_answer(pred))
            continue
        em += max(float(exact_match_score(pred, a)) for a in answers)
        f1 += max(f1_score(pred, a) for a in answers)
    total = len(gold)
    if total == 0:
        raise ValueError("squad_em_f1 got no gold questions; pass the evaluation examples")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total,
            "total": total, "missing": missing, "unanswerable": sum(1 for a in gold.values() if not a)}


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def recall_at_k(scores_or_ranked, gold, ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float]:
    """Fraction of queries whose gold passage is within the top k, for each k in ``ks``.

    Two input forms:
    * ``scores`` (Q, P) array/tensor of similarities, ``gold`` a length-Q sequence of column
      indices (an int, or a collection of ints when several passages are correct). Ties are
      counted against the gold passage: its rank is the number of OTHER passages scoring >= it,
      so a constant scorer gets no credit.
    * ``ranked`` a length-Q list of ranked passage-id lists (best first, any hashable ids),
      ``gold`` a length-Q sequence of gold ids (or collections of ids).
    Returns ``{"recall@k": value in 0..1, ..., "mrr": mean reciprocal rank (0 if not ranked)}``.
    A k above P is allowed (then every gold passage is within the top k).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    gold = gold.tolist() if isinstance(gold, (np.ndarray, torch.Tensor)) else list(gold)
    ranks: list[float] = []  # 0-based rank of the best gold passage, inf when absent
    if isinstance(scores_or_ranked, (np.ndarray, torch.Tensor)):
        scores = _as_numpy(scores_or_ranked)
        if scores.ndim != 2:
            raise ValueError(f"scores must be 2-D (queries, passages), got shape {scores.shape}")
        if scores.shape[0] != len(gold):
            raise ValueError(f"scores has {scores.shape[0]} rows but gold has {len(gold)} entries")
        num_passages = scores.shape[1]
        for row, g in zip(scores, gold):
            idx = [int(g)] if np.isscalar(g) or isinstance(g, (int, np.integer)) else [int(i) for i in g]
            if not idx or min(idx) < 0 or max(idx) >= num_passages:
                raise ValueError(f"gold index {g} out of range for {num_passages} passages")
            best = max(row[i] for i in idx)
            is_gold = np.zeros(num_passages, dtype=bool)
            is_gold[idx] = True
            ranks.append(float(np.count_nonzero((row >= best) & ~is_gold)))
    else:
        ranked = list(scores_or_ranked)
        if len(ranked) != len(gold):
            raise ValueError(f"ranked has {len(ranked)} queries but gold has {len(gold)} entries")
        for ids, g in zip(ranked, gold):
            gset = {g} if isinstance(g, (str, int, np.integer)) else set(g)
            pos = next((r for r, pid in enumerate(ids) if pid in gset), None)
            ranks.append(float("inf") if pos is None else float(pos))
    if not ranks:
        raise ValueError("recall_at_k got no queries")
    r = np.asarray(ranks)
    out = {f"recall@{k}": float(np.mean(r < k)) for k in ks}
    out["mrr"] = float(np.mean(np.where(np.isinf(r), 0.0, 1.0 / (r + 1.0))))
    return out


def accuracy(logits_or_preds, labels) -> float:
    """Fraction of correct predictions; ``logits`` (B, C) are arg-maxed, ``preds`` (B,) used as is."""
    p = _as_numpy(logits_or_preds)
    y = _as_numpy(labels).reshape(-1)
    if p.ndim == 2:
        p = p.argmax(axis=-1)
    p = p.reshape(-1)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    if y.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(p.astype(np.int64) == y.astype(np.int64)))


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
               tags: Sequence[str] | None = None) -> dict[str, float]:
    """KLUE NER scores (percent) of per-character IOB2 tag sequences (whitespace already removed).

    * ``entity_f1`` / ``entity_precision`` / ``entity_recall``: micro-averaged over entities, strict
      IOB2 matching (``seqeval`` ``mode="strict", scheme=IOB2``: an entity counts only with the same
      type, start and end; an I- without its B- starts no entity); ``entity_macro_f1`` is the mean
      over types (what KLUE's baseline reports as entity F1); ``entity_f1/<type>`` per type;
    * ``char_f1``: KLUE's character-level macro F1: scikit-learn's per-tag F1 over every
      character, averaged over the tags other than ``O`` (a tag absent from both gold and
      prediction scores 1, ``zero_division=1``, as in KLUE).
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2
    from sklearn.metrics import f1_score as sk_f1

    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("ner_scores: gold and predicted tag sequences differ in number or length")
    if not gold:
        raise ValueError("ner_scores got no sentences")
    kw = dict(mode="strict", scheme=IOB2, zero_division=0)
    with warnings.catch_warnings():   # no entity at all: numpy's "mean of empty slice" inside seqeval
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold, pred, output_dict=True, **kw)
    types = [name for name in report if not name.endswith(" avg")]
    out = {"entity_f1": 100.0 * f1_score(gold, pred, **kw),
           "entity_precision": 100.0 * precision_score(gold, pred, **kw),
           "entity_recall": 100.0 * recall_score(gold, pred, **kw),
           # no entity in gold or prediction: 0 like the micro scores (seqeval's mean over no types is NaN)
           "entity_macro_f1": 100.0 * f1_score(gold, pred, average="macro", **kw) if types else 0.0}
    flat_gold = [t for s in gold for t in s]
    flat_pred = [t for s in pred for t in s]
    tags = [t for t in (tags or sorted(set(flat_gold + flat_pred))) if t != "O"]
    out["char_f1"] = 100.0 * float(sk_f1(flat_gold, flat_pred, labels=tags, average="macro", zero_division=1)) if tags else 100.0
    for name in sorted(types):
        out[f"entity_f1/{name}"] = 100.0 * report[name]["f1-score"]
    return out


def sts_scores(predictions, labels, threshold: float = 3.0) -> dict[str, float]:
    """KLUE STS: Pearson r of predicted vs gold similarity (0..5), and the F1 (percent) of
    ``score >= threshold`` as the positive class (KLUE's binary label)."""
    from sklearn.metrics import f1_score as sk_f1

    p, y = _as_numpy(predictions).reshape(-1).astype(np.float64), _as_numpy(labels).reshape(-1).astype(np.float64)
    if p.shape != y.shape or p.size < 2:
        raise ValueError(f"sts_scores needs as many predictions as labels, at least 2 (got {p.size} and {y.size})")
    r = float(np.corrcoef(p, y)[0, 1]) if p.std() > 0 and y.std() > 0 else 0.0
    f1 = 100.0 * float(sk_f1(y >= threshold, p >= threshold, zero_division=0))
    return {"pearson": r, "f1": f1}
