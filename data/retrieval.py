"""Retrieval data: (query, passage) pairs for ICT / dense-retrieval fine-tuning, the KorQuAD
retrieval evaluation set, and text reading/encoding for the ``encoder`` command.

Shape letters: B batch, L padded sequence length (longest in the batch rounded up to a multiple
of 8, never above the max length of that side), Q queries, P passages.

Sequences are ``[CLS] text [SEP]`` (passages with a title: ``[CLS] title [SEP] text [SEP]``).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from data.jsonfile import encoding_fix, json_lines_keys, text_key
from data.metrics import recall_at_k
from data.mrc import Example, Paragraph, _parse_squad, load_squad
from data.padding import pad_batch

__all__ = [
    "Pair",
    "RetrievalEvalSet",
    "korquad_pairs",
    "korquad_eval_set",
    "split_sentences",
    "ict_pairs_from_documents",
    "read_dat_documents",
    "PairDataset",
    "read_text_file",
    "EncodeDataset",
]


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str
    title: str | None = None


@dataclass
class RetrievalEvalSet:
    """Deduplicated passages and the questions asking about them.

    ``passage_ids[p]`` / ``passages[p]`` / ``titles[p]``: P passages; ``query_ids[q]`` /
    ``queries[q]``: Q questions; ``gold[q]``: index into passages of the question's paragraph.
    """
    passage_ids: list[str]
    passages: list[str]
    titles: list[str]
    query_ids: list[str]
    queries: list[str]
    gold: list[int]

    def evaluate(self, scores, ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float]:
        """recall@k (and MRR) of a (Q, P) similarity matrix."""
        return recall_at_k(scores, self.gold, ks)


def korquad_pairs(examples: Sequence[Example] | str | Path, with_title: bool = False) -> list[Pair]:
    """One (question, its paragraph) pair per question, for in-batch-negative fine-tuning."""
    if isinstance(examples, (str, Path)):
        examples = load_squad(examples)
    return [Pair(e.question, e.context, e.title if with_title else None) for e in examples]


def korquad_eval_set(path: str | Path, examples: Sequence[Example] | None = None) -> RetrievalEvalSet:
    """All paragraphs of the file, deduplicated by text (ids: first occurrence, "<art>-<par>"),
    and the questions (all of the file, or only ``examples``, e.g. an article split) with the
    index of their gold paragraph."""
    paragraphs: list[Paragraph]
    paragraphs, all_examples = _parse_squad(path)
    if examples is None:
        examples = all_examples
    index_of: dict[str, int] = {}
    ids, texts, titles = [], [], []
    for p in paragraphs:
        if p.context not in index_of:
            index_of[p.context] = len(texts)
            ids.append(p.id)
            texts.append(p.context)
            titles.append(p.title)
    gold = []
    for e in examples:
        if e.context not in index_of:
            raise ValueError(f"question {e.id!r} is about a paragraph not in {path}; pass the "
                             "examples loaded from the same file")
        gold.append(index_of[e.context])
    return RetrievalEvalSet(ids, texts, titles, [e.id for e in examples],
                            [e.question for e in examples], gold)


_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")


def split_sentences(text: str) -> list[str]:
    """Split after . ! ? followed by whitespace (good enough for Wikipedia/review prose)."""
    return [s for s in (x.strip() for x in _SENTENCE_END.split(text)) if s]


def ict_pairs_from_documents(documents: Iterable[Sequence[str]], sentences_per_passage: int = 6,
                             keep_query_prob: float = 0.1, seed: int = 0,
                             min_sentences: int = 2) -> list[Pair]:
    """Inverse Cloze Task pairs: each document (a list of sentences) is cut into passages of
    ``sentences_per_passage`` sentences; from each passage with at least ``min_sentences``
    sentences one random sentence becomes the query and the passage without it the context
    (with probability ``keep_query_prob`` the sentence stays in, as in Lee et al. 2019, so the
    encoder also learns lexical matching). Deterministic in ``seed``."""
    if sentences_per_passage < 2 or min_sentences < 2:
        raise ValueError("ICT needs passages of at least 2 sentences (one query, one context)")
    rng = random.Random(seed)
    pairs = []
    for doc in documents:
        doc = [s for s in doc if s.strip()]
        for start in range(0, len(doc), sentences_per_passage):
            chunk = doc[start: start + sentences_per_passage]
            if len(chunk) < min_sentences:
                continue
            q = rng.randrange(len(chunk))
            keep = rng.random() < keep_query_prob
            context = chunk if keep else chunk[:q] + chunk[q + 1:]
            pairs.append(Pair(chunk[q], " ".join(context)))
    return pairs


def read_dat_documents(path: str | Path, max_documents: int | None = None) -> list[list[str]]:
    """Read a ``.dat`` corpus (one sentence per line, a blank line between documents)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist; pass a UTF-8 text file with "
                                "one sentence per line and a blank line between documents")
    docs: list[list[str]] = [[]]
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if line:
                docs[-1].append(line)
            elif docs[-1]:
                if max_documents is not None and len(docs) >= max_documents:
                    break
                docs.append([])
    return [d for d in docs if d][:max_documents]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode texts, each distinct text once (many questions share one paragraph)."""
    unique = list(dict.fromkeys(texts))
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(unique) if encode_batch else [tokenizer.encode(t) for t in unique]
    by_text = dict(zip(unique, encoded))
    return [by_text[t] for t in texts]


def _wrap(tokenizer, ids: list[int], max_len: int, title_ids: list[int] | None = None
          ) -> tuple[list[int], bool]:
    """[CLS] (title [SEP]) ids [SEP] cut to max_len; returns (sequence, was_truncated)."""
    head = [tokenizer.cls_id]
    if title_ids is not None:
        head += title_ids[: max(0, (max_len - 3) // 2)] + [tokenizer.sep_id]
    room = max_len - len(head) - 1
    if room < 1:
        raise ValueError(f"max length {max_len} leaves no room for text; use at least 3 (or 5 "
                         "with titles)")
    return head + ids[:room] + [tokenizer.sep_id], len(ids) > room


class PairDataset(torch.utils.data.Dataset):
    """Tokenized (query, passage) pairs. ``collate`` gives int64 ``query_input_ids,
    query_attention_mask (B, Lq)`` and ``passage_input_ids, passage_attention_mask (B, Lp)``.
    Texts over the max lengths are cut, counted in ``num_truncated_queries/passages``."""

    def __init__(self, pairs: Sequence[Pair], tokenizer, max_query_length: int = 64,
                 max_passage_length: int = 384):
        if not pairs:
            raise ValueError("PairDataset got no pairs")
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        self.pad_id = tokenizer.pad_id
        q_ids = _encode_all(tokenizer, [p.query for p in pairs])
        p_ids = _encode_all(tokenizer, [p.passage for p in pairs])
        t_texts = [p.title for p in pairs if p.title is not None]
        t_iter = iter(_encode_all(tokenizer, t_texts)) if t_texts else iter(())
        self.queries, self.passages = [], []
        self.num_truncated_queries = self.num_truncated_passages = 0
        for pair, q, p in zip(pairs, q_ids, p_ids):
            seq, cut = _wrap(tokenizer, q, max_query_length)
            self.queries.append(seq)
            self.num_truncated_queries += cut
            title = next(t_iter) if pair.title is not None else None
            seq, cut = _wrap(tokenizer, p, max_passage_length, title)
            self.passages.append(seq)
            self.num_truncated_passages += cut

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        return {"query": self.queries[i], "passage": self.passages[i]}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        q, qm, _ = pad_batch([s["query"] for s in samples], self.pad_id, self.max_query_length)
        p, pm, _ = pad_batch([s["passage"] for s in samples], self.pad_id, self.max_passage_length)
        return {"query_input_ids": q, "query_attention_mask": qm,
                "passage_input_ids": p, "passage_attention_mask": pm}


def read_text_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Read texts to encode: either one text per line (ids are 1-based line numbers) or TSV
    ``id<TAB>text`` (decided by the first non-empty line; an ``id<TAB>text`` header is skipped).
    In TSV, later tabs belong to the text; a first line with 3+ columns (e.g. NSMC's
    ``id<TAB>document<TAB>label``) is an error rather than a label silently encoded as text.
    Blank lines are skipped. Returns ``(ids, texts)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist; pass a UTF-8 file with one "
                                "passage per line, or 'id<TAB>text' lines")
    try:
        return _read_text_lines(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); {encoding_fix(path)}") from None


def _read_text_lines(path: Path) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    tsv: bool | None = None
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if tsv is None:
                keys = json_lines_keys(line.encode("utf-8") + b"\n")
                if keys:  # a JSON-lines file: its lines would be encoded as text, braces and keys included
                    id_key = next((k for k in keys if k in ("id", "doc_id", "pid", "_id")), None)
                    fields = f"[.{id_key}, .{text_key(keys)}] | @tsv" if id_key else f".{text_key(keys)}"
                    raise ValueError(f"{path} holds JSON lines (its first line is an object with the key(s) "
                                     f"{keys[:5]}), not text: they would be encoded as they are, braces and keys "
                                     f"included; write 'id<TAB>text' lines (or one passage per line) first, e.g. "
                                     f"`jq -r '{fields}' {path} > {path.with_suffix('.tsv').name}`")
                tsv = "\t" in line
                columns = line.split("\t")
                if len(columns) > 2:
                    raise ValueError(
                        f"{path}:{line_no}: {len(columns)} tab-separated columns ({_preview(columns)}), but a "
                        "TSV to encode has 2, 'id<TAB>text' (the text would carry the other columns, e.g. a "
                        f"label, into the vectors). Keep only the id and text columns, e.g. "
                        f"`cut -f1,2 {path} > {path.with_suffix('.id_text.tsv')}` (other numbers when they "
                        "are elsewhere), and pass that file")
                if tsv and columns[0].strip().lower() == "id":
                    continue
            if tsv:
                if "\t" not in line:
                    raise ValueError(f"{path}:{line_no}: no tab in a TSV file (the first line had "
                                     "one); write every line as 'id<TAB>text', or use no tabs "
                                     "at all for one passage per line")
                pid, text = line.split("\t", 1)
                pid, text = pid.strip(), text.strip()
                if not pid or not text:
                    raise ValueError(f"{path}:{line_no}: empty id or text; write 'id<TAB>text'")
                if pid in seen:
                    raise ValueError(f"{path}:{line_no}: duplicate id {pid!r}; ids must be unique")
                seen.add(pid)
            else:
                pid, text = str(line_no), line.strip()
            ids.append(pid)
            texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no text lines")
    return ids, texts


def _preview(columns: list[str], width: int = 12) -> str:
    return ", ".join(repr(c if len(c) <= width else c[:width] + "...") for c in columns)


class EncodeDataset(torch.utils.data.Dataset):
    """``[CLS] text [SEP]`` for the encoder command; ``collate`` gives int64 ``input_ids,
    attention_mask (B, L)``. Sample i is text i (use a sequential sampler to keep the order).
    Texts over ``max_seq_length`` are cut, counted in ``num_truncated``."""

    def __init__(self, texts: Sequence[str], tokenizer, max_seq_length: int = 384,
                 titles: Sequence[str] | None = None):
        if titles is not None and len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
        self.max_seq_length = max_seq_length
        self.pad_id = tokenizer.pad_id
        encoded = _encode_all(tokenizer, list(texts))
        t_enc = _encode_all(tokenizer, list(titles)) if titles is not None else [None] * len(encoded)
        self.input_ids, self.num_truncated = [], 0
        for ids, t in zip(encoded, t_enc):
            seq, cut = _wrap(tokenizer, ids, max_seq_length, t)
            self.input_ids.append(seq)
            self.num_truncated += cut

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i]}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], self.pad_id, self.max_seq_length)
        return {"input_ids": ids, "attention_mask": mask}


def is_squad_file(path: str | Path) -> bool:
    """Whether an ict --train_file/--eval_file is KorQuAD / SQuAD JSON (nested, or `datasets`' flat JSON
    lines) rather than query<TAB>passage lines: a .json name, or JSON inside whatever the name (a .jsonl,
    a dump without a suffix) whose first record is SQuAD-like. JSON lines of pairs are not
    (read_pairs_tsv names their fix)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    first_line = text.split(b"\n", 1)[0]
    if text[:1] == b"[":  # a JSON list of records, not a TSV query such as "[notice] ..."
        return text[1:].lstrip()[:1] == b"{" and b"\t" not in first_line
    if text[:1] != b"{" or b"\t" in first_line:
        return False
    keys = json_lines_keys(head if b"\n" in head else head + b"\n")
    return keys is None or _squad_keys(keys)


