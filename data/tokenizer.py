"""WordPiece tokenizer for Korean, optionally morpheme-aware.

Plain mode: NFC (never lowercase or strip accents: that splits Hangul into jamo), split on
whitespace and punctuation, WordPiece with "##" continuations.

Morpheme mode (`morpheme="mecab"|"kiwi"`): each whitespace word (eojeol) is cut at morpheme
boundaries and the non-initial pieces are written with "##" ("영화였다" -> "영화 ##였 ##다"),
then split on whitespace only and fed to WordPiece. The choice lives in `pretokenizer.json`
beside `tokenizer.json` (tokenizers cannot serialise a Python pre-tokenizer) and is applied
whenever the tokenizer is loaded. Offsets always refer to the caller's original text.

Shape letters: V vocabulary size.

CLI: python -m data.tokenizer train --input SPEC [--input SPEC] --vocab_size N --out DIR
     [--morpheme mecab|kiwi] [--sample_lines N]   (SPEC: see data.spec; deterministic output)
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOD]"]
MORPHEME_ANALYZERS = ("mecab", "kiwi")
PRETOKENIZER_FILE = "pretokenizer.json"
_WORD = re.compile(r"\S+")
# morpheme mode's pre-tokenization, part of the corpus cache key (data.corpus): 2 = the analyzer
# reads the text as the normalizer leaves it (NFC, removed characters taken out; 1 read it raw)
MORPHEME_SPLIT_VERSION = 2
_CONT = "##"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 2  # the special tokens plus at least two pieces of text
_TRAIN_HINT = "python -m data.tokenizer train --input CORPUS.dat --vocab_size N --out DIR"


ROLES = ("pad", "unk", "cls", "sep", "mask", "eod")  # the order of SPECIAL_TOKENS
# the names each role goes by when a tokenizer does not name its own (BERT's, then RoBERTa's / XLM-R's)
ROLE_NAMES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>", "<cls>"),
              "sep": ("[SEP]", "</s>", "<sep>"), "mask": ("[MASK]", "<mask>"), "eod": ("[EOD]",)}
REQUIRED_ROLES = ("pad", "cls", "sep", "mask")
# a transformers folder's files that describe its tokenizer (copied with tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", PRETOKENIZER_FILE, "special_tokens_map.json",
                   "tokenizer_config.json")
# files that make a folder a model's (a run's final/ or step-N/, an export, a transformers folder): its tokenizer
# belongs to its weights, and `train --overwrite` does not replace it
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "meta.json")


def special_roles(vocab: dict[str, int], named: dict[str, str]) -> dict[str, int]:
    """role -> id: the token `named` gives a role (a transformers folder's special_tokens_map.json),
    else the first of ROLE_NAMES in the vocabulary. ValueError names a missing required role; no
    unk leaves it out (byte-level BPE has none), no [EOD] gives "eod" the separator's id."""
    roles, missing = {}, []
    for role in ROLES:
        names = ((named[role],) if named.get(role) else ()) + ROLE_NAMES[role]
        found = next((vocab[n] for n in names if n in vocab), None)
        if found is not None:
            roles[role] = found
        elif role in REQUIRED_ROLES:
            missing.append(f"{role} ({' or '.join(names)})")
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token: a BERT-style model needs pad, cls, "
                         f"sep and mask tokens; name them in special_tokens_map.json beside tokenizer.json (e.g. "
                         f"{{\"mask_token\": \"[MASK]\"}}) or train a tokenizer with `{_TRAIN_HINT}`")
    roles.setdefault("eod", roles["sep"])
    return roles


def _named_roles(folder: Path) -> dict[str, str]:
    """role -> token string from a transformers folder's special_tokens_map.json / tokenizer_config.json
    ({"cls_token": "[CLS]"} or {"cls_token": {"content": "[CLS]", ...}}); {} without them."""
    named: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
        try:
            raw = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(raw, dict):
            continue
        for role in ROLES:
            v = raw.get(f"{role}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and v:
                named[role] = v
    return named


def lacks_tokenizer_json(folder: str | Path) -> bool:
    """A transformers folder whose tokenizer is vocab.txt or a sentencepiece model alone (no tokenizer.json)."""
    folder = Path(folder)
    return (folder.is_dir() and not (folder / "tokenizer.json").is_file()
            and any((folder / n).is_file() for n in ("vocab.txt", "sentencepiece.bpe.model", "spiece.model")))


def tokenizer_folder(path: str | Path) -> Path:
    """The tokenizer folder `path` names: itself, or the folder of the tokenizer.json file it points at
    (a run records, exports and compares its tokenizer as that folder: pretokenizer.json, vocab.txt beside)."""
    path = Path(path)
    return path.parent if path.name == "tokenizer.json" and path.is_file() else path


def missing_tokenizer_hint(folder: str | Path) -> str:
    """What to do about a folder without tokenizer.json: train one, or let transformers write it; for a
    file of a tokenizer folder (its vocab.txt, tokenizer.json), pass the folder."""
    path = Path(folder)
    if path.is_file():
        if (path.parent / "tokenizer.json").is_file():
            return (f"--tokenizer takes a folder, not one of its files: pass the folder that holds it: "
                    f"--tokenizer {path.parent}")
        if lacks_tokenizer_json(path.parent):
            return missing_tokenizer_hint(path.parent)
    if lacks_tokenizer_json(folder) and (path / "vocab.txt").is_file() and not any(
            (path / n).is_file() for n in ("tokenizer_config.json", "config.json")):
        # nothing names its class for AutoTokenizer, and BertTokenizerFast's defaults lowercase and strip
        # accents (Hangul becomes jamo: all [UNK])
        return (f"it is a vocab.txt without tokenizer.json: write one into a new folder with `python -c \"from "
                f"transformers import BertTokenizerFast as T; T.from_pretrained('{folder}', do_lower_case=False, "
                f"strip_accents=False).save_pretrained('{folder}.tokenizer')\"` (cased: lowercasing splits Hangul into "
                f"jamo), then pass --tokenizer {folder}.tokenizer")
    if lacks_tokenizer_json(folder):
        return (f"it is a transformers tokenizer without tokenizer.json: write one into a new folder with "
                f"`python -c \"from transformers import AutoTokenizer as T; "
                f"T.from_pretrained('{folder}').save_pretrained('{folder}.tokenizer')\"`, then copy "
                f"{folder}.tokenizer/tokenizer.json into {folder} (train.py also takes --tokenizer {folder}.tokenizer)")
    return f"train one with `{_TRAIN_HINT}`"


class TokenizerError(ValueError):
    """A tokenizer directory cannot be used; the message names the file and the fix."""


def vocab_size_problem(vocab_size: int) -> str | None:
    """Why no tokenizer can have `vocab_size` entries, or None."""
    if vocab_size < MIN_VOCAB_SIZE:
        return (f"vocab_size={vocab_size} is too small: a tokenizer holds the {len(SPECIAL_TOKENS)} special tokens "
                f"{SPECIAL_TOKENS} plus text pieces, so at least {MIN_VOCAB_SIZE} (Korean needs thousands: "
                f"e.g. 32000)")
    if vocab_size > 2**32 - 1:
        return f"vocab_size={vocab_size} does not fit 32-bit token ids (at most {2**32 - 1}); e.g. 32000"
    return None


def decode_lines(data: bytes) -> tuple[list[str], int]:
    """Split UTF-8 bytes into lines; lines that are not valid UTF-8 are dropped and counted."""
    try:
        text = data.decode("utf-8")
        lines = text.split("\n")
        bad = 0
    except UnicodeDecodeError:
        lines, bad = [], 0
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start a line
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines], bad


