""".dat corpus -> tokenized, memory-mapped cache beside it.

`.dat` format: UTF-8 text, one sentence per line, a blank (or whitespace-only) line between
documents. The cache `<corpus>.<hash>.cache/` holds
    tokens.bin        all token ids concatenated (uint16 if V <= 65535, else uint32)
    sent_offsets.bin  int64 (num_sentences + 1,): token offset where each sentence starts
    doc_offsets.bin   int64 (num_documents + 1,): sentence index where each document starts
    manifest.json     inputs, counts, skipped lines by reason, build time (written last)
The hash covers corpus size + mtime_ns, the tokenizer fingerprint and FORMAT_VERSION, so a
changed corpus or tokenizer gets a new cache; old caches are left in place (logged).

Bad input: a missing corpus is FileNotFoundError, a corpus without tokens is ValueError.
Skipped and counted in manifest["skipped"] (one warning per build): lines that are not valid
UTF-8 (`non_utf8`), lines longer than MAX_LINE_BYTES (`too_long_line`), lines that give no
tokens (`no_tokens`). Sentences longer than a sample are handled by data.pretrain.

The build streams: byte ranges of the file go to a process pool (each worker reads, decodes
and tokenizes its range), results are appended to files in order; at most 2 chunks per
worker are in flight, so memory does not grow with the corpus. A file lock makes concurrent
builders (ranks, nodes on a shared file system) build once; the cache is built in a temporary
directory and renamed into place.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.tokenizer import KoTokenizer, decode_lines

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LINE_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20
MANIFEST = "manifest.json"
CACHE_ENV = "CORPUS_CACHE_DIR"  # optional: directory for caches instead of beside the corpus


class CorpusCache:
    """A built cache opened read-only with memory maps."""

    def __init__(self, path: Path, manifest: dict, tokens: np.ndarray, sent_offsets: np.ndarray,
                 doc_offsets: np.ndarray):
        self.path, self.manifest = path, manifest
        self.tokens, self.sent_offsets, self.doc_offsets = tokens, sent_offsets, doc_offsets

    @classmethod
    def open(cls, cache_dir: str | Path) -> "CorpusCache":
        path = Path(cache_dir)
        mf = path / MANIFEST
        if not mf.exists():
            raise FileNotFoundError(f"{path} is not a built corpus cache (no {MANIFEST})")
        manifest = json.loads(mf.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has cache format {manifest.get('format_version')}, expected "
                             f"{FORMAT_VERSION}; delete it and it will be rebuilt")
        c = manifest["counts"]
        arrays = {}
        for name, dtype, n in (("tokens", manifest["dtype"], c["tokens"]),
                               ("sent_offsets", "int64", c["sentences"] + 1),
                               ("doc_offsets", "int64", c["documents"] + 1)):
            f = path / f"{name}.bin"
            expect = n * np.dtype(dtype).itemsize
            if not f.exists() or f.stat().st_size != expect:
                raise ValueError(f"{f} is truncated or missing (expected {expect} bytes); delete {path} to rebuild")
            arrays[name] = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
        return cls(path, manifest, arrays["tokens"], arrays["sent_offsets"], arrays["doc_offsets"])

    @property
    def num_sentences(self) -> int:
        return len(self.sent_offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def __repr__(self) -> str:
        c = self.manifest["counts"]
        return f"CorpusCache({self.path}, documents={c['documents']}, sentences={c['sentences']}, tokens={c['tokens']})"


def _corpus_stat(corpus_path: str | Path) -> tuple[Path, os.stat_result]:
    p = Path(corpus_path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus not found: {p} (expected a .dat text file: one sentence per line, "
                                f"a blank line between documents)")
    return p, p.stat()


def _inputs(corpus_path: str | Path, tokenizer: KoTokenizer) -> dict:
    p, st = _corpus_stat(corpus_path)
    return {"format_version": FORMAT_VERSION,
            "corpus": {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "morpheme": tokenizer.morpheme}}


def _cache_hash(inputs: dict) -> str:
    key = {"v": inputs["format_version"], "size": inputs["corpus"]["size"],
           "mtime_ns": inputs["corpus"]["mtime_ns"], "tok": inputs["tokenizer"]["fingerprint"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


def cache_dir_for(corpus_path: str | Path, tokenizer: KoTokenizer) -> Path:
    """`<corpus>.<hash>.cache` beside the corpus (or under $CORPUS_CACHE_DIR, or under
    ~/.cache/ko_pretrain/corpus when the corpus directory is read-only and holds no cache)."""
    p = Path(corpus_path)
    name = f"{p.name}.{_cache_hash(_inputs(p, tokenizer))}.cache"
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / name
    beside = p.parent / name
    if beside.exists() or _writable(p.parent):
        return beside
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ko_pretrain" / "corpus"
    return root / name


def _chunk_bounds(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about chunk_bytes that start and end at line boundaries."""
    cuts = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            f.seek(pos)
            while True:  # scan in blocks so a huge line is never read at once
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                nl = block.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    break
                pos += len(block)
            if pos >= size:
                break
            cuts.append(pos)
            pos += chunk_bytes
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


