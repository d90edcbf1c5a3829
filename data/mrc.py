"""Extractive machine reading comprehension (KorQuAD 1.0 / SQuAD 1.1 JSON layout; also the flat
one-object-per-question layout of `datasets`, and SQuAD 2.0's unanswerable questions).

Shape letters: N number of features (windows), B batch, L padded sequence length (longest in
the batch rounded up to a multiple of 8, never above ``max_seq_length``).

Pipeline: ``load_squad`` -> ``split_by_article`` (the JSON file stays unmodified) ->
``build_features`` (doc-stride windows ``[CLS] question [SEP] context-window [SEP]``) ->
``MRCDataset`` + ``collate`` for the model -> ``postprocess`` (logits -> id -> answer text) ->
``data.metrics.squad_em_f1`` / ``write_predictions`` (official predictions-file format).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data.jsonfile import encoding_fix, json_or_lines
from data.padding import pad_batch

__all__ = [
    "Answer",
    "Example",
    "Paragraph",
    "load_squad",
    "load_squad_paragraphs",
    "squad_counts",
    "split_by_article",
    "Feature",
    "MRCFeatures",
    "build_features",
    "check_answer_alignment",
    "MRCDataset",
    "postprocess",
    "write_predictions",
]


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset into the context


@dataclass
class Example:
    id: str
    question: str
    context: str
    answers: list[Answer]
    title: str
    paragraph_id: str  # "<article index>-<paragraph index>" in the source file


def _fail(path: Path, where: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {where}: {problem}. Expected SQuAD 1.1 / KorQuAD 1.0 layout: "
                      '{"data": [{"title": str, "paragraphs": [{"context": str, "qas": '
                      '[{"id": str, "question": str, "answers": [{"text": str, '
                      '"answer_start": int}]}]}]}]}')


@dataclass
class Paragraph:
    id: str       # "<article index>-<paragraph index>" in the source file
    title: str
    context: str


def _flat(rows: list) -> bool:
    """Whether rows are the flat layout of `datasets` (squad, squad_kor_v1): one object per question with
    "context", "question" and "answers": {"text": [...], "answer_start": [...]}."""
    return bool(rows) and all(isinstance(r, dict) and "context" in r and "question" in r
                              and isinstance(r.get("answers"), dict) for r in rows)


def _nest(rows: list[dict]) -> dict:
    """The flat layout -> SQuAD's nested one, in the rows' order: a new article where the title changes, a new
    paragraph where the context does (how `datasets` flattened them)."""
    data: list[dict] = []
    for i, r in enumerate(rows):
        a = r["answers"]
        texts, starts = a.get("text", []), a.get("answer_start", [])
        answers = ([{"text": t, "answer_start": st} for t, st in zip(texts, starts)]
                   if isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
                   else [{"text": texts, "answer_start": starts}])  # not lists of the same length: named below
        qa = {"id": r.get("id", str(i)), "question": r["question"], "answers": answers}
        title = str(r.get("title", ""))
        if not data or data[-1]["title"] != title:
            data.append({"title": title, "paragraphs": []})
        paragraphs = data[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != r["context"]:
            paragraphs.append({"context": r["context"], "qas": []})
        paragraphs[-1]["qas"].append(qa)
    return {"data": data}


def _parse_squad(path: str | Path) -> tuple[list[Paragraph], list[Example]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD/KorQuAD file {path} does not exist; pass the JSON file, "
                                "e.g. ../shared/data/korquad/KorQuAD_v1.0_dev.json")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 JSON ({e.reason}; {encoding_fix(path)}); pass a SQuAD 1.1 / "
                         f"KorQuAD 1.0 JSON file") from None
    try:
        root = json_or_lines(text)   # JSON lines: `datasets`' to_json() of squad_kor_v1 / squad
    except ValueError as e:
        raise ValueError(f"{path} is not UTF-8 JSON ({e}); pass a SQuAD 1.1 / KorQuAD 1.0 JSON file") from None
    if isinstance(root, dict) and isinstance(root.get("data"), list) and _flat(root["data"]):
        root = root["data"]
    if isinstance(root, dict) and _flat([root]):   # JSON lines of one question read as one JSON document
        root = [root]
    if isinstance(root, list) and _flat(root):
        root = _nest(root)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise _fail(path, "top level", 'no "data" list')
    paragraphs: list[Paragraph] = []
    examples: list[Example] = []
    seen: set[str] = set()
    for ai, article in enumerate(root["data"]):
        where = f"data[{ai}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            if isinstance(article, dict) and "qas" in article and "context" in article:
                raise _fail(path, where, 'article with "context" and "qas" but no "paragraphs": the KorQuAD 2.0 '
                                         'layout (HTML pages, one "answer" per question), which is not read here; '
                                         'convert it to plain-text paragraphs first')
            raise _fail(path, where, 'article without a "paragraphs" list')
        title = str(article.get("title", f"article-{ai}"))
        for pi, para in enumerate(article["paragraphs"]):
            pwhere = f"{where}.paragraphs[{pi}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas"), list):
                raise _fail(path, pwhere, 'paragraph needs a "context" string and a "qas" list')
            context = para["context"]
            paragraphs.append(Paragraph(f"{ai}-{pi}", title, context))
            for qi, qa in enumerate(para["qas"]):
                qwhere = f"{pwhere}.qas[{qi}]"
                if not isinstance(qa, dict) or "id" not in qa \
                        or not isinstance(qa.get("question"), str):
                    raise _fail(path, qwhere, 'question needs an "id" and a "question" string')
                answers = []
                # SQuAD 2.0's unanswerable questions: no answers (their plausible_answers are not answers)
                for ni, a in enumerate([] if qa.get("is_impossible") is True else qa.get("answers", [])):
                    if not isinstance(a, dict) or not isinstance(a.get("text"), str) \
                            or not isinstance(a.get("answer_start"), int):
                        raise _fail(path, f"{qwhere}.answers[{ni}]",
                                    'answer needs "text" (str) and "answer_start" (int)')
                    if not 0 <= a["answer_start"] <= len(context):
                        raise _fail(path, f"{qwhere}.answers[{ni}]",
                                    f"answer_start {a['answer_start']} outside the context "
                                    f"(length {len(context)})")
                    answers.append(Answer(a["text"], a["answer_start"]))
                qid = str(qa["id"])
                if qid in seen:
                    raise ValueError(f"{path}: {qwhere}: duplicate question id {qid!r}; "
                                     "question ids must be unique")
                seen.add(qid)
                examples.append(Example(qid, qa["question"], context, answers, title,
                                        f"{ai}-{pi}"))
    return paragraphs, examples


def load_squad(path: str | Path) -> list[Example]:
    """Parse a SQuAD-1.1-layout JSON file (KorQuAD 1.0) into one ``Example`` per question.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file and
    the JSON location) for anything that is not that layout or has duplicate question ids.
    """
    return _parse_squad(path)[1]


def load_squad_paragraphs(path: str | Path) -> list[Paragraph]:
    """Every paragraph of the file in order, also those without questions (not deduplicated)."""
    return _parse_squad(path)[0]


def squad_counts(path: str | Path) -> dict[str, int]:
    """Numbers of articles, paragraphs and questions in a SQuAD-layout file."""
    paragraphs, examples = _parse_squad(path)
    return {"articles": len({p.id.split("-")[0] for p in paragraphs}),
            "paragraphs": len(paragraphs), "questions": len(examples)}


def split_by_article(examples: Sequence[Example] | str | Path, dev_fraction: float = 0.1,
                     seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) by article title: all questions of one article fall on one side.

    ``round(dev_fraction * articles)`` articles (at least 1) chosen with ``seed`` go to eval;
    the order of examples within each split is the file order. Deterministic in ``seed``.
    """
    if isinstance(examples, (str, Path)):
        examples = load_squad(examples)
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction={dev_fraction} must be strictly between 0 and 1")
    titles = sorted({e.title for e in examples})
    if len(titles) < 2:
        raise ValueError(f"split_by_article needs at least 2 articles, got {len(titles)}"
                         + (f" (every question has the title {titles[0]!r})" if titles else "")
                         + ": a held-out fraction takes whole articles (questions grouped by title); pass the "
                         "evaluation questions as a file of their own (--eval_file), or give the articles "
                         "their titles (the flat JSON-lines layout: a \"title\" per question)")
    random.Random(seed).shuffle(titles)
    num_dev = min(len(titles) - 1, max(1, round(dev_fraction * len(titles))))
    dev_titles = set(titles[:num_dev])
    train = [e for e in examples if e.title not in dev_titles]
    dev = [e for e in examples if e.title in dev_titles]
    return train, dev


