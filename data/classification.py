"""Sentence classification data (NSMC-style sentiment TSV) and the shared padding helper.

Shape letters: B batch, L padded sequence length (longest in the batch rounded up to a multiple
of 8, never above ``max_seq_length``).

TSV layout (NSMC): a header line naming the columns, tab-separated, no quoting:
``id<TAB>document<TAB>label`` (other columns are ignored; ``id`` is optional, the rows are then named
by their line numbers; the text column may also be named ``text`` or ``sentence``). A ``.csv`` file, or
one whose header is comma-separated names holding the label column, is read as CSV (quoted fields
may hold commas, quotes and line breaks). A file starting with ``[`` or ``{`` is JSON (a list of
objects, ``{"data": [...]}`` or JSON lines; KLUE YNAT's layout: the text under ``document``,
``text``, ``sentence`` or ``title``, the ``label``, the id under ``guid`` or ``id``). Labels are class indices 0..C-1 (NSMC: 0 negative, 1 positive) or
names (``positive``, ``IT과학``, ``-1``): where any label of the files is not a non-negative integer,
every label is a name, numbered in sorted order (integers by value first) by ``number_labels``.
"""
from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from data.jsonfile import encoding_fix, json_or_lines
from data.padding import pad_batch, padded_length  # re-exported: their home is data/padding.py

__all__ = [
    "pad_batch",
    "padded_length",
    "ClassificationExample",
    "load_classification_tsv",
    "split_held_out",
    "label_counts",
    "number_labels",
    "resolve_num_labels",
    "ClassificationDataset",
]

logger = logging.getLogger(__name__)


@dataclass
class ClassificationExample:
    id: str
    text: str
    label: int   # the class index (as read: a label name, str, until number_labels numbers it)


TEXT_COLUMNS = ("document", "text", "sentence")  # the text column's names, the first one present is read