def iter_file_lines(paths: Iterable[str | Path], chunk_bytes: int = 1 << 22) -> Iterator[list[str]]:
    """Yield batches of decoded lines from text files, skipping non-UTF-8 lines (logged once)."""
    bad = 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                block = f.readlines(chunk_bytes)
                if not block:
                    break
                lines, n_bad = decode_lines(b"".join(block))
                bad += n_bad
                yield lines
    if bad:
        logger.warning("skipped %d lines that are not valid UTF-8", bad)


class MorphemeSplitter:
    """Cuts eojeols at morpheme boundaries. The analyzer is created lazily (not picklable)."""

    def __init__(self, kind: str):
        if kind not in MORPHEME_ANALYZERS:
            raise ValueError(f"unknown morpheme analyzer {kind!r}; choose one of {MORPHEME_ANALYZERS}")
        self.kind = kind
        self._analyzer = None
        self._load()  # fail early with an actionable message if the package is missing

    def __getstate__(self) -> dict:
        return {"kind": self.kind, "_analyzer": None}

    def _load(self):
        if self._analyzer is None:
            if self.kind == "mecab":
                try:
                    import mecab
                except ImportError as e:
                    raise ImportError("--morpheme mecab needs `pip install python-mecab-ko python-mecab-ko-dic`") from e
                self._analyzer = mecab.MeCab()
            else:
                try:
                    import kiwipiepy
                except ImportError as e:
                    raise ImportError("--morpheme kiwi needs `pip install kiwipiepy` (about 700 MB)") from e
                self._analyzer = kiwipiepy.Kiwi()
        return self._analyzer

    def starts(self, text: str) -> list[int]:
        """Character positions where a morpheme starts."""
        a = self._load()
        if self.kind == "mecab":
            lattice = _mecab_lattice(text)
            if lattice is not None and a._tagger.parse(lattice):
                # MeCab.parse's own iteration, without the Morpheme and Feature objects it builds
                # from every node's CSV features (half of its time): the same spans
                return [span[0] for span, _ in lattice]
            return [m.span.start for m in a.parse(text)]
        return [t.start for t in a.tokenize(text)]

    def split(self, text: str, with_map: bool = False) -> tuple[str, list[tuple[int, int]] | None]:
        """Return the pre-tokenized text and, if asked, the span of the original text each of its
        chars comes from. The analyzer reads the text as the tokenizer's normalizer leaves it
        (`_analyzer_text`): in NFC (a decomposed, NFD, text, e.g. from macOS, is jamo it does not
        know as words) and without the characters the normalizer removes (a BOM or zero-width
        joiner before a word made its first morpheme a continuation, "##영화", and one inside a word
        a lone "##" token)."""
        if not text.strip():
            return "", ([] if with_map else None)
        text, spans = _analyzer_text(text)
        starts = sorted(set(self.starts(text)))
        parts: list[str] = []
        src: list[int] | None = [] if with_map else None
        k = 0
        for m in _WORD.finditer(text):
            s, e = m.span()
            while k < len(starts) and starts[k] <= s:
                k += 1
            cuts = []
            while k < len(starts) and starts[k] < e:
                cuts.append(starts[k])
                k += 1
            bounds = [s, *cuts, e]
            for j in range(len(bounds) - 1):
                a, b = bounds[j], bounds[j + 1]
                piece = text[a:b] if j == 0 else _CONT + text[a:b]
                if parts:
                    parts.append(" ")
                    if src is not None:
                        src.append(a)
                parts.append(piece)
                if src is not None:
                    if j:
                        src.extend((a, a))
                    src.extend(range(a, b))
        if src is None:
            return "".join(parts), None
        if spans is None:
            return "".join(parts), [(i, i + 1) for i in src]
        return "".join(parts), [spans[i] for i in src]