@dataclass
class Feature:
    """One window ``[CLS] question [SEP] context[span] [SEP]`` of one example."""
    example_index: int
    example_id: str
    input_ids: list[int]
    token_type_ids: list[int]
    start_position: int         # token index in input_ids; 0 ([CLS]) when the answer is not inside
    end_position: int
    context_start: int          # index in input_ids of the first context token
    token_offsets: list[tuple[int, int]]  # char span in the context of each window context token
    max_context: list[bool]     # the token has its most central window here (for postprocess)


@dataclass
class MRCFeatures:
    examples: list[Example]
    features: list[Feature]
    max_seq_length: int
    pad_id: int
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


def _answer_token_span(ex: Example, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Context-token span of the first answer, or None if its text does not sit at its start."""
    if not ex.answers:
        return None
    a = ex.answers[0]
    if ex.context[a.start: a.start + len(a.text)] != a.text:
        return None
    text = a.text
    char_start = a.start + (len(text) - len(text.lstrip()))
    char_end = a.start + len(text.rstrip())
    if char_end <= char_start:
        return None
    tok_start = next((i for i, (s, e) in enumerate(offsets) if e > char_start), None)
    tok_end = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < char_end), None)
    if tok_start is None or tok_end is None or tok_end < tok_start:
        return None
    return tok_start, tok_end


def _windows(num_tokens: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) context-token windows covering every token (BERT's doc-stride rule)."""
    spans, start = [], 0
    while True:
        length = min(num_tokens - start, room)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, doc_stride)


