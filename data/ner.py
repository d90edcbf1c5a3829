"""KLUE NER: character BIO tags <-> WordPiece tokens, windows for long sentences.

File layout (KLUE v1.1 `klue-ner-v1.1_*.tsv`): comment lines start with ``##``; the comment
``## <guid><TAB><annotated sentence>`` names the next sentence; then one line per character,
``<char><TAB><tag>`` (the character may be a space), tags ``O``, ``B-<type>``, ``I-<type>``
(IOB2); a blank line ends a sentence.

Word-level files (CoNLL style) are read too: one word per line, ``<word><TAB><tag>`` (or columns
separated by spaces, the word first and the tag last, ``-DOCSTART-`` lines skipped; Naver NER's
``<index><TAB><word><TAB><tag>`` with ``PER_B``-style tags and ``-`` for O), tags in IOB2, IOB1 or
BIOES, a blank line between sentences. A file is word-level when a tagged line's first column is
not one character (or not two tab-separated columns) and it has no KLUE marks (lines of a space character, ``## guid<TAB>`` comments).
The sentence is its words joined by spaces, each word's characters tagged
``B-t`` then ``I-t`` (IOB2), the space inside an entity ``I-t``.

Alignment: the tokenizer's offsets (`KoTokenizer.encode_with_offsets`, which refer to the
original text with or without the mecab pre-tokenizer) give each token its characters. A token
carries one tag per character, in slots 0..CHAR_SLOTS-1 (the p-th character of a token in slot
min(p, CHAR_SLOTS - 1)), so an entity boundary inside a token (plain WordPiece: "최운정은" can be
one piece) survives the round trip characters -> tokens -> characters exactly; the model's head
predicts CHAR_SLOTS x C logits per token. Whitespace is never tagged or scored (KLUE scores its
"clean" characters); a non-whitespace character no token covers is predicted `O`.
`NERDataset.stats` counts what cannot round-trip (characters beyond the last slot with another
tag than it, uncovered characters).

Shape letters: B batch, L padded window length (<= max_seq_length), C number of tags.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from data.jsonfile import encoding_fix
from data.padding import pad_batch
from models.heads import IGNORE_INDEX

__all__ = ["NERSentence", "load_klue_ner", "label_list", "align", "to_tokens", "to_chars", "clean_tags",
           "NERWindow", "NERDataset", "CHAR_SLOTS"]

CHAR_SLOTS = 32  # tags per token: no token of the KLUE NER data is longer with 2k-32k WordPiece vocabularies
_TAG = re.compile(r"^(O|[BI]-[^\s-][^\s]*)$")


@dataclass
class NERSentence:
    guid: str
    text: str
    tags: list[str]          # one per character of text


def load_klue_ner(path: str | Path) -> list[NERSentence]:
    """Read a KLUE NER TSV; anything else raises ValueError naming the line and the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KLUE NER file {path} does not exist; pass a KLUE NER TSV such as "
                                f"../shared/data/klue/ner_train.tsv")
    layout = ("expected KLUE NER TSV: '## guid<TAB>sentence' comment lines, then one '<character><TAB><BIO tag>' "
              "line per character (tags O, B-TYPE, I-TYPE), a blank line between sentences")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = [raw.rstrip("\r\n") for raw in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}; {encoding_fix(path)}); {layout}") from None
    klue = any(line[:1].isspace() and line[1:2] == "\t" or line.startswith("##") and "\t" in line for line in lines)
    if not klue and any(line.strip() and (len(parts := line.split("\t")) != 2 or len(parts[0]) != 1)
                        for line in lines):
        return _load_words(path, lines)   # no KLUE marks (space characters, '## guid' lines), words on lines
    sentences: list[NERSentence] = []
    chars: list[str] = []
    tags: list[str] = []
    guid: str | None = None

    def close(line_no: int) -> None:
        nonlocal chars, tags, guid
        if chars:
            sentences.append(NERSentence(guid or f"{path.name}:{line_no}", "".join(chars), tags))
        chars, tags, guid = [], [], None

    line_no = 0
    for line_no, line in enumerate(lines, start=1):
        if line.startswith("##"):
            if "\t" in line:           # '## guid<TAB>sentence' names the next sentence (also without a blank line)
                close(line_no)
                guid = line[2:].split("\t", 1)[0].strip() or None
            continue
        if not line.strip():
            close(line_no)
            continue
        parts = line.split("\t")
        if len(parts) != 2 or len(parts[0]) != 1 or not _TAG.match(parts[1]):
            raise ValueError(f"{path}:{line_no}: {line[:60]!r} is not '<one character><TAB><tag>'; {layout}")
        chars.append(parts[0])
        tags.append(parts[1])
    close(line_no + 1 if sentences or chars else 1)
    if not sentences:
        raise ValueError(f"{path} holds no tagged sentences; {layout}")
    return sentences