_REMOVED: re.Pattern | None = None


def _removed_chars() -> re.Pattern:
    """What BertNormalizer(clean_text=True) drops: NUL, U+FFFD and control, format, surrogate,
    private-use and unassigned characters other than tab and line breaks (built once: ~0.3 s)."""
    global _REMOVED
    if _REMOVED is None:
        drop = [c in "\0\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\t\n\r")
                for c in map(chr, range(0x110000))]
        ranges, start = [], None
        for i, d in enumerate([*drop, False]):
            if d and start is None:
                start = i
            elif not d and start is not None:
                ranges.append(f"\\U{start:08x}-\\U{i - 1:08x}")
                start = None
        _REMOVED = re.compile("[" + "".join(ranges) + "]")
    return _REMOVED


def _analyzer_text(text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """The text as the tokenizer's normalizer leaves it for the words (see split): characters it
    removes taken out, then NFC; with, for each of its characters, the span of `text` it comes from
    (a run of characters that compose or reorder together maps, as a whole, to each character it
    gives). (text, None) where it is that already (nearly every line)."""
    if unicodedata.is_normalized("NFC", text) and (text.isprintable() or not _removed_chars().search(text)):
        return text, None  # (isprintable: no character of category C, nor Z but the space: quick)
    removed = _removed_chars()
    kept = [i for i, c in enumerate(text) if not removed.fullmatch(c)]
    plain = "".join(text[i] for i in kept)
    nfc = unicodedata.normalize
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    i, n = 0, len(plain)
    while i < n:
        j, run = i + 1, nfc("NFC", plain[i])
        while j < n:
            both = nfc("NFC", plain[i:j + 1])
            if both == run + nfc("NFC", plain[j]) and not unicodedata.combining(plain[j]):
                break
            run, j = both, j + 1
        out.append(run)
        if run == plain[i:j]:
            spans.extend((kept[a], kept[a] + 1) for a in range(i, j))
        else:
            spans.extend([(kept[i], kept[j - 1] + 1)] * len(run))
        i = j
    return "".join(out), spans


def _mecab_lattice(text: str):
    """python-mecab-ko's lattice for `text` (what MeCab.parse builds), or None where that version
    of the package does not have the pieces (its MeCab.parse is used then)."""
    try:
        from mecab.utils import create_lattice
    except ImportError:
        return None
    return create_lattice(text)


def _pretokenize_batch(args: tuple[str, list[str]]) -> list[str]:
    kind, lines = args
    global _WORKER_SPLITTER
    if _WORKER_SPLITTER is None or _WORKER_SPLITTER.kind != kind:
        _WORKER_SPLITTER = MorphemeSplitter(kind)
    return [_WORKER_SPLITTER.split(ln)[0] for ln in lines]


_WORKER_SPLITTER: MorphemeSplitter | None = None


BYPASS_AFTER_TEXTS = 20_000  # texts through encode_batch before it builds its NormalizerBypass


def _encode_fast(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    enc = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    return [e.ids for e in enc(texts, add_special_tokens=False)] if texts else []


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (all ids in order (int64), the length of each list (int64))."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())), lengths


class JoinedEncoder:
    """Encodes many texts with one Rust Encoding per group of `GROUP` texts instead of one per text.

    A group is joined by " X " (X a word of the vocabulary that no text of the batch holds, even
    inside a word) and the ids are cut at X's id. The pre-tokenizer (BertPreTokenizer or
    WhitespaceSplit) makes X a word of its own, WordPiece encodes every word on its own and gives X
    its id, and no word of a text can start with X, so each text gets exactly its own ids; what is saved is the tokenizer's fixed cost per text (~8 us: an Encoding and its strings),
    ~25% of encoding short lines. Only for a tokenizer without a normalizer (the bypass's bare copy:
    a normalizer could act across the joint), non-special added tokens, truncation or padding (`of`).
    A group whose cut does not give one part per text is encoded text by text."""

    GROUP = 64

    def __init__(self, tokenizer: Tokenizer, prefix: str = "##"):
        """prefix: WordPiece's continuing-subword prefix (those pieces are never a word)."""
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        # candidates: words of the vocabulary that are one word to the pre-tokenizer (letters and
        # digits, or one character that is not a space) and not a special token or a part of one;
        # longest first (the rarest in text), then by id
        self.candidates = sorted(((i, t) for t, i in vocab.items()
                                  if (t.isalnum() or (len(t) == 1 and not t.isspace()))
                                  and not t.startswith(prefix) and not any(t in s for s in specials)),
                                 key=lambda c: (-len(c[1]), c[0]))
        self._pick = 0  # the candidate used last: kept while the texts do not hold it

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "JoinedEncoder | None":
        spec = json.loads(tokenizer.to_str())
        if (spec.get("normalizer") or spec.get("truncation") or spec.get("padding")
                or (spec.get("model") or {}).get("type") != "WordPiece"
                or (spec.get("pre_tokenizer") or {}).get("type") not in ("BertPreTokenizer", "WhitespaceSplit")
                or any(not t.get("special") for t in spec.get("added_tokens", []))):
            return None
        enc = cls(tokenizer, spec["model"].get("continuing_subword_prefix") or "##")
        return enc if enc.candidates else None

    def _sentinel(self, joined: str) -> tuple[int, str] | None:
        """A candidate `joined` does not hold (None if it holds all of them)."""
        n = len(self.candidates)
        for k in range(n):
            i = (self._pick + k) % n
            if self.candidates[i][1] not in joined:
                self._pick = i
                return self.candidates[i]
        return None

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts in order, the number of ids of each text), both int64."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        found = self._sentinel("\n".join(texts))
        if found is None:
            return _flat(_encode_fast(self.tokenizer, texts))
        sid, sep = found
        sep = f" {sep} "
        groups = [texts[i:i + self.GROUP] for i in range(0, len(texts), self.GROUP)]
        encs = self.tokenizer.encode_batch_fast([sep.join(g) for g in groups], add_special_tokens=False)
        ids_parts, len_parts = [], []
        for g, e in zip(groups, encs):
            ids = np.array(e.ids, dtype=np.int64)
            cuts = np.flatnonzero(ids == sid)
            if len(cuts) != len(g) - 1:  # not one part per text: should not happen; be exact anyway
                flat, lengths = _flat(_encode_fast(self.tokenizer, g))
                ids_parts.append(flat)
                len_parts.append(lengths)
                continue
            bounds = np.concatenate(([-1], cuts, [len(ids)]))
            len_parts.append(np.diff(bounds) - 1)
            keep = np.ones(len(ids), dtype=bool)
            keep[cuts] = False
            ids_parts.append(ids[keep])
        return np.concatenate(ids_parts), np.concatenate(len_parts)


class NormalizerBypass:
    """Encodes the texts a tokenizer's normalizer would not change with a copy that has no normalizer.

    Normalizing costs ~30% of encoding (BertNormalizer + NFC keeps an alignment per character),
    yet leaves nearly every line of a cleaned corpus unchanged. Whether it would is decided at C
    speed: no character outside the set the normalizer maps to itself (computed once from the
    normalizer itself, character by character; Python-unassigned characters are left out) and
    `unicodedata.is_normalized` for each Unicode form in it. Only normalizers of per-character
    maps plus NFC/NFD/NFKC/NFKD qualify (`of` returns None otherwise); ids are the same either way.
    """

    FORMS = ("NFC", "NFD", "NFKC", "NFKD")

    def __init__(self, tokenizer: Tokenizer, forms: list[str]):
        import unicodedata

        self.full = tokenizer
        self.bare = Tokenizer.from_str(tokenizer.to_str())
        self.bare.normalizer = None
        self.bare.encode_special_tokens = tokenizer.encode_special_tokens
        self.forms = forms
        self._joined: JoinedEncoder | None | bool = None  # built on first use
        norm, cat = tokenizer.normalizer.normalize_str, unicodedata.category
        changed, start = [], None  # ranges of characters the normalizer changes (or Python does not know)
        for c in range(0x110000):
            ch = chr(c)
            bad = 0xD800 <= c <= 0xDFFF or cat(ch) == "Cn" or norm(ch) != ch
            if bad and start is None:
                start = c
            elif not bad and start is not None:
                changed.append((start, c - 1))
                start = None
        if start is not None:
            changed.append((start, 0x10FFFF))
        # as one class the Basic Multilingual Plane compiles to a bitmap (constant time per character);
        # text beyond it (emoji, old scripts: rare) is sent to the full tokenizer as a whole range
        def search(ranges):
            bmp = "".join(f"\\u{a:04x}-\\u{min(b, 0xFFFF):04x}" for a, b in ranges if a <= 0xFFFF and b >= a)
            return re.compile(f"[{bmp}\\U00010000-\\U0010ffff]")

        self._changed = search(changed).search
        # the same without the line break, for texts joined by line breaks (`unchanged_mask`)
        self._changed_joined = search([r for a, b in changed for r in ((a, min(b, 9)), (max(a, 11), b))]).finditer
        self._normal = unicodedata.is_normalized

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "NormalizerBypass | None":
        spec = json.loads(tokenizer.to_str()).get("normalizer")
        if not spec:
            return None
        parts = spec["normalizers"] if spec.get("type") == "Sequence" else [spec]
        forms = []
        for p in parts:
            kind = p.get("type")
            if kind in cls.FORMS:
                forms.append(kind)
            elif kind == "Lowercase" or (kind == "BertNormalizer" and not p.get("strip_accents")
                                         and not (p.get("strip_accents") is None and p.get("lowercase"))):
                continue  # a map of each character on its own
            else:
                return None  # Strip, Replace, accents stripping, ...: not decidable per character
        return cls(tokenizer, forms)

    def unchanged(self, text: str) -> bool:
        """Whether the normalizer would leave `text` as it is."""
        return self._changed(text) is None and all(self._normal(f, text) for f in self.forms)

    def unchanged_mask(self, texts: list[str]) -> list[bool]:
        """[unchanged(t) for t in texts], in a few C calls over the texts joined by line breaks (a
        break never changes, composes or reorders with its neighbours: each text is normalized iff
        the joined one is) and a look at the texts holding a character that changes."""
        joined = "\n".join(texts)
        if joined.count("\n") != len(texts) - 1:  # a text holds a line break
            return [self.unchanged(t) for t in texts]
        same = [True] * len(texts)
        ends = None
        for m in self._changed_joined(joined):
            if ends is None:
                ends = np.cumsum([len(t) + 1 for t in texts])
            same[int(np.searchsorted(ends, m.start(), side="right"))] = False
        for f in self.forms:
            if not self._normal(f, joined):
                same = [s and self._normal(f, t) for s, t in zip(same, texts)]
        return same

    def encode_batch_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts in order, the number of ids of each text), both int64: the unchanged
        texts through the bare tokenizer, joined (`JoinedEncoder`) where it allows."""
        same = np.array(self.unchanged_mask(texts), dtype=bool)
        if self._joined is None:
            self._joined = JoinedEncoder.of(self.bare) or False
        plain = [t for t, s in zip(texts, same) if s]
        p_ids, p_len = self._joined.encode_flat(plain) if self._joined else _flat(_encode_fast(self.bare, plain))
        if same.all():
            return p_ids, p_len
        o_ids, o_len = _flat(_encode_fast(self.full, [t for t, s in zip(texts, same) if not s]))
        lengths = np.zeros(len(texts), dtype=np.int64)
        lengths[same], lengths[~same] = p_len, o_len
        # interleave the two id streams back into text order
        src_same = np.repeat(same, lengths)
        ids = np.empty(int(lengths.sum()), dtype=np.int64)
        ids[src_same], ids[~src_same] = p_ids, o_ids
        return ids, lengths

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        same = self.unchanged_mask(texts)
        if all(same):
            return _encode_fast(self.bare, texts)
        plain = iter(_encode_fast(self.bare, [t for t, s in zip(texts, same) if s]))
        other = iter(_encode_fast(self.full, [t for t, s in zip(texts, same) if not s]))
        return [next(plain) if s else next(other) for s in same]


class KoTokenizer:
    """HF `tokenizers` tokenizer plus the optional morpheme pre-tokenizer.

    Ours (trained by `train_tokenizer`): WordPiece with SPECIAL_TOKENS at ids 0-5. Any other
    tokenizer.json (a `transformers` folder's: klue/bert-base's WordPiece with [CLS] at 2, Google's
    with [CLS] at 101, ModernBERT's byte-level BPE, RoBERTa's <s> ... </s>) is *foreign*: the roles
    (pad, unk, cls, sep, mask) are found by name (`special_roles`); with no [EOD], documents end
    with the separator."""

    def __init__(self, tokenizer: Tokenizer, morpheme: str | None = None, named: dict[str, str] | None = None):
        """named: role -> token string a transformers folder names (special_tokens_map.json)."""
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "[MASK]" in raw text is text, not a special id
        # texts encode whole and the same every time: a transformers file may carry truncation (a
        # document cut at 512 tokens), padding or BPE dropout; they are switched off (ours has none)
        if tokenizer.truncation:
            tokenizer.no_truncation()
        if tokenizer.padding:
            tokenizer.no_padding()
        if getattr(tokenizer.model, "dropout", None):
            tokenizer.model.dropout = None
        self.morpheme = morpheme
        self.splitter = MorphemeSplitter(morpheme) if morpheme else None
        vocab = tokenizer.get_vocab()
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        if all(t in special or t in SPECIAL_TOKENS or t.startswith("[unused") for t in vocab):
            # e.g. transformers 5's BertTokenizerFast(vocab_file=...) (a keyword it ignores) saves one
            raise ValueError(f"its vocabulary holds only the special tokens {sorted(vocab, key=vocab.get)[:8]}, no "
                             f"piece of text: every text would be [UNK]. Write it from the vocab.txt with "
                             f"`BertTokenizerFast.from_pretrained(FOLDER_OF_VOCAB_TXT, do_lower_case=False, "
                             f"strip_accents=False)` and save_pretrained, or train one with `{_TRAIN_HINT}`")
        self.foreign: bool = any(vocab.get(tok) != i for i, tok in enumerate(SPECIAL_TOKENS))
        self.roles: dict[str, int] = (special_roles(vocab, named or {}) if self.foreign else
                                      dict(zip(ROLES, range(len(SPECIAL_TOKENS)))))
        # ids beyond get_vocab_size() happen in foreign files (an added token past a gap)
        self.vocab_size: int = max(tokenizer.get_vocab_size(), max(vocab.values(), default=-1) + 1)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.eod_id = (
            self.roles.get(r) for r in ROLES)
        self._id_to_token = [""] * self.vocab_size
        for tok, i in vocab.items():
            self._id_to_token[i] = tok
        text = tokenizer.to_str()
        self._spec = json.loads(text)
        h = hashlib.sha256(text.encode())
        # ours: {"morpheme": ...} alone, as before foreign tokenizers were read (caches keep their names)
        h.update(json.dumps({"morpheme": morpheme, **({"roles": self.roles} if self.foreign else {})}).encode())
        self.fingerprint: str = h.hexdigest()[:16]
        # what decides the ids of a text: the same for a copy whose tokenizer.json differs only in what
        # encode() never applies (an export's [CLS] A [SEP] template, the decoder, another library version)
        ids_spec = {k: v for k, v in self._spec.items() if k not in ("post_processor", "decoder", "version",
                                                                     "truncation", "padding")}
        self.ids_key: str = hashlib.sha256(json.dumps(
            [ids_spec, morpheme, self.roles], sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        self._bypass: NormalizerBypass | None | bool = None  # built once encode_batch has seen enough texts
        self._encoded = 0

    def __reduce__(self):
        # through __init__: a pickled `tokenizers.Tokenizer` forgets encode_special_tokens
        return type(self), (self.tokenizer, self.morpheme, self.named())

    def named(self) -> dict[str, str]:
        """role -> token string (what special_tokens_map.json holds, "<role>_token" keys aside)."""
        return {r: self._id_to_token[i] for r, i in self.roles.items()}

    # --- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "KoTokenizer":
        """A tokenizer directory (or its tokenizer.json). Raises FileNotFoundError when there is
        none and TokenizerError (naming the file and the fix) when it cannot be used."""
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}; {missing_tokenizer_hint(path)}")
        if tj is path and path.suffix != ".json":  # a vocab.txt: its folder was meant
            raise FileNotFoundError(f"{path} is not a tokenizer.json; {missing_tokenizer_hint(path)}")
        again = f"train the tokenizer again with `{_TRAIN_HINT}`"
        try:
            text = tj.read_text(encoding="utf-8")
            raw = json.loads(text)
        except (ValueError, OSError) as e:
            raise TokenizerError(f"{tj} is not valid JSON ({e}); {again}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise TokenizerError(f"{tj} is JSON but not a tokenizer (no \"model\" object: a file of the "
                                 f"`tokenizers` library is expected); {again}")
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception ("expected `,` or `}`" for any mistake)
            raise TokenizerError(f"{tj} is not a tokenizer the `tokenizers` library can read ({e}); "
                                 f"{again}") from None
        morpheme = _read_pretokenizer(tj.parent / PRETOKENIZER_FILE)
        try:
            return cls(tok, morpheme, _named_roles(tj.parent))
        except (ValueError, ImportError) as e:
            raise TokenizerError(f"{tj}: {e}") from None

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer's files into `out_dir`, each whole (a temporary file renamed), and
        tokenizer.json last: a save cut short leaves no tokenizer.json there, never a mix of two
        tokenizers. The tokenizer files of an earlier tokenizer there that this one does not write
        (a transformers folder's special_tokens_map.json, tokenizer_config.json) are removed: they
        would name other roles."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"vocab.txt": "".join(t + "\n" for t in self._id_to_token),
                 PRETOKENIZER_FILE: json.dumps(
                     {"morpheme": self.morpheme, "continuing_subword_prefix": _CONT,
                      "note": "apply before tokenizer.json: cut each eojeol at morpheme boundaries, prefix later "
                              "pieces with ##"}, indent=1)}
        if self.foreign:  # its roles, as a transformers folder names them (eod is ours alone)
            files["special_tokens_map.json"] = json.dumps(
                {f"{r}_token": t for r, t in self.named().items() if r != "eod"}, indent=2, ensure_ascii=False) + "\n"
        files["tokenizer.json"] = self.tokenizer.to_str(pretty=True)
        (out / "tokenizer.json").unlink(missing_ok=True)  # from here until the end: no tokenizer in out
        for name in TOKENIZER_FILES:
            if name not in files:
                (out / name).unlink(missing_ok=True)
        for name, text in files.items():
            tmp = out / f".{name}.tmp-{os.getpid()}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)

    # --- encoding ----------------------------------------------------------------------
    def _pre(self, text: str) -> str:
        return self.splitter.split(text)[0] if self.splitter else text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self._pre(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; the same as encode() of each, faster: texts the normalizer would leave
        as they are (most of a clean corpus) skip it (`NormalizerBypass`)."""
        if self.splitter:
            texts = [self._pre(t) for t in texts]
        if self._bypass is None:
            self._encoded += len(texts)
            if self._encoded >= BYPASS_AFTER_TEXTS:  # worth its ~0.4 s of setup from here on
                self._bypass = NormalizerBypass.of(self.tokenizer) or False
        if self._bypass:
            return self._bypass.encode_batch(texts)
        return _encode_fast(self.tokenizer, texts)

    def encode_batch_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts in order, the number of ids of each text), both int64; what encode_batch
        gives, flat, and faster where the normalizer bypass is set up (texts joined: `JoinedEncoder`)."""
        if self._bypass:
            if self.splitter:
                texts = [self._pre(t) for t in texts]
            return self._bypass.encode_batch_flat(texts)
        return _flat(self.encode_batch(texts))

    def prepare_batch_encoding(self) -> None:
        """Build encode_batch's normalizer bypass now (~0.4 s), e.g. before forking workers that share it."""
        if self._bypass is None:
            self._bypass = NormalizerBypass.of(self.tokenizer) or False

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.splitter:
            e = self.tokenizer.encode(text, add_special_tokens=False)
            return e.ids, [tuple(o) for o in e.offsets]
        pre, spans = self.splitter.split(text, with_map=True)
        e = self.tokenizer.encode(pre, add_special_tokens=False)
        return e.ids, [(spans[a][0], spans[b - 1][1]) if b > a else (spans[a][0],) * 2 for a, b in e.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token[int(i)] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def is_word_start(self) -> np.ndarray:
        """(V,) bool: the token does not continue a word. WordPiece: no continuing-subword prefix ("##");
        SentencePiece-style (Metaspace) and byte-level BPE: the word-start marker ("▁", "Ġ"); a
        tokenizer that marks neither: every token (whole-word masking becomes token masking)."""
        model = self._spec.get("model") or {}
        prefix = model.get("continuing_subword_prefix") or (_CONT if model.get("type") == "WordPiece" else None)
        if prefix:
            return np.array([not t.startswith(prefix) for t in self._id_to_token], dtype=bool)
        marker = _word_start_marker(self._spec.get("pre_tokenizer"))
        if marker:
            return np.array([t.startswith(marker) for t in self._id_to_token], dtype=bool)
        return np.ones(self.vocab_size, dtype=bool)

    def is_special(self) -> np.ndarray:
        """(V,) bool: special tokens (the roles, and the tokenizer's other special tokens) and [unusedK]
        fill-ins, never masked or sampled."""
        special = {i for i in self.roles.values() if i is not None}
        special.update(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)
        return np.array([i in special or t.startswith("[unused") for i, t in enumerate(self._id_to_token)])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"KoTokenizer(vocab_size={self.vocab_size}, morpheme={self.morpheme}, fingerprint={self.fingerprint})"


def _word_start_marker(pre: dict | None) -> str | None:
    """The character a pre-tokenizer puts before each word's first piece: Metaspace's replacement
    ("▁"), ByteLevel's "Ġ" (the byte of a space); None for any other."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        return next(filter(None, map(_word_start_marker, pre.get("pretokenizers", []))), None)
    if pre.get("type") == "Metaspace":
        return pre.get("replacement") or "\u2581"
    if pre.get("type") == "ByteLevel":
        return "\u0120"
    return None


def _read_pretokenizer(pre: Path) -> str | None:
    """The morpheme analyzer recorded beside tokenizer.json (None: plain, also when the file is absent)."""
    if not pre.exists():
        return None
    fix = ("it records the pre-tokenizer the vocabulary was trained with; restore it (the run's final/ "
           "folder holds a copy) or train the tokenizer again")
    try:
        morpheme = json.loads(pre.read_text(encoding="utf-8"))["morpheme"]
    except (ValueError, OSError, KeyError, TypeError) as e:
        problem = "no \"morpheme\" key" if isinstance(e, (KeyError, TypeError)) else str(e)
        raise TokenizerError(f"{pre} is damaged ({problem}); {fix}") from None
    if morpheme is not None and morpheme not in MORPHEME_ANALYZERS:
        raise TokenizerError(f"{pre}: unknown \"morpheme\" {morpheme!r} (expected null or one of "
                             f"{MORPHEME_ANALYZERS}); {fix}")
    return morpheme


def check_vocab_size(tokenizer: KoTokenizer, model_vocab_size: int) -> None:
    """Raise ValueError unless the tokenizer's vocabulary matches the model config."""
    if vocab_size_problem(model_vocab_size):
        raise ValueError(f"the model config's {vocab_size_problem(model_vocab_size)}; set \"vocab_size\": "
                         f"{tokenizer.vocab_size} (the tokenizer's size) in the model config")
    if tokenizer.foreign and tokenizer.vocab_size < model_vocab_size:
        return  # transformers models round their embedding rows up (ModernBERT: 50368); the spare rows stay unused
    if tokenizer.vocab_size != model_vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model config has vocab_size={model_vocab_size}; "
            f"retrain the tokenizer with `python -m data.tokenizer train --vocab_size {model_vocab_size} ...` "
            f"or set vocab_size={tokenizer.vocab_size} in the model config")