def _squad_keys(keys: list[str]) -> bool:
    """The keys of a JSON file's first record are SQuAD's: nested (`data`) or flat (question, context)."""
    return "data" in keys or {"question", "context"} <= set(keys)


def read_pairs_tsv(path: str | Path) -> list:
    """``query<TAB>passage`` lines (a ``query<TAB>passage`` header is skipped) as Pairs. A file that is not
    UTF-8, or holds JSON (a KorQuAD file whose name does not end in .json), raises ValueError naming the fix."""
    try:
        return _read_pairs_lines(Path(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); {encoding_fix(path)}") from None


def _read_pairs_lines(path: Path) -> list:
    pairs = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not pairs and "\t" not in line and line.lstrip()[:1] in ("{", "["):
                raise ValueError(_json_pairs_problem(path, line))
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{line_no}: expected 'query<TAB>passage' (2 non-empty fields), "
                                 f"got {len(parts)} field(s)")
            if line_no == 1 and parts[0].strip().lower() == "query":
                continue
            pairs.append(Pair(parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"{path} holds no query<TAB>passage lines")
    return pairs


def _json_pairs_problem(path: Path, first_line: str) -> str:
    """Why a JSON file (its first non-blank line given) is not a pairs TSV, and its fix."""
    keys = json_lines_keys(first_line.encode("utf-8") + b"\n") or []
    if not keys or _squad_keys(keys):   # SQuAD / KorQuAD, nested or flat
        return (f"{path} holds JSON, not 'query<TAB>passage' lines: a KorQuAD / SQuAD file (nested, or the flat JSON "
                f"lines of `datasets`) is read by data.mrc.load_squad; ict's --train_file and --eval_file take it as "
                f"such under any name (`is_squad_file`)")
    q = next((k for k in ("query", "question", "anchor") if k in keys), keys[0])
    p = next((k for k in ("passage", "context", "positive", "text", "document") if k in keys and k != q), keys[-1])
    return (f"{path} holds JSON lines (keys {keys[:5]}), not 'query<TAB>passage' lines; write them out first, e.g. "
            f"`jq -r '[.{q}, .{p}] | @tsv' {path} > {path.stem}.pairs.tsv`")


class QueryView(torch.utils.data.Dataset):
    """An EncodeDataset whose batches are named query_* (ICTModel encodes that side alone)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i]

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return {f"query_{k}": v for k, v in self.dataset.collate(samples).items()}