def _best_windows(num_tokens: int, windows: list[tuple[int, int]]) -> np.ndarray:
    """Index of each context token's max-context window (BERT: most central, ties to longer)."""
    t = np.arange(num_tokens)
    scores = np.full((len(windows), num_tokens), -1.0)
    for w, (s, n) in enumerate(windows):
        inside = (t >= s) & (t < s + n)
        scores[w, inside] = np.minimum(t[inside] - s, s + n - 1 - t[inside]) + 0.01 * n
    return scores.argmax(axis=0) if num_tokens else np.zeros(0, dtype=np.int64)


def build_features(examples: Sequence[Example], tokenizer, max_seq_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64) -> MRCFeatures:
    """Tokenize examples into doc-stride windows.

    Questions longer than ``max_query_length`` tokens are cut; a context longer than the room
    left (``max_seq_length - question - 3``) becomes several windows whose starts are
    ``doc_stride`` context tokens apart. The answer (first gold answer) gets token positions in
    each window that contains it whole, else ``(0, 0)`` ([CLS]). ``stats`` counts examples,
    features, truncated questions, answers whose text does not match the context at
    ``answer_start`` (``answers_misaligned``) and answers no window contains
    (``answers_not_in_any_window``).
    """
    if doc_stride < 1:
        raise ValueError(f"doc_stride={doc_stride} must be >= 1")
    if max_query_length < 1:
        raise ValueError(f"max_query_length={max_query_length} must be >= 1")
    examples = list(examples)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    questions = [e.question for e in examples]
    q_ids_all = encode_batch(questions) if encode_batch else [tokenizer.encode(q) for q in questions]
    context_cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
    stats = {"examples": len(examples), "features": 0, "questions_truncated": 0,
             "answers_misaligned": 0, "answers_not_in_any_window": 0}
    cls_id, sep_id = tokenizer.cls_id, tokenizer.sep_id
    features: list[Feature] = []
    for ei, (ex, q_ids) in enumerate(zip(examples, q_ids_all)):
        if len(q_ids) > max_query_length:
            stats["questions_truncated"] += 1
            q_ids = q_ids[:max_query_length]
        if ex.context not in context_cache:
            ids, offs = tokenizer.encode_with_offsets(ex.context)
            context_cache[ex.context] = (list(ids), [tuple(o) for o in offs])
        c_ids, c_offs = context_cache[ex.context]
        room = max_seq_length - len(q_ids) - 3
        if room < 1:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for context after a "
                             f"{len(q_ids)}-token question; raise max_seq_length or lower "
                             f"max_query_length (now {max_query_length})")
        span = _answer_token_span(ex, c_offs)
        if ex.answers and span is None:
            stats["answers_misaligned"] += 1
        windows = _windows(len(c_ids), room, doc_stride)
        best_window = _best_windows(len(c_ids), windows)
        found = False
        context_start = len(q_ids) + 2
        for wi, (s, n) in enumerate(windows):
            input_ids = [cls_id, *q_ids, sep_id, *c_ids[s: s + n], sep_id]
            token_type_ids = [0] * context_start + [1] * (n + 1)
            start_pos = end_pos = 0
            if span is not None and s <= span[0] and span[1] < s + n:
                start_pos = span[0] - s + context_start
                end_pos = span[1] - s + context_start
                found = True
            features.append(Feature(ei, ex.id, input_ids, token_type_ids, start_pos, end_pos,
                                    context_start, c_offs[s: s + n],
                                    (best_window[s: s + n] == wi).tolist()))
        if span is not None and not found:
            stats["answers_not_in_any_window"] += 1
    stats["features"] = len(features)
    return MRCFeatures(examples, features, max_seq_length, tokenizer.pad_id, stats)