def _empty_tokenizer(morpheme: str | None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=_CONT))
    tok.normalizer = normalizers.Sequence([
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False),
        normalizers.NFC()])
    # morpheme mode keeps "##" attached, so split on whitespace only (punctuation is a morpheme already)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if morpheme else pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=_CONT)
    return tok


def _count_lines(shards: list[Path], block: int = 1 << 22) -> int:
    n = 0
    for p in shards:
        with open(p, "rb") as f:
            while chunk := f.read(block):
                n += chunk.count(b"\n")
    return n


def _sampled_line_batches(shards: list[Path], sample_lines: int | None) -> Iterator[list[str]]:
    """Batches of lines of the shards in order; with sample_lines, about that many lines spread evenly
    over the whole corpus (line j kept when floor(j * N / total) steps: the same lines every run)."""
    if not sample_lines:
        yield from iter_file_lines(shards)
        return
    total = _count_lines(shards)
    if sample_lines >= total:
        yield from iter_file_lines(shards)
        return
    j = 0
    for lines in iter_file_lines(shards):
        idx = np.arange(j, j + len(lines), dtype=np.int64)
        keep = (idx + 1) * sample_lines // total != idx * sample_lines // total
        j += len(lines)
        yield [ln for ln, k in zip(lines, keep) if k]


