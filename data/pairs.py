"""Sentence-pair data: KLUE NLI (3 classes) and KLUE STS (similarity 0-5, regression), and the
stable hash split used by the KLUE tasks when no --eval_file is given.

Files (KLUE v1.1 JSON, a list of objects):
* NLI: ``premise``, ``hypothesis``, ``gold_label`` in {entailment, neutral, contradiction}
  (ids 0, 1, 2 in that order, as KLUE);
* STS: ``sentence1``, ``sentence2``, ``labels.label`` a number in [0, 5].
``guid`` names an example (its position when missing). A JSON-lines file (one object per line)
is read the same way, and so is a tab-separated file with a header line (KorNLI's
``sentence1 sentence2 gold_label``, KorSTS's ``genre filename year id score sentence1 sentence2``):
the texts may be named ``premise``/``hypothesis`` or ``sentence1``/``sentence2``, the NLI label
``gold_label`` or ``label`` (a name, or its id 0-2), the similarity ``labels.label``, ``score`` or
``label``. TSV rows with an empty text are skipped and counted (KorNLI has a few).

Inputs are ``[CLS] a [SEP] b [SEP]`` with token type 0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``;
a pair longer than ``max_seq_length`` is cut from the end of the longer side first.

Shape letters: B batch, L padded sequence length.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from data.jsonfile import encoding_fix, json_or_lines
from data.padding import pad_batch

__all__ = ["NLI_LABELS", "PairExample", "load_klue_nli", "load_klue_sts", "SentencePairDataset", "hash_split"]

logger = logging.getLogger(__name__)

NLI_LABELS = ("entailment", "neutral", "contradiction")
T = TypeVar("T")


@dataclass
class PairExample:
    guid: str
    text_a: str
    text_b: str
    label: float          # NLI: class id; STS: similarity


def hash_split(items: Sequence[T], key: Callable[[T], str], eval_fraction: float) -> tuple[list[T], list[T]]:
    """(train, eval): an item is held out when the first 8 bytes of sha256(key), read as a
    big-endian integer over 2**64, are below eval_fraction. It depends only on the key (the
    guid), so the split is the same on every machine, for every seed and for any subset."""
    train, held = [], []
    for item in items:
        h = int.from_bytes(hashlib.sha256(key(item).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
        (held if h < eval_fraction else train).append(item)
    return train, held


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}; {encoding_fix(path)}); expected KLUE JSON or a "
                         f"TSV with a header") from None
    if text[:1] not in ("[", "{", ""):
        return _read_tsv_records(path, text)
    try:
        data = json_or_lines(text)
    except ValueError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e}); expected KLUE JSON") from None
    if isinstance(data, dict):
        data = data.get("data", [data])   # a lone object: JSON lines of one example
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} is not a non-empty JSON list of objects; expected KLUE JSON")
    return data


TSV_LINE = "_line"  # a TSV record's line number


def _read_tsv_records(path: Path, text: str) -> list[dict]:
    """A tab-separated file with a header line -> one record (column -> value) per data row."""
    lines = text.splitlines()
    header = [h.strip() for h in lines[0].split("\t")]
    if len(header) < 2:
        raise ValueError(f"{path} is neither JSON nor a tab-separated file with a header line (its first line "
                         f"{lines[0][:80]!r} has no tab); expected KLUE JSON, or a TSV such as KorNLI's")
    records = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ValueError(f"{path}:{n}: {len(cells)} tab-separated field(s), expected {len(header)} "
                             f"({header}); fix the row or remove it")
        records.append(dict(zip(header, (c.strip() for c in cells)), **{TSV_LINE: n}))
    if not records:
        raise ValueError(f"{path} holds no rows after its header line")
    return records


def _where(i: int, record: dict) -> str:
    return f"line {record[TSV_LINE]}" if TSV_LINE in record else f"example {i} ({record.get('guid', 'no guid')})"


def _field(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if n in record), None)


def _text(path: Path, i: int, record: dict, names: tuple[str, ...]) -> str | None:
    """The text under the first of `names` present; None for an empty one in a TSV row (skipped)."""
    value = _field(record, names)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if TSV_LINE in record and isinstance(value, str):
        return None
    raise ValueError(f"{path}: {_where(i, record)} has no text in {' or '.join(map(repr, names))}; "
                     f"every example needs both sentences")


def _pairs(path: Path, first: tuple[str, ...], second: tuple[str, ...],
           label: Callable[[int, dict], float]) -> list[PairExample]:
    out, skipped = [], 0
    for i, r in enumerate(_read_records(path)):
        a, b = _text(path, i, r, first), _text(path, i, r, second)
        if a is None or b is None:
            skipped += 1
            continue
        out.append(PairExample(str(r.get("guid", r.get("id", i))), a, b, label(i, r)))
    if skipped:
        logger.warning("%s: skipped %d row(s) with an empty sentence", path, skipped)
    if not out:
        raise ValueError(f"{path} holds no sentence pairs")
    return out


def load_klue_nli(path: str | Path) -> list[PairExample]:
    """KLUE NLI JSON (or KorNLI-style TSV) -> examples with label ids in NLI_LABELS order; a label
    that is neither one of them nor its id is an error."""
    path = Path(path)

    def label(i: int, r: dict) -> float:
        value = _field(r, ("gold_label", "label"))
        if TSV_LINE in r and isinstance(value, str) and value.isdigit():     # a TSV's cells are text
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(NLI_LABELS):
            return float(value)
        if value not in NLI_LABELS:
            raise ValueError(f"{path}: {_where(i, r)} has gold_label {value!r}; NLI labels are "
                             f"{list(NLI_LABELS)} or their ids 0-2 (is this an NLI file?)")
        return float(NLI_LABELS.index(value))
    return _pairs(path, ("premise", "sentence1"), ("hypothesis", "sentence2"), label)


def load_klue_sts(path: str | Path) -> list[PairExample]:
    """KLUE STS JSON (or KorSTS-style TSV) -> examples with the similarity (0..5; outside is an error)."""
    path = Path(path)

    def label(i: int, r: dict) -> float:
        labels = r.get("labels")
        value = labels.get("label") if isinstance(labels, dict) else _field(r, ("score", "label"))
        if TSV_LINE in r and isinstance(value, str):    # a TSV's cells are text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 5.0:
            raise ValueError(f"{path}: {_where(i, r)} has labels.label {value!r}; STS similarities are numbers "
                             f"from 0 to 5 (is this an STS file?)")
        return float(value)
    return _pairs(path, ("sentence1", "premise"), ("sentence2", "hypothesis"), label)


class SentencePairDataset(torch.utils.data.Dataset):
    """Tokenized pairs. ``collate`` gives int64 ``input_ids, attention_mask, token_type_ids (B, L)``
    and ``labels (B,)``: int64 class ids, or float32 similarities with ``regression``."""

    def __init__(self, examples: Sequence[PairExample], tokenizer, max_seq_length: int, regression: bool = False):
        if max_seq_length < 5:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a pair; use at least 5")
        self.examples = list(examples)
        self.max_seq_length, self.regression = max_seq_length, regression
        self.pad_id = tokenizer.pad_id
        a = tokenizer.encode_batch([e.text_a for e in self.examples])
        b = tokenizer.encode_batch([e.text_b for e in self.examples])
        room = max_seq_length - 3
        self.num_truncated = 0
        self.rows: list[tuple[list[int], int]] = []
        for x, y in zip(a, b):
            x, y = list(x), list(y)
            if len(x) + len(y) > room:
                self.num_truncated += 1
                while len(x) + len(y) > room:
                    (x if len(x) >= len(y) else y).pop()
            self.rows.append(([tokenizer.cls_id, *x, tokenizer.sep_id, *y, tokenizer.sep_id], len(x) + 2))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ids, first = self.rows[i]
        return {"input_ids": ids, "first": first, "label": self.examples[i].label}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], self.pad_id, self.max_seq_length)
        types = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            types[i, s["first"]:] = 1
        types *= mask
        labels = [s["label"] for s in samples]
        label_tensor = (torch.tensor(labels, dtype=torch.float32) if self.regression
                        else torch.tensor([int(v) for v in labels], dtype=torch.int64))
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": label_tensor}