_WORD_TAG = re.compile(r"^([BIES])-(\S+)$")
_SUFFIX_TAG = re.compile(r"^(\S+)_([BI])$")  # Naver NER: PER_B, PER_I


def _iob2(tags: list[str]) -> list[str] | None:
    """Word tags in IOB2, IOB1, BIOES or Naver's suffix style -> IOB2 (None where a tag is none of them)."""
    out: list[str] = []
    open_type = None  # the type of the entity the previous word is inside (None after O, S-, E-)
    for tag in tags:
        if tag in ("O", "-"):
            out.append("O")
            open_type = None
            continue
        m = _WORD_TAG.match(tag)
        if m is None and (n := _SUFFIX_TAG.match(tag)):
            m = _WORD_TAG.match(f"{n.group(2)}-{n.group(1)}")
        if m is None:
            return None
        kind, typ = m.groups()
        out.append(f"I-{typ}" if kind in "IE" and open_type == typ else f"B-{typ}")
        open_type = typ if kind in "BI" else None
    return out


def _load_words(path: Path, lines: list[str]) -> list[NERSentence]:
    """A word-level (CoNLL-style) file -> character-tagged sentences (see the module docstring)."""
    layout = ("expected KLUE NER TSV (one '<character><TAB><tag>' line per character) or a word-level file: "
              "one '<word><TAB><tag>' line per word (tags O, B-TYPE, I-TYPE; IOB1 and BIOES too), a blank line "
              "between sentences")
    sentences: list[NERSentence] = []
    words: list[str] = []
    tags: list[str] = []
    first = 0

    def close() -> None:
        nonlocal words, tags
        if words:
            iob2 = _iob2(tags)
            text, char_tags = [], []
            for i, (word, tag) in enumerate(zip(words, iob2)):
                if i:
                    text.append(" ")
                    char_tags.append(tag if tag.startswith("I-") else "O")
                inner = "O" if tag == "O" else f"I-{tag[2:]}"
                text.extend(word)
                char_tags.extend([tag] + [inner] * (len(word) - 1))
            sentences.append(NERSentence(f"{path.name}:{first}", "".join(text), char_tags))
        words, tags = [], []

    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("##") or line.split()[0] == "-DOCSTART-":
            close()
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if len(cols) < 2 or not cols[-1]:
            raise ValueError(f"{path}:{line_no}: {line[:60]!r} has no tag after the word; {layout}")
        word = cols[1] if len(cols) >= 3 and cols[0].isdigit() else cols[0]
        if not word:
            raise ValueError(f"{path}:{line_no}: {line[:60]!r} has an empty word; {layout}")
        if _iob2([cols[-1]]) is None:
            raise ValueError(f"{path}:{line_no}: {line[:60]!r}: {cols[-1][:30]!r} is not a NER tag (O, B-TYPE, "
                             f"I-TYPE; S-/E-TYPE, TYPE_B/_I, -); {layout}")
        if not words:
            first = line_no
        words.append(word)
        tags.append(cols[-1])
    close()
    if not sentences:
        raise ValueError(f"{path} holds no tagged sentences; {layout}")
    return sentences


def label_list(sentences: Sequence[NERSentence]) -> list[str]:
    """``O`` then ``B-t, I-t`` for every entity type t found, types sorted: the same files give the
    same ids (KLUE: DT, LC, OG, PS, QT, TI)."""
    types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def align(text: str, offsets: Sequence[tuple[int, int]], slots: int = CHAR_SLOTS) -> list[tuple[int, int, int]]:
    """(character, token, slot) for every non-whitespace character a token covers (the first
    token that covers it), in character order."""
    seen: dict[int, tuple[int, int]] = {}
    for t, (a, b) in enumerate(offsets):
        for p, c in enumerate(range(a, b)):
            if c not in seen and not text[c].isspace():
                seen[c] = (t, min(p, slots - 1))
    return [(c, t, k) for c, (t, k) in sorted(seen.items())]


def to_tokens(tags: Sequence[str], alignment: Sequence[tuple[int, int, int]]) -> dict[tuple[int, int], str]:
    """Character tags -> {(token, slot): tag} (a later character in a shared last slot wins)."""
    return {(t, k): tags[c] for c, t, k in alignment}


def to_chars(token_tags: dict[tuple[int, int], str], alignment: Sequence[tuple[int, int, int]],
             num_chars: int) -> list[str]:
    """{(token, slot): tag} -> one tag per character (`O` where no token slot says otherwise)."""
    out = ["O"] * num_chars
    for c, t, k in alignment:
        out[c] = token_tags.get((t, k), "O")
    return out


def clean_tags(text: str, tags: Sequence[str]) -> list[str]:
    """The tags of the non-whitespace characters (what KLUE scores)."""
    return [t for c, t in zip(text, tags) if not c.isspace()]


