"""WordPiece tokenizer for Korean, optionally morpheme-aware.

Plain mode: NFC (never lowercase or strip accents: that splits Hangul into jamo), split on
whitespace and punctuation, WordPiece with "##" continuations.

Morpheme mode (`morpheme="mecab"|"kiwi"`): each whitespace word (eojeol) is cut at morpheme
boundaries and the non-initial pieces are written with "##" ("영화였다" -> "영화 ##였 ##다"),
then split on whitespace only and fed to WordPiece. The choice lives in `pretokenizer.json`
beside `tokenizer.json` (tokenizers cannot serialise a Python pre-tokenizer) and is applied
whenever the tokenizer is loaded. Offsets always refer to the caller's original text.

Shape letters: V vocabulary size.

CLI: python -m data.tokenizer train --input X.dat [--input Y.dat] --vocab_size N --out DIR
     [--morpheme mecab|kiwi]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOD]"]
MORPHEME_ANALYZERS = ("mecab", "kiwi")
PRETOKENIZER_FILE = "pretokenizer.json"
_WORD = re.compile(r"\S+")
_CONT = "##"


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
            return [m.span.start for m in a.parse(text)]
        return [t.start for t in a.tokenize(text)]

    def split(self, text: str, with_map: bool = False) -> tuple[str, list[int] | None]:
        """Return the pre-tokenized text and, if asked, the original index of each of its chars."""
        if not text.strip():
            return "", ([] if with_map else None)
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
        return "".join(parts), src


def _pretokenize_batch(args: tuple[str, list[str]]) -> list[str]:
    kind, lines = args
    global _WORKER_SPLITTER
    if _WORKER_SPLITTER is None or _WORKER_SPLITTER.kind != kind:
        _WORKER_SPLITTER = MorphemeSplitter(kind)
    return [_WORKER_SPLITTER.split(ln)[0] for ln in lines]


_WORKER_SPLITTER: MorphemeSplitter | None = None


class KoTokenizer:
    """HF `tokenizers` WordPiece plus the optional morpheme pre-tokenizer."""

    def __init__(self, tokenizer: Tokenizer, morpheme: str | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "[MASK]" in raw text is text, not a special id
        self.morpheme = morpheme
        self.splitter = MorphemeSplitter(morpheme) if morpheme else None
        vocab = tokenizer.get_vocab()
        for i, tok in enumerate(SPECIAL_TOKENS):
            if vocab.get(tok) != i:
                raise ValueError(f"tokenizer must have {tok} at id {i} (special tokens {SPECIAL_TOKENS})")
        self.vocab_size: int = tokenizer.get_vocab_size()
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.eod_id = range(len(SPECIAL_TOKENS))
        self._id_to_token = [""] * self.vocab_size
        for tok, i in vocab.items():
            self._id_to_token[i] = tok
        h = hashlib.sha256(tokenizer.to_str().encode())
        h.update(json.dumps({"morpheme": morpheme}).encode())
        self.fingerprint: str = h.hexdigest()[:16]

    # --- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "KoTokenizer":
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}; train one with `python -m data.tokenizer train`")
        pre = tj.parent / PRETOKENIZER_FILE
        morpheme = json.loads(pre.read_text())["morpheme"] if pre.exists() else None
        return cls(Tokenizer.from_file(str(tj)), morpheme)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        (out / "vocab.txt").write_text("".join(t + "\n" for t in self._id_to_token), encoding="utf-8")
        (out / PRETOKENIZER_FILE).write_text(json.dumps(
            {"morpheme": self.morpheme, "continuing_subword_prefix": _CONT,
             "note": "apply before tokenizer.json: cut each eojeol at morpheme boundaries, prefix later pieces with ##"},
            indent=1))

    # --- encoding ----------------------------------------------------------------------
    def _pre(self, text: str) -> str:
        return self.splitter.split(text)[0] if self.splitter else text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self._pre(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.splitter:
            texts = [self._pre(t) for t in texts]
        enc = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in enc(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.splitter:
            e = self.tokenizer.encode(text, add_special_tokens=False)
            return e.ids, [tuple(o) for o in e.offsets]
        pre, src = self.splitter.split(text, with_map=True)
        e = self.tokenizer.encode(pre, add_special_tokens=False)
        return e.ids, [(src[a], src[b - 1] + 1) if b > a else (src[a], src[a]) for a, b in e.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token[int(i)] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def is_word_start(self) -> np.ndarray:
        """(V,) bool: the token does not continue a word (no "##" prefix)."""
        return np.array([not t.startswith(_CONT) for t in self._id_to_token], dtype=bool)

    def is_special(self) -> np.ndarray:
        """(V,) bool: special tokens and [unusedK] fill-ins, never masked or sampled."""
        return np.array([i < len(SPECIAL_TOKENS) or t.startswith("[unused") for i, t in enumerate(self._id_to_token)])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"KoTokenizer(vocab_size={self.vocab_size}, morpheme={self.morpheme}, fingerprint={self.fingerprint})"


def check_vocab_size(tokenizer: KoTokenizer, model_vocab_size: int) -> None:
    """Raise ValueError unless the tokenizer's vocabulary matches the model config."""
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