def load_classification_tsv(path: str | Path, text_column: str = "document",
                            label_column: str = "label", id_column: str | None = "id",
                            limit: int | None = None) -> list[ClassificationExample]:
    """Read a TSV with a header (NSMC layout; or CSV, or JSON: the module docstring) into examples;
    ``limit`` reads the first N rows. Without
    an ``id`` column the rows are named by their line numbers; the default text column ``document``
    may also be named ``text`` or ``sentence`` (TEXT_COLUMNS).

    Rows with an empty text are skipped with a logged count (NSMC has a few); a missing column or an empty
    label raises ``ValueError`` naming the file and line. A label that is not a non-negative integer is
    kept as its text (a label name for ``number_labels``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification TSV {path} does not exist; pass the path of a "
                                f"tab-separated file with a header ({id_column}, {text_column}, "
                                f"{label_column}), e.g. ../shared/data/nsmc/sentiment_train.tsv")
    try:
        with open(path, encoding="utf-8-sig") as f:
            start = f.read(1 << 10).lstrip()[:1]
        if start in ("[", "{"):
            return _read_json(path, text_column, label_column, id_column, limit)
        return _read_tsv(path, text_column, label_column, id_column, limit)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); {encoding_fix(path)}") from None
    except csv.Error as e:  # e.g. a line over the csv module's field size limit (a JSON file)
        raise ValueError(f"{path} is not a tab-separated file ({e}); expected the header line "
                         f"'{id_column}\\t{text_column}\\t{label_column}' and one row per line") from None


JSON_TEXT_KEYS = (*TEXT_COLUMNS, "title")  # KLUE YNAT classifies its news headlines ("title")


def _read_json(path: Path, text_column: str, label_column: str, id_column: str | None,
               limit: int | None) -> list[ClassificationExample]:
    """A JSON list of objects (KLUE YNAT's layout; or {"data": [...]}) or JSON lines: the text under the
    first of `text_column` and JSON_TEXT_KEYS present, the label under `label_column`, the id under
    `guid` or `id` (else the position)."""
    try:
        data = json_or_lines(path.read_text(encoding="utf-8-sig").strip())
    except ValueError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e}); expected a TSV with the "
                         f"header line 'id\\tdocument\\tlabel', or JSON objects with a text and a "
                         f"{label_column!r}") from None
    keys = tuple(dict.fromkeys((text_column, *JSON_TEXT_KEYS)))
    if isinstance(data, dict):
        data = data.get("data", [data])
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: JSON, but not a list of objects (got {_shorten(data)}); expected objects with a "
                         f"text ({' or '.join(keys)}) and a {label_column!r}, e.g. KLUE YNAT's")
    examples, num_empty = [], 0
    for i, r in enumerate(data):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}: example {i}" + (f" ({r['guid']})" if "guid" in r else "")
        key = next((k for k in keys if k in r), None)
        if key is None or not isinstance(r[key], str):
            raise ValueError(f"{where} has no text ({' or '.join(keys)}: a string); every example needs one")
        label = r.get(label_column)
        if isinstance(label, int) and not isinstance(label, bool):
            label = label if label >= 0 else str(label)          # a negative number is a name, as in a TSV
        elif isinstance(label, str) and label.strip():
            label = _label(label.strip())
        else:
            raise ValueError(f"{where} has the label {_shorten(label)} in {label_column!r}; labels are class "
                             f"indices 0..C-1 or names")
        if not r[key].strip():
            num_empty += 1
            continue
        ex_id = str(r.get("guid", r.get(id_column or "id", i)))
        examples.append(ClassificationExample(ex_id, r[key].strip(), label))
    if num_empty:
        logger.warning("%s: skipped %d example(s) with an empty text", path, num_empty)
    if not examples:
        raise ValueError(f"{path} holds no labelled examples")
    return examples


def _label(text: str) -> int | str:
    """A label as read: a class index where `text` is a non-negative integer, else a name."""
    return int(text) if text.isascii() and text.isdigit() else text


def _shorten(value: object, limit: int = 120) -> str:
    """repr of value cut to `limit` characters: a wrong file must not be echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _read_tsv(path: Path, text_column: str, label_column: str, id_column: str | None,
              limit: int | None) -> list[ClassificationExample]:
    examples: list[ClassificationExample] = []
    num_empty = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
        f.seek(0)
        # a .csv file, or a header of comma-separated names holding the label column (no tab): comma-separated
        # with CSV quoting (Excel, pandas)
        comma = path.suffix.lower() == ".csv" or ("\t" not in first and label_column in
                                                  [c.strip().strip('"') for c in first.split(",")])
        kind = "comma" if comma else "tab"
        reader = csv.reader(f) if comma else csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next((r for r in reader if any(c.strip() for c in r)), None)   # blank lines before it skipped
        if header is None:
            raise ValueError(f"{path} is empty; expected a header line "
                             f"'{id_column}\\t{text_column}\\t{label_column}' and data rows")
        header = [h.strip() for h in header]   # (utf-8-sig: a leading byte order mark is gone)
        if text_column == TEXT_COLUMNS[0] and text_column not in header:   # the default: its other usual names
            text_column = next((c for c in TEXT_COLUMNS if c in header), text_column)
        layout = ("," if comma else "\\t").join(c for c in (id_column, text_column, label_column) if c is not None)
        if id_column is not None and id_column not in header:
            id_column = None                        # optional: the rows are then named by their line numbers
        needed = [c for c in (id_column, text_column, label_column) if c is not None]
        missing = [c for c in needed if c not in header]
        if missing:
            if len(header) == 1:
                why = "has no tab or comma: not a tab- or comma-separated file (a JSON or text file?)"
            elif header[-1].lstrip("-").isdigit():
                why = "looks like a data row: the file has no header line"
            else:
                why = f"lacks the column(s) {missing}"
            raise ValueError(f"{path}: the first line {_shorten(header)} {why}; the file must be "
                             f"{kind}-separated with the header line '{layout}' (rename the columns in the "
                             f"first line, or insert that line when there is none; the id column is optional, "
                             f"the text column may also be named {' or '.join(TEXT_COLUMNS[1:])})")
        col = {c: header.index(c) for c in needed}
        width = max(col.values()) + 1
        for row in reader:
            line_no = reader.line_num   # a quoted CSV field may span lines
            if limit is not None and len(examples) >= limit:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                raise ValueError(f"{path}:{line_no}: {len(row)} {kind}-separated field(s), expected "
                                 f"{len(header)} ({_shorten(header)}); fix the row or remove it")
            if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
                # a tab (comma) inside a text shifts the columns after it: the label would be a piece of text
                sep = "tab" if kind == "tab" else "comma"
                raise ValueError(f"{path}:{line_no}: {len(row)} {kind}-separated field(s), more than the header's "
                                 f"{len(header)} ({_shorten(header)}): a {sep} inside the text? "
                                 + ("(quoted fields, as pandas' to_csv writes them, are not read in a TSV: save the "
                                    "file as .csv) " if kind == "tab" else "(quote that field) ")
                                 + "fix the row or remove it")
            text = row[col[text_column]].strip()
            if not text:
                num_empty += 1
                continue
            raw = row[col[label_column]].strip()
            if not raw:
                raise ValueError(f"{path}:{line_no}: the label (column {label_column!r}) is empty; give the row "
                                 f"its label or remove it")
            label = _label(raw)
            ex_id = row[col[id_column]].strip() if id_column is not None else str(line_no)
            examples.append(ClassificationExample(ex_id, text, label))
    if num_empty:
        logger.warning("%s: skipped %d row(s) with an empty %r", path, num_empty, text_column)
    if not examples:
        raise ValueError(f"{path} holds no labelled rows after the header")
    return examples


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random `fraction` of the rows (at least one) held out for
    evaluation; both keep the file order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * len(examples)))])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def _name_order(name: str) -> tuple:
    """Sort key of label names: integers ("-1", "0", "10") by value, before the other names."""
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def number_labels(sources: dict[str, Sequence[ClassificationExample]],
                  known: Sequence[str] | None = None) -> list[str] | None:
    """Turn label names into class indices, in place, over every source (name -> examples: the
    training and evaluation files, so both number a name alike). None where every label already is a
    non-negative integer (class indices, unchanged); else the names, index i naming class i: `known`
    (a checkpoint's label names) when it holds every name of the files, else the files' names sorted
    (integers by value first, then the rest alphabetically)."""
    rows = [e for examples in sources.values() for e in examples]
    if all(isinstance(e.label, int) for e in rows):
        return None
    found = {str(e.label) for e in rows}
    names = list(known) if known and found <= set(known) else sorted(found, key=_name_order)
    index = {n: i for i, n in enumerate(names)}
    for e in rows:
        e.label = index[str(e.label)]
    return names