def train_tokenizer(inputs, vocab_size: int, out_dir: str | Path, morpheme: str | None = None,
                    num_threads: int | None = None, sample_lines: int | None = None) -> KoTokenizer:
    """Train WordPiece on a corpus spec (data.spec: files, directories, globs; a list = several) and
    save it to out_dir with exactly vocab_size entries.

    Streaming (lines are read in batches; memory grows with the distinct words, which
    `sample_lines` bounds) and deterministic: the same corpus and arguments give byte-identical
    files. The `tokenizers` trainer numbers the "##c" continuation symbols in hash-map order, which
    differs per process and decides ties between equally frequent merges; so a first, merge-free
    pass finds those symbols and the character counts, and the real pass gets them as fixed
    symbols (listed after the special tokens, sorted) with a fixed alphabet (most frequent
    characters, ties by code point)."""
    from data.spec import resolve

    spec = resolve(inputs if not isinstance(inputs, Path) else str(inputs))
    shards = list(spec.shards)
    if spec.weighted:  # the same spec as a run's --corpus_path, where the weights sample training rows
        logger.warning("the sampling weights in %s do not apply to tokenizer training: it reads every line of "
                       "every shard (or --sample_lines lines spread evenly over them)", spec.text)
    if vocab_size_problem(vocab_size):
        raise ValueError(vocab_size_problem(vocab_size))
    if sample_lines is not None and sample_lines < 1:
        raise ValueError(f"sample_lines must be >= 1, got {sample_lines}")
    if num_threads:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    splitter = MorphemeSplitter(morpheme) if morpheme else None  # early, clear error if missing
    n_lines = 0

    def batches() -> Iterator[list[str]]:
        nonlocal n_lines
        n_lines = 0
        lines_iter = _sampled_line_batches(shards, sample_lines)
        if splitter is None:
            for lines in lines_iter:
                n_lines += sum(1 for ln in lines if ln.strip())
                yield lines
            return
        workers = num_threads or len(os.sched_getaffinity(0))
        if workers <= 1:
            for lines in lines_iter:
                out = [splitter.split(ln)[0] for ln in lines]
                n_lines += sum(1 for ln in out if ln)
                yield out
            return
        with mp.get_context("fork").Pool(workers) as pool:
            for out in pool.imap(_pretokenize_batch, ((morpheme, ls) for ls in lines_iter)):
                n_lines += sum(1 for ln in out if ln)
                yield out

    # pass 1: characters (as the trainer sees them: normalised, no whitespace) and "##c" symbols
    normalizer = _empty_tokenizer(morpheme).normalizer  # not the training tokenizer's: it is locked meanwhile
    chars: collections.Counter = collections.Counter()

    def counted() -> Iterator[list[str]]:
        for lines in batches():
            chars.update(normalizer.normalize_str("\n".join(lines)))
            yield lines

    probe = _empty_tokenizer(morpheme)
    probe.train_from_iterator(counted(), trainer=trainers.WordPieceTrainer(
        vocab_size=1, special_tokens=SPECIAL_TOKENS, continuing_subword_prefix=_CONT, show_progress=False))
    if n_lines == 0:
        raise ValueError(f"no text to train a tokenizer on in {[str(p) for p in shards]}")
    continued = {t[len(_CONT):] for t in probe.get_vocab() if t.startswith(_CONT) and len(t) == len(_CONT) + 1}
    for c in [c for c in chars if c.isspace()]:
        del chars[c]
    # the alphabet plus its "##" forms must leave room for merges (a third each), and must fit in a small
    # vocabulary at all: at most half of what the special tokens leave (vocab_size 8: one character)
    room = vocab_size - len(SPECIAL_TOKENS)
    limit = min(3000, max(100, room // 3), room // 2)
    alphabet = sorted(c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])
    fixed = [_CONT + c for c in alphabet if c in continued]
    # pass 2: the vocabulary
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + fixed,
                                        initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                        continuing_subword_prefix=_CONT, show_progress=False)
    trained = _empty_tokenizer(morpheme)
    trained.train_from_iterator(batches(), trainer=trainer)
    vocab = trained.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"the trainer produced {len(vocab)} tokens, more than vocab_size={vocab_size} "
                         f"(the alphabet alone is large); increase --vocab_size")
    if len(vocab) < vocab_size:
        logger.info("trainer stopped at %d tokens; padding with [unusedK] to %d", len(vocab), vocab_size)
        n = len(vocab)
        vocab.update({f"[unused{k}]": n + k for k in range(vocab_size - n)})
    # a fresh tokenizer: the fixed "##c" symbols are ordinary pieces, only SPECIAL_TOKENS are special
    tok = _empty_tokenizer(morpheme)
    tok.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=_CONT)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ko = KoTokenizer(tok, morpheme)
    ko.save(out_dir)
    return ko


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a WordPiece vocabulary")
    tr.add_argument("--input", action="append", required=True,
                    help="corpus spec: a text/.dat file, a directory (its *.dat), a glob or a comma list; repeatable")
    tr.add_argument("--sample_lines", type=int, default=None,
                    help="train on about N lines spread evenly over the corpus (the same lines every run)")
    tr.add_argument("--vocab_size", type=int, required=True, help="exact size of the saved vocabulary")
    tr.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.txt, pretokenizer.json")
    tr.add_argument("--morpheme", choices=MORPHEME_ANALYZERS, default=None,
                    help="cut words at morpheme boundaries first (default: off)")
    tr.add_argument("--num_threads", type=int, default=None, help="worker threads/processes")
    tr.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    enc = sub.add_parser("encode", help="print the tokens of a sentence")
    enc.add_argument("--tokenizer", required=True)
    enc.add_argument("text")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "train":
        problem = _train_cli_problem(args)
        if problem:
            ap.error(problem)
    try:
        if args.cmd == "train":
            tok = train_tokenizer(args.input, args.vocab_size, args.out, args.morpheme, args.num_threads,
                                  args.sample_lines)
            print(f"saved {tok} to {args.out}")
        else:
            tok = KoTokenizer.load(args.tokenizer)
            print(" ".join(tok.convert_ids_to_tokens(tok.encode(args.text))))
    except (ValueError, OSError, ImportError) as e:  # one line, not a traceback
        shown = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
        ap.exit(1, f"{ap.prog} {args.cmd}: error: {shown}\n")


