"""Sentence classification data (NSMC-style sentiment TSV) and the shared padding helper.

Shape letters: B batch, L padded sequence length (longest in the batch rounded up to a multiple
of 8, never above ``max_seq_length``).

TSV layout (NSMC): a header line naming the columns, tab-separated, no quoting:
``id<TAB>document<TAB>label`` with integer labels (NSMC: 0 negative, 1 positive).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "pad_batch",
    "padded_length",
    "ClassificationExample",
    "load_classification_tsv",
    "ClassificationDataset",
]

PAD_MULTIPLE = 8
logger = logging.getLogger(__name__)


def padded_length(longest: int, max_seq_length: int, multiple: int = PAD_MULTIPLE) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, capped at ``max_seq_length``."""
    rounded = -(-max(longest, 1) // multiple) * multiple
    return min(rounded, max_seq_length)


def pad_batch(seqs: Sequence[Sequence[int]], pad_value: int, max_seq_length: int,
              multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-pad integer sequences into a (B, L) int64 tensor.

    Returns ``(ids, attention_mask, num_truncated)``; sequences longer than ``max_seq_length``
    are cut there (their last token is kept as the final position, so a closing ``[SEP]``
    survives) and counted in ``num_truncated`` rather than raising.
    """
    if not seqs:
        raise ValueError("pad_batch got an empty batch")
    length = padded_length(max(len(s) for s in seqs), max_seq_length, multiple)
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.int64)
    mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    num_truncated = 0
    for i, s in enumerate(seqs):
        s = list(s)
        if len(s) > length:
            num_truncated += 1
            s = s[: length - 1] + s[-1:]
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
        mask[i, : len(s)] = 1
    return ids, mask, num_truncated


@dataclass
class ClassificationExample:
    id: str
    text: str
    label: int


def load_classification_tsv(path: str | Path, text_column: str = "document",
                            label_column: str = "label", id_column: str | None = "id",
                            limit: int | None = None) -> list[ClassificationExample]:
    """Read a TSV with a header (NSMC layout) into examples; ``limit`` reads the first N rows.

    Rows with an empty text are skipped with a logged count (NSMC has a few); a missing column or a non-integer
    label raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification TSV {path} does not exist; pass the path of a "
                                f"tab-separated file with a header ({id_column}, {text_column}, "
                                f"{label_column}), e.g. ../shared/data/nsmc/sentiment_train.tsv")
    examples: list[ClassificationExample] = []
    num_empty = 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header line "
                             f"'{id_column}\\t{text_column}\\t{label_column}' and data rows")
        header = [h.strip().lstrip("\ufeff") for h in header]
        needed = [c for c in (id_column, text_column, label_column) if c is not None]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}; the file must be "
                             f"tab-separated with a header naming {needed} (or pass "
                             f"text_column=/label_column=/id_column= to match its header)")
        col = {c: header.index(c) for c in needed}
        width = max(col.values()) + 1
        for line_no, row in enumerate(reader, start=2):
            if limit is not None and len(examples) >= limit:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                raise ValueError(f"{path}:{line_no}: {len(row)} tab-separated field(s), expected "
                                 f"{len(header)} ({header}); fix the row or remove it")
            text = row[col[text_column]].strip()
            if not text:
                num_empty += 1
                continue
            raw = row[col[label_column]].strip()
            try:
                label = int(raw)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: label {raw!r} in column {label_column!r} is "
                                 f"not an integer; labels must be class indices 0..C-1") from None
            if label < 0:
                raise ValueError(f"{path}:{line_no}: label {label} is negative; labels must be "
                                 f"class indices 0..C-1")
            ex_id = row[col[id_column]].strip() if id_column is not None else str(line_no)
            examples.append(ClassificationExample(ex_id, text, label))
    if num_empty:
        logger.warning("%s: skipped %d row(s) with an empty %r", path, num_empty, text_column)
    if not examples:
        raise ValueError(f"{path} holds no labelled rows after the header")
    return examples


class ClassificationDataset(torch.utils.data.Dataset):
    """Tokenized ``[CLS] text [SEP]`` samples; texts longer than ``max_seq_length`` are cut
    (counted in ``num_truncated``). ``collate`` gives int64 ``input_ids, attention_mask,
    token_type_ids (B, L)`` and ``labels (B,)``."""

    def __init__(self, examples: Sequence[ClassificationExample], tokenizer,
                 max_seq_length: int = 128, num_labels: int | None = None):
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text "
                             "between [CLS] and [SEP]; use at least 3")
        self.examples = list(examples)
        self.max_seq_length = max_seq_length
        self.pad_id = tokenizer.pad_id
        self.num_labels = num_labels if num_labels is not None else (
            max((e.label for e in self.examples), default=0) + 1)
        bad = [e for e in self.examples if not 0 <= e.label < self.num_labels]
        if bad:
            raise ValueError(f"label {bad[0].label} of example {bad[0].id!r} is outside "
                             f"0..{self.num_labels - 1}; set num_labels to cover every class")
        encode_batch = getattr(tokenizer, "encode_batch", None)
        texts = [e.text for e in self.examples]
        encoded = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
        room = max_seq_length - 2
        self.num_truncated = sum(len(ids) > room for ids in encoded)
        self.input_ids = [[tokenizer.cls_id, *ids[:room], tokenizer.sep_id] for ids in encoded]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "label": self.examples[i].label}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], self.pad_id, self.max_seq_length)
        return {"input_ids": ids, "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64)}