MAX_MISALIGNED_FRACTION = 0.2  # above it a file's answer_start values are wrong, not a few rows


def check_answer_alignment(features: MRCFeatures, source: str,
                           max_fraction: float = MAX_MISALIGNED_FRACTION) -> str | None:
    """Refuse (ValueError) training features where more than `max_fraction` of the answered questions
    have no answer span (the answer text is not at `answer_start` in the context: those windows
    would all be trained to point at [CLS]); return a warning line when some but fewer do, else None."""
    answered = sum(1 for e in features.examples if e.answers)
    bad = features.stats.get("answers_misaligned", 0)
    if not bad:
        return None
    shown = f"{bad} of {answered} answers ({bad / answered:.1%})"
    example = next((e for e in features.examples if e.answers
                    and e.context[e.answers[0].start:e.answers[0].start + len(e.answers[0].text)]
                    != e.answers[0].text), None)
    detail = ""
    if example is not None:
        a = example.answers[0]
        found = example.context.find(a.text)
        detail = (f" (e.g. question {example.id!r}: answer {a.text[:40]!r}, answer_start {a.start}, the context "
                  f"there reads {example.context[a.start:a.start + len(a.text)][:40]!r}"
                  + (f"; the text occurs at character {found})" if found >= 0 else ")"))
    if bad / answered > max_fraction:
        raise ValueError(f"{source}: {shown} do not match the context at answer_start{detail}; more than "
                         f"{max_fraction:.0%} means the file's offsets are wrong (answer_start must be the "
                         f"0-based character offset of the answer text in its context): fix the file")
    return f"{source}: {shown} do not match the context at answer_start{detail}; those questions train toward [CLS]"


class MRCDataset(torch.utils.data.Dataset):
    """Features as samples. ``collate`` gives int64 ``input_ids, attention_mask, token_type_ids
    (B, L)`` and ``start_positions, end_positions (B,)``; with ``include_feature_index`` also
    ``feature_index (B,)`` (pop it before calling the model) to line logits up with features
    when the sampler shuffles or shards. Without it, evaluate with a sequential sampler."""

    def __init__(self, features: MRCFeatures, include_feature_index: bool = False):
        self.features = features
        self.include_feature_index = include_feature_index

    def __len__(self) -> int:
        return len(self.features.features)

    def __getitem__(self, i: int) -> dict:
        f = self.features.features[i]
        return {"input_ids": f.input_ids, "token_type_ids": f.token_type_ids,
                "start_position": f.start_position, "end_position": f.end_position,
                "feature_index": i}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        max_len = self.features.max_seq_length
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], self.features.pad_id, max_len)
        types, _, _ = pad_batch([s["token_type_ids"] for s in samples], 0, max_len)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                 "start_positions": torch.tensor([s["start_position"] for s in samples],
                                                 dtype=torch.int64),
                 "end_positions": torch.tensor([s["end_position"] for s in samples],
                                               dtype=torch.int64)}
        if self.include_feature_index:
            batch["feature_index"] = torch.tensor([s["feature_index"] for s in samples],
                                                  dtype=torch.int64)
        return batch