def _train_cli_problem(args: argparse.Namespace) -> str | None:
    """What makes `train` fail or destroy a tokenizer, found before the (long) training."""
    from data.spec import SpecError, resolve

    try:  # corpus specs: files, directories of *.dat, globs, comma lists
        resolve(args.input)
    except SpecError as e:
        return f"--input: {e}"
    if args.sample_lines is not None and args.sample_lines < 1:
        return f"--sample_lines must be >= 1, got {args.sample_lines}"
    if vocab_size_problem(args.vocab_size):
        return f"--vocab_size: {vocab_size_problem(args.vocab_size)}"
    if args.num_threads is not None and args.num_threads < 1:
        return f"--num_threads must be >= 1, got {args.num_threads}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a directory; pick a new directory"
    present = [name for name in TOKENIZER_FILES if (out / name).exists()]
    model = next((name for name in MODEL_FILES if (out / name).exists()), None)
    if model:  # even with --overwrite: the tokenizer in a model's folder is read as the one its weights know
        return (f"--out {out}: holds a model ({model})"
                + (f" beside its tokenizer ({', '.join(present)}); its embeddings were trained on that tokenizer's "
                   f"ids, so replacing it would leave the model reading wrong ids (--overwrite does not apply to a "
                   f"model's folder)" if present else
                   "; a tokenizer there would be taken for the one its embeddings were trained on")
                + "; pick a new directory for this tokenizer")
    if present and not args.overwrite:
        return (f"--out {out}: already holds {'a tokenizer' if 'tokenizer.json' in present else 'tokenizer files'} "
                f"({', '.join(present)}) that this would replace; pick a new directory or add --overwrite to "
                f"replace {'it' if 'tokenizer.json' in present else 'them'}")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a directory; pick another --out"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write in {existing} (permissions); pick a directory you can write to"
    return None


if __name__ == "__main__":
    main()