def train_tokenizer(inputs: list[str | Path], vocab_size: int, out_dir: str | Path,
                    morpheme: str | None = None, num_threads: int | None = None) -> KoTokenizer:
    """Train WordPiece on `.dat`/text files and save it to out_dir with exactly vocab_size entries."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"tokenizer input not found: {p}")
    if vocab_size < len(SPECIAL_TOKENS) + 2 or vocab_size > 2**32 - 1:
        raise ValueError(f"vocab_size={vocab_size} is out of range")
    if num_threads:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    splitter = MorphemeSplitter(morpheme) if morpheme else None  # early, clear error if missing
    # the initial alphabet plus its "##" forms must leave room for merges
    alphabet = min(3000, max(100, (vocab_size - len(SPECIAL_TOKENS)) // 3))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        limit_alphabet=alphabet, continuing_subword_prefix=_CONT,
                                        show_progress=False)
    tok = _empty_tokenizer(morpheme)
    n_lines = 0

    def batches() -> Iterator[list[str]]:
        nonlocal n_lines
        lines_iter = iter_file_lines(inputs)
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

    tok.train_from_iterator(batches(), trainer=trainer)
    if n_lines == 0:
        raise ValueError(f"no text to train a tokenizer on in {[str(p) for p in inputs]}")
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"the trainer produced {len(vocab)} tokens, more than vocab_size={vocab_size} "
                         f"(the alphabet alone is large); increase --vocab_size")
    if len(vocab) < vocab_size:
        logger.info("trainer stopped at %d tokens; padding with [unusedK] to %d", len(vocab), vocab_size)
        n = len(vocab)
        vocab.update({f"[unused{k}]": n + k for k in range(vocab_size - n)})
        tok.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=_CONT)
    ko = KoTokenizer(tok, morpheme)
    ko.save(out_dir)
    return ko


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a WordPiece vocabulary")
    tr.add_argument("--input", action="append", required=True, help="text/.dat file; repeat for several")
    tr.add_argument("--vocab_size", type=int, required=True, help="exact size of the saved vocabulary")
    tr.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.txt, pretokenizer.json")
    tr.add_argument("--morpheme", choices=MORPHEME_ANALYZERS, default=None,
                    help="cut words at morpheme boundaries first (default: off)")
    tr.add_argument("--num_threads", type=int, default=None, help="worker threads/processes")
    enc = sub.add_parser("encode", help="print the tokens of a sentence")
    enc.add_argument("--tokenizer", required=True)
    enc.add_argument("text")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "train":
        tok = train_tokenizer(args.input, args.vocab_size, args.out, args.morpheme, args.num_threads)
        print(f"saved {tok} to {args.out}")
    else:
        tok = KoTokenizer.load(args.tokenizer)
        print(" ".join(tok.convert_ids_to_tokens(tok.encode(args.text))))


if __name__ == "__main__":
    main()