@dataclass
class NERWindow:
    sentence: int                 # index into the dataset's sentences
    start: int                    # first token of the sentence in this window
    input_ids: list[int]          # [CLS] tokens [SEP]
    chars: list[int]              # the sentence's characters this window tags, in order
    char_index: list[int]         # per char: window position * CHAR_SLOTS + slot
    char_labels: list[int]        # per char: tag id


class NERDataset(torch.utils.data.Dataset):
    """Sentences tokenized with offsets, cut into windows of at most ``max_seq_length - 2`` tokens
    starting every ``stride`` tokens. ``collate`` gives int64 ``input_ids, attention_mask,
    token_type_ids (B, L)`` and ``char_index, char_labels, char_mask (B, N)`` (N: most tagged
    characters in a window of the batch; char_index = token position * CHAR_SLOTS + slot,
    char_labels IGNORE_INDEX on padding)."""

    def __init__(self, sentences: Sequence[NERSentence], tokenizer, labels: Sequence[str],
                 max_seq_length: int, stride: int, slots: int = CHAR_SLOTS):
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for tokens between [CLS] and [SEP]")
        self.sentences = list(sentences)
        self.labels = list(labels)
        self.label_to_id = {t: i for i, t in enumerate(self.labels)}
        unknown = sorted({t for s in self.sentences for t in s.tags} - set(self.label_to_id))
        if unknown:
            raise ValueError(f"tags {unknown} are not in the label list {self.labels} (the training data's); "
                             f"train on data that has these entity types")
        self.max_seq_length, self.slots = max_seq_length, slots
        self.room = max_seq_length - 2
        self.stride = max(1, min(stride, self.room))
        self.pad_id = tokenizer.pad_id
        self.alignments: list[list[tuple[int, int, int]]] = []
        self.windows: list[NERWindow] = []
        self.windows_of: list[list[int]] = []
        self.num_split = self.num_lossy = self.num_empty = 0
        for si, s in enumerate(self.sentences):
            ids, offsets = tokenizer.encode_with_offsets(s.text)
            al = align(s.text, offsets, slots)
            self.alignments.append(al)
            if clean_tags(s.text, to_chars(to_tokens(s.tags, al), al, len(s.text))) != clean_tags(s.text, s.tags):
                self.num_lossy += 1
            mine: list[int] = []
            self.windows_of.append(mine)
            if not al:
                self.num_empty += 1
                continue
            starts = [0] if len(ids) <= self.room else list(range(0, len(ids) - self.room + self.stride, self.stride))
            self.num_split += len(starts) > 1
            for start in starts:
                inside = [(c, t, k) for c, t, k in al if start <= t < start + self.room]
                if inside:
                    mine.append(len(self.windows))
                    self.windows.append(NERWindow(
                        si, start, [tokenizer.cls_id, *ids[start:start + self.room], tokenizer.sep_id],
                        [c for c, _, _ in inside], [(t - start + 1) * slots + k for _, t, k in inside],
                        [self.label_to_id[s.tags[c]] for c, _, _ in inside]))
                if start + self.room >= len(ids):
                    break

    @property
    def stats(self) -> str:
        return (f"{len(self.sentences)} sentences, {len(self.windows)} windows ({self.num_split} sentences "
                f"windowed), {self.num_lossy} whose tags do not survive tokenization, {self.num_empty} without tokens")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        w = self.windows[i]
        return {"input_ids": w.input_ids, "char_index": w.char_index, "char_labels": w.char_labels}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([s["input_ids"] for s in samples], self.pad_id, self.max_seq_length)
        n = max(len(s["char_index"]) for s in samples)
        index = torch.zeros(len(samples), n, dtype=torch.int64)
        labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.int64)
        for i, s in enumerate(samples):
            index[i, :len(s["char_index"])] = torch.as_tensor(s["char_index"], dtype=torch.int64)
            labels[i, :len(s["char_labels"])] = torch.as_tensor(s["char_labels"], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "char_index": index, "char_labels": labels, "char_mask": (labels != IGNORE_INDEX).long()}

    def sentence_tags(self, window_tags: Sequence[Sequence[int]]) -> list[list[str]]:
        """Per-character predicted tags of every sentence from per-window character predictions
        (``window_tags[k][j]``: tag id of the j-th tagged character of window k); a character is
        read from the window where its token has the most context on both sides (as in MRC)."""
        out = []
        for si, s in enumerate(self.sentences):
            best: dict[int, tuple[int, str]] = {}
            for k in self.windows_of[si]:
                w = self.windows[k]
                n = len(w.input_ids) - 2
                for j, (c, ci) in enumerate(zip(w.chars, w.char_index)):
                    pos = ci // self.slots - 1
                    score = min(pos, n - 1 - pos)
                    if c not in best or score > best[c][0]:
                        best[c] = (score, self.labels[int(window_tags[k][j])])
            tags = ["O"] * len(s.text)
            for c, (_, tag) in best.items():
                tags[c] = tag
            out.append(tags)
        return out