_W_TOK: KoTokenizer | None = None


def _worker_init(tokenizer: KoTokenizer) -> None:
    global _W_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _W_TOK = tokenizer


def _tokenize_range(args: tuple[str, int, int, str]) -> dict:
    """Read bytes [start, end) of the corpus and tokenize its lines.

    Returns ids (flat), lengths per sentence, new_doc per sentence (a blank line since the
    previous sentence), trailing_break (blank line after the last sentence) and skip counts.
    """
    path, start, end, dtype = args
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    skipped = collections.Counter()
    if len(data) > MAX_LINE_BYTES:
        parts = data.split(b"\n")
        keep = [ln for ln in parts if len(ln) <= MAX_LINE_BYTES]
        skipped["too_long_line"] = len(parts) - len(keep)
        data = b"\n".join(keep)
    lines, skipped["non_utf8"] = decode_lines(data)
    texts, new_doc, brk = [], [], False
    for ln in lines:
        if ln.strip():
            texts.append(ln)
            new_doc.append(brk)
            brk = False
        else:
            brk = True
    ids = _W_TOK.encode_batch(texts) if texts else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    keep = lengths > 0
    skipped["no_tokens"] = int((~keep).sum())
    new_doc = np.array(new_doc, dtype=bool)
    if not keep.all():  # a dropped sentence passes its document break on to the next one
        carry = False
        for i in range(len(new_doc)):
            carry |= bool(new_doc[i])
            if keep[i]:
                new_doc[i], carry = carry, False
        brk |= carry
        new_doc = new_doc[keep]
        lengths = lengths[keep]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return {"ids": flat, "lengths": lengths, "new_doc": new_doc, "trailing_break": brk,
            "skipped": {k: int(v) for k, v in skipped.items() if v}, "bytes": end - start, "lines": len(lines)}


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_cache(corpus: Path, tokenizer: KoTokenizer, tmp: Path, inputs: dict, num_workers: int,
                 progress: bool) -> dict:
    size = inputs["corpus"]["size"]
    dtype = "uint16" if tokenizer.vocab_size <= 65535 else "uint32"
    ranges = _chunk_bounds(corpus, size, CHUNK_BYTES)
    tasks = ((str(corpus), a, b, dtype) for a, b in ranges)
    t0 = time.perf_counter()
    n_tok = n_sent = n_docs = n_lines = 0
    skipped: collections.Counter = collections.Counter()
    pending_break = True  # the first sentence starts a document
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"caching {corpus.name}", mininterval=1.0)
    with open(tmp / "tokens.bin", "wb") as ftok, open(tmp / "sent_offsets.bin", "wb") as fsent, \
            open(tmp / "doc_offsets.bin", "wb") as fdoc:

        def consume(r: dict) -> None:
            nonlocal n_tok, n_sent, n_docs, n_lines, pending_break
            lengths = r["lengths"]
            if len(lengths):
                new_doc = r["new_doc"].copy()
                new_doc[0] |= pending_break
                starts = n_sent + np.flatnonzero(new_doc)
                starts.astype(np.int64).tofile(fdoc)
                n_docs += len(starts)
                (n_tok + np.cumsum(lengths) - lengths).astype(np.int64).tofile(fsent)
                r["ids"].tofile(ftok)
                n_tok += int(lengths.sum())
                n_sent += len(lengths)
                pending_break = r["trailing_break"]
            else:
                pending_break |= r["trailing_break"]
            skipped.update(r["skipped"])
            n_lines += r["lines"]
            if bar is not None:
                bar.update(r["bytes"])

        old = os.environ.get("TOKENIZERS_PARALLELISM")
        try:
            if num_workers <= 1:
                _worker_init(tokenizer)
                os.environ.pop("TOKENIZERS_PARALLELISM", None)  # one process: let tokenizers use threads
                for t in tasks:
                    consume(_tokenize_range(t))
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                with mp.get_context("fork").Pool(num_workers, _worker_init, (tokenizer,)) as pool:
                    window: collections.deque = collections.deque()
                    for t in tasks:
                        window.append(pool.apply_async(_tokenize_range, (t,)))
                        if len(window) >= 2 * num_workers:
                            consume(window.popleft().get())
                    while window:
                        consume(window.popleft().get())
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
        np.array([n_tok], dtype=np.int64).tofile(fsent)
        np.array([n_sent], dtype=np.int64).tofile(fdoc)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    skipped = {k: int(v) for k, v in sorted(skipped.items())}
    if n_tok == 0:
        raise ValueError(f"corpus {corpus} has no tokens ({n_lines} lines read, skipped: {skipped or 'none'}); "
                         f"expected UTF-8 text, one sentence per line, a blank line between documents")
    if skipped:
        logger.warning("corpus %s: skipped %s (counted in the cache manifest)", corpus, skipped)
    return {**inputs, "dtype": dtype,
            "counts": {"lines": n_lines, "sentences": n_sent, "documents": n_docs, "tokens": n_tok},
            "skipped": skipped,
            "build": {"seconds": round(seconds, 3), "tokens_per_s": round(n_tok / max(seconds, 1e-9)),
                      "num_workers": num_workers, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "host": os.uname().nodename, "pid": os.getpid()}}