def label_counts(examples: Sequence[ClassificationExample]) -> dict[int, int]:
    """Rows per label, labels ascending."""
    return dict(sorted(Counter(e.label for e in examples).items()))


def resolve_num_labels(sources: dict[str, Sequence[ClassificationExample]], num_labels: int = 0) -> int:
    """The number of classes for the rows of every source (name -> examples, e.g. the training and
    evaluation files, training first). Given (`num_labels` > 0), every label must be below it; else the labels must
    be 0..C-1 without gaps: one stray label (a typo such as 7) would silently make an 8-class head.
    Sources whose labels share none (0/1 in one file, names in the other; a file sorted by label and cut)
    are refused: the accuracy would measure nothing; labels of a later source absent from the first are
    logged (the model is not trained on them)."""
    counts = label_counts([e for rows in sources.values() for e in rows])
    shown = "label counts {" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "}"
    if not counts:
        raise ValueError("no labelled rows")
    _check_shared_labels(sources)
    if num_labels:
        above = [k for k in counts if k >= num_labels]
        if above:
            raise ValueError(f"label {above[-1]} is outside 0..{num_labels - 1} (--num_labels {num_labels}); "
                             f"{shown}; {_where(sources, above[-1])}; fix the rows or raise --num_labels")
        return num_labels
    n = max(counts) + 1
    if n < 2:
        raise ValueError(f"every row has label 0 ({shown}): a classifier needs at least 2 classes; check the "
                         f"label column, or pass --num_labels N when the other classes are absent here")
    absent = [k for k in range(n) if k not in counts]
    if absent:
        rarest = min(counts, key=lambda k: (counts[k], -k))
        raise ValueError(f"the labels are not 0..{n - 1} without gaps: {shown}, no rows with label(s) "
                         f"{absent}; that would train a {n}-class head. {_where(sources, rarest)}: fix "
                         f"stray labels, or pass --num_labels {n} if the classes really are 0..{n - 1}")
    return n


def _check_shared_labels(sources: dict[str, Sequence[ClassificationExample]]) -> None:
    """ValueError where the labels of one source share none with the others'; a warning for labels of a
    later source that the first (the training rows) lacks."""
    filled = {name: label_counts(rows) for name, rows in sources.items() if rows}
    if len(filled) < 2:
        return
    for name, counts in filled.items():
        others = {k for other, c in filled.items() if other != name for k in c}
        if not others & set(counts):
            listed = "; ".join(f"{n}: {dict(c)}" for n, c in filled.items())
            raise ValueError(f"the labels of {name} share none with the other file's (label counts {listed}): "
                             f"the model would be scored on classes it never trained on. Do the files write the "
                             f"labels alike (indices in one, names in the other)? Is one cut from a file sorted by "
                             f"label (--max_train_examples / --max_eval_examples)? Use the same labels in both files")
    first_name, first = next(iter(filled.items()))
    for name, counts in list(filled.items())[1:]:
        unseen = {k: v for k, v in counts.items() if k not in first}
        if unseen:
            logger.warning("label(s) %s of %s (rows %s) are in no row of %s: the model is not trained on them",
                           sorted(unseen), name, unseen, first_name)


def _where(sources: dict[str, Sequence[ClassificationExample]], label: int) -> str:
    """Where the first few rows with `label` are, by source and id."""
    for name, rows in sources.items():
        ids = [e.id for e in rows if e.label == label][:3]
        if ids:
            return f"label {label} is on the row(s) with id {', '.join(map(repr, ids))} of {name}"
    return f"label {label} is in no row"


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
        named = next((e for e in self.examples if not isinstance(e.label, int)), None)
        if named is not None:
            raise ValueError(f"example {named.id!r} has the label name {_shorten(named.label)}; number the "
                             f"label names first (number_labels)")
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