def _rows(logits, n: int) -> list[np.ndarray]:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    rows = [np.asarray(r.detach().float().cpu() if isinstance(r, torch.Tensor) else r,
                       dtype=np.float64) for r in logits]
    if len(rows) != n:
        raise ValueError(f"got logits for {len(rows)} features but there are {n} features; "
                         "pass one row per feature, in feature order")
    return rows


def postprocess(features: MRCFeatures, start_logits, end_logits, n_best: int = 20,
                max_answer_length: int = 30, null_answers: bool = False) -> dict[str, str]:
    """Best answer text per example id from per-feature start/end logits.

    ``start_logits``/``end_logits``: (N, L) array/tensor or a list of N 1-D rows (L may differ
    per row; positions past a feature's length are ignored). Over all windows of an example,
    the ``n_best`` top starts and ends inside the context are paired; a span is valid when
    end >= start, it spans at most ``max_answer_length`` tokens and its start token has its
    max-context window there. The highest start+end logit sum wins; its text is the context
    slice between the first token's start char and the last token's end char ("" if none).
    ``null_answers`` (data with unanswerable questions, SQuAD 2.0): the answer is "" where the
    no-answer score, [CLS]'s start + end logits (the lowest over the example's windows, as BERT's
    SQuAD 2.0 recipe), is above the best span's.
    """
    feats = features.features
    starts = _rows(start_logits, len(feats))
    ends = _rows(end_logits, len(feats))
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, s_row, e_row in zip(feats, starts, ends):
        null[f.example_index] = min(null.get(f.example_index, np.inf), float(s_row[0] + e_row[0]))
        n = len(f.token_offsets)
        c0 = f.context_start
        s_ctx = s_row[c0: c0 + n]
        e_ctx = e_row[c0: c0 + n]
        if len(s_ctx) < n or len(e_ctx) < n:
            raise ValueError(f"logits row of length {len(s_row)} is shorter than feature "
                             f"{f.example_id!r} ({len(f.input_ids)} tokens)")
        top_s = np.argsort(-s_ctx, kind="stable")[:n_best]
        top_e = np.argsort(-e_ctx, kind="stable")[:n_best]
        top_s = top_s[np.asarray(f.max_context, dtype=bool)[top_s]]
        length = top_e[None, :] - top_s[:, None] + 1
        valid = (length >= 1) & (length <= max_answer_length)
        if not valid.any():
            continue
        score = np.where(valid, s_ctx[top_s][:, None] + e_ctx[top_e][None, :], -np.inf)
        a, b = np.unravel_index(int(np.argmax(score)), score.shape)
        prev = best.get(f.example_index)
        if prev is None or score[a, b] > prev[0]:
            context = features.examples[f.example_index].context
            i, j = int(top_s[a]), int(top_e[b])
            # strip: byte-level BPE pieces carry the space before a word in their offsets
            best[f.example_index] = (float(score[a, b]),
                                     context[f.token_offsets[i][0]: f.token_offsets[j][1]].strip())
    if null_answers:
        best = {i: b for i, b in best.items() if b[0] >= null[i]}
    return {ex.id: best[i][1] if i in best else "" for i, ex in enumerate(features.examples)}


def write_predictions(predictions: dict[str, str], path: str | Path) -> Path:
    """Write ``{id: answer text}`` as UTF-8 JSON (the official predictions-file format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(predictions, f, ensure_ascii=False, indent=1)
    tmp.replace(path)
    return path