def build_cache(corpus_path: str | Path, tokenizer: KoTokenizer, num_workers: int | None = None,
                progress: bool = True) -> Path:
    """Build the cache for (corpus, tokenizer) unless it exists; returns its directory."""
    corpus, _ = _corpus_stat(corpus_path)
    inputs = _inputs(corpus, tokenizer)
    out = cache_dir_for(corpus, tokenizer)
    if (out / MANIFEST).exists():
        return out
    with _file_lock(out.with_name(out.name + ".lock")):
        if (out / MANIFEST).exists():  # another process built it while we waited
            return out
        others = [p.name for p in out.parent.glob(f"{corpus.name}.*.cache") if p != out]
        if others:
            logger.info("corpus or tokenizer changed; building %s (older caches left in place: %s)", out.name, others)
        tmp = out.with_name(f"{out.name}.tmp-{os.uname().nodename}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            workers = num_workers or _default_workers()
            manifest = _write_cache(corpus, tokenizer, tmp, inputs, workers, progress)
            if _inputs(corpus, tokenizer)["corpus"] != inputs["corpus"]:
                raise RuntimeError(f"corpus {corpus} changed while its cache was being built; run again")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
            if out.exists():  # a directory without manifest: an interrupted rename or a manual copy
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s: %s tokens, %s sentences, %s documents in %.1f s (%s tokens/s)", out,
                    manifest["counts"]["tokens"], manifest["counts"]["sentences"],
                    manifest["counts"]["documents"], manifest["build"]["seconds"],
                    manifest["build"]["tokens_per_s"])
    return out


def load_or_build(corpus_path: str | Path, tokenizer: KoTokenizer, *, is_main: bool = True,
                  barrier: Callable[[], None] | None = None, num_workers: int | None = None,
                  progress: bool = True) -> CorpusCache:
    """Open the cache, building it first if needed.

    With a barrier, the main process builds and the others wait in barrier() before opening
    (is_main should be global rank 0 on a shared file system, local rank 0 otherwise). Without
    one, every caller goes through build_cache, whose file lock makes the build happen once.
    """
    _corpus_stat(corpus_path)  # every rank reports a missing corpus itself
    if barrier is None:
        return CorpusCache.open(build_cache(corpus_path, tokenizer, num_workers, progress and is_main))
    if is_main:
        try:
            path = build_cache(corpus_path, tokenizer, num_workers, progress)
        finally:
            barrier()  # release the others even on failure; they then fail to open with a clear error
    else:
        barrier()
        path = cache_dir_for(corpus_path, tokenizer)
    return CorpusCache.open(path)
