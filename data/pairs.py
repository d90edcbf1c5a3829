"""Sentence-pair data: KLUE NLI (3 classes) and KLUE STS (similarity 0-5, regression), and the
stable hash split used by the KLUE tasks when no --eval_file is given.

Files (KLUE v1.1 JSON, a list of objects):
* NLI: ``premise``, ``hypothesis``, ``gold_label`` in {entailment, neutral, contradiction}
  (ids 0, 1, 2 in that order, as KLUE);
* STS: ``sentence1``, ``sentence2``, ``labels.label`` a number in [0, 5].
``guid`` names an example (its position when missing). A JSON-lines file (one object per line)
is read the same way.

Inputs are ``[CLS] a [SEP] b [SEP]`` with token type 0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``;
a pair longer than ``max_seq_length`` is cut from the end of the longer side first.

Shape letters: B batch, L padded sequence length.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from data.padding import pad_batch

__all__ = ["NLI_LABELS", "PairExample", "load_klue_nli", "load_klue_sts", "SentencePairDataset", "hash_split"]

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
    text = path.read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e}); expected KLUE JSON") from None
    if isinstance(data, dict):
        data = data.get("data", data)
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} is not a non-empty JSON list of objects; expected KLUE JSON")
    return data


def _text(path: Path, i: int, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: example {i} ({record.get('guid', 'no guid')}) has no text in {name!r}; "
                         f"KLUE files have {name!r} on every example")
    return value.strip()


def load_klue_nli(path: str | Path) -> list[PairExample]:
    """KLUE NLI JSON -> examples with label ids in NLI_LABELS order; any other gold_label is an error."""
    path = Path(path)
    out = []
    for i, r in enumerate(_read_records(path)):
        label = r.get("gold_label")
        if label not in NLI_LABELS:
            raise ValueError(f"{path}: example {i} ({r.get('guid', 'no guid')}) has gold_label {label!r}; "
                             f"KLUE NLI labels are {list(NLI_LABELS)} (is this a KLUE NLI file?)")
        out.append(PairExample(str(r.get("guid", i)), _text(path, i, r, "premise"), _text(path, i, r, "hypothesis"),
                               float(NLI_LABELS.index(label))))
    return out


def load_klue_sts(path: str | Path) -> list[PairExample]:
    """KLUE STS JSON -> examples with the similarity `labels.label` (0..5; outside is an error)."""
    path = Path(path)
    out = []
    for i, r in enumerate(_read_records(path)):
        labels = r.get("labels")
        value = labels.get("label") if isinstance(labels, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 5.0:
            raise ValueError(f"{path}: example {i} ({r.get('guid', 'no guid')}) has labels.label {value!r}; "
                             f"KLUE STS similarities are numbers from 0 to 5 (is this a KLUE STS file?)")
        out.append(PairExample(str(r.get("guid", i)), _text(path, i, r, "sentence1"), _text(path, i, r, "sentence2"),
                               float(value)))
    return out


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
