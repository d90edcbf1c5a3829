""".dat shards -> tokenized, memory-mapped caches beside them; a corpus is a view over its shards.

`.dat` format: UTF-8 text, one sentence per line, a blank (or whitespace-only) line between
documents. A corpus is named by a spec (data.spec: a file, a directory of `*.dat`, a glob, or a
comma list of these with optional `:weight`s). Every shard gets its own cache
`<shard>.<hash>.cache/` holding
    tokens.bin        all token ids concatenated (uint16 if V <= 65535, else uint32)
    sent_offsets.bin  int64 (num_sentences + 1,): token offset where each sentence starts
    doc_offsets.bin   int64 (num_documents + 1,): sentence index where each document starts
    manifest.json     inputs, counts, skipped lines by reason, build time (written last)
The hash covers the shard's size + mtime_ns, the tokenizer fingerprint and FORMAT_VERSION (and
in morpheme mode data.tokenizer.MORPHEME_SPLIT_VERSION), so
adding a shard builds only that shard, a changed shard rebuilds alone, and a new tokenizer gets
new caches; old caches are left in place (`python -m data.corpus info` lists them as stale).
`Corpus` memory-maps the shard caches side by side without copying; documents never cross
shards.

Building: the shards are divided among all processes of a job (every rank of every node, each
with its own pool of workers); a shard's file lock keeps two builders apart. A process that has
built its share then builds any shard still missing and unlocked (local disks: each node builds
what it lacks; a dead builder's shard is taken over), and waits for the locked ones by polling
their manifests on the file system, printing a progress line: never inside a collective, so a
build longer than the process-group timeout cannot kill the job.

Bad input: a shard that is missing, not a regular file, empty or binary is refused by data.spec;
a shard without tokens is ValueError; a shard whose tokens are mostly [UNK] (a tokenizer that misses its
text) is warned about, its [UNK] tokens counted in manifest["counts"]["unknown"]. Skipped and counted in
manifest["skipped"] (one warning per build): lines that are not valid UTF-8 (`non_utf8`), lines longer
than MAX_LINE_BYTES (`too_long_line`), lines that give no tokens (`no_tokens`). A damaged cache (manifest, offsets,
token ids) is ValueError naming the cache and the fix: delete that directory to rebuild it.

The build streams: byte ranges of the shard go to a process pool (each worker reads, decodes and
tokenizes its range), results are appended to files in order; at most 2 chunks per worker are
in flight, so memory does not grow with the corpus. The cache is built in a temporary directory
`<cache>.tmp-HOST-PID` and renamed into place; leftovers of dead processes on this host are
removed by the next build.

CLI: python -m data.corpus build --corpus_path SPEC --tokenizer DIR [--num_workers N]
     python -m data.corpus info SPEC [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from data.spec import CACHE_ENTRY_SUFFIX, CorpusSpec, SpecError, resolve, text_file_problem
from data.tokenizer import MORPHEME_SPLIT_VERSION, KoTokenizer, decode_lines, missing_tokenizer_hint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LINE_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20  # the largest piece of a file a worker tokenizes at once
MIN_CHUNK_BYTES = 1 << 16
BYPASS_MIN_BYTES = 4 << 20  # a build of this much text sets up the tokenizer's normalizer bypass (~0.4 s)
MANIFEST = "manifest.json"
UNKNOWN_WARN_FRACTION = 0.2  # a build warns when more of a shard's tokens are [UNK] (a trained vocabulary: a few %)
CACHE_ENV = "CORPUS_CACHE_DIR"  # optional: directory for caches instead of beside the corpus
POLL_SECONDS = 1.0
WAIT_REPORT_SECONDS = 30.0
PROGRESS = "progress"  # in a build's temporary directory: the shard's bytes tokenized so far
PROGRESS_SECONDS = 5.0
_MANIFEST_KEYS = ("format_version", "corpus", "tokenizer", "dtype", "counts", "skipped")


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"corpus cache {path} is damaged ({what}); delete that directory and it will be rebuilt "
                      f"from the corpus on the next run (or with `python -m data.corpus build`)")


class _Descriptors:
    """The open read-only descriptors of this process's FileArrays, at most `limit` at a time: the
    least recently used is closed first and reopened when read again. A corpus of thousands of
    shards holds three arrays per shard, and one descriptor kept per array would pass the open-file
    limit (`ulimit -n`, often 1024) partway through training ("Too many open files"). Keyed per
    FileArray (its id; its __del__ closes the entry before the id can be reused), not per path: a cache
    rebuilt in place is a new file, not the old descriptor's."""

    def __init__(self) -> None:
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.RLock()  # reentrant: a FileArray's __del__ may run (gc) while a read holds it
        self.limit = self.default_limit()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()  # a child starts with it free whatever the parent's threads did

    @staticmethod
    def default_limit() -> int:
        """A quarter of the soft open-file limit (the rest for sockets, DataLoader pipes, logs,
        torch's shared tensors), between 16 and 1024."""
        try:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (OSError, ValueError):
            soft = 1024
        soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
        return max(16, min(1024, soft // 4))

    def pread(self, key: int, path: Path, n: int, offset: int) -> bytes:
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                while len(self._fds) >= self.limit:
                    os.close(self._fds.popitem(last=False)[1])
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        errno.ENOENT, f"{path.parent} was removed (or moved) while this process reads it: a "
                        f"corpus cache or sample index in use. Nothing else is lost; run again (it is rebuilt) "
                        f"and resume with --checkpoint auto", str(path)) from None
                self._fds[key] = fd
            else:
                self._fds.move_to_end(key)
            return _pread_all(fd, n, offset)

    def close(self, key: int) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._fds)


PREAD_CHUNK = 1 << 30  # bytes per read call: Linux returns at most 2 GiB - 4 KiB from one read


def _pread_all(fd: int, n: int, offset: int) -> bytes | bytearray:
    """n bytes of fd from offset (fewer only at the end of the file). One pread returns at most
    2 GiB - 4 KiB, so a whole-array read of a large shard (the sentence offsets of a 30 GB
    single-file corpus) loops, into one buffer."""
    if n <= PREAD_CHUNK:
        first = os.pread(fd, n, offset)
        if len(first) == n or not first:
            return first
    else:
        first = b""
    out = bytearray(n)
    view = memoryview(out)
    got = len(first)
    view[:got] = first
    while got < n:
        k = os.preadv(fd, [view[got:got + min(n - got, PREAD_CHUNK)]], offset + got)
        if k == 0:  # end of file
            return out[:got]
        got += k
    return out


_DESCRIPTORS = _Descriptors()


class FileArray:
    """A read-only 1-D (or (N, width) 2-D) array in a raw .bin file, read with os.pread: indexing
    reads just those bytes into private memory and nothing stays mapped. (An np.memmap maps 64 KiB
    around every page it faults in, and those pages count in the process's RSS for as long as the
    map lives, so random samples over a large corpus grow every rank's RSS with the corpus.) The
    descriptor is opened on use and kept in the process's bounded pool (`_Descriptors`); forked
    DataLoader workers may share it (pread has no file position), a pickled copy opens its own."""

    def __init__(self, path: str | Path, dtype, width: int = 1, length: int | None = None):
        self.path, self.dtype, self.width = Path(path), np.dtype(dtype), width
        n = self.path.stat().st_size // (self.dtype.itemsize * width) if length is None else length
        self.shape = (n, width) if width > 1 else (n,)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        row = self.dtype.itemsize * self.width
        n = max(0, stop - start) * row
        buf = _DESCRIPTORS.pread(id(self), self.path, n, start * row) if n else b""  # keyed by the live object
        if len(buf) != n:
            raise ValueError(f"{self.path} is shorter than expected ({start * row + len(buf)} of "
                             f"{stop * row} bytes); delete its directory and it will be rebuilt")
        a = np.frombuffer(buf, dtype=self.dtype)
        return a.reshape(-1, self.width) if self.width > 1 else a

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][key[1:] if len(key) > 2 else key[1]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._read(start, stop)[::step] if step > 0 else np.asarray(self)[key]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} out of range for {len(self)} rows of {self.path.name}")
            return self._read(i, i + 1)[0]
        return np.asarray(self)[key]  # fancy indexing: reads the whole file

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._read(0, len(self))
        return a.astype(dtype) if dtype is not None else a

    def __del__(self) -> None:  # before the object (and its id) is freed
        pool = globals().get("_DESCRIPTORS")  # None-safe at interpreter exit
        if pool is not None:
            pool.close(id(self))


class CorpusCache:
    """One shard's built cache, opened read-only (FileArray: read with pread, nothing mapped)."""

    def __init__(self, path: Path, manifest: dict, tokens: np.ndarray, sent_offsets: np.ndarray,
                 doc_offsets: np.ndarray):
        self.path, self.manifest = path, manifest
        self.tokens, self.sent_offsets, self.doc_offsets = tokens, sent_offsets, doc_offsets

    @classmethod
    def open(cls, cache_dir: str | Path) -> "CorpusCache":
        path = Path(cache_dir)
        mf = path / MANIFEST
        if not mf.exists():
            raise FileNotFoundError(f"{path} is not a built corpus cache (no {MANIFEST}); build it with "
                                    f"`python -m data.corpus build` or by starting training")
        try:
            manifest = json.loads(mf.read_text())
        except (ValueError, OSError) as e:
            raise _damaged(path, f"{MANIFEST} is unreadable: {e}") from None
        if not isinstance(manifest, dict) or any(k not in manifest for k in _MANIFEST_KEYS):
            missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
            raise _damaged(path, f"{MANIFEST} lacks {missing}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has cache format {manifest.get('format_version')}, expected "
                             f"{FORMAT_VERSION}; delete it and it will be rebuilt")
        try:
            c = manifest["counts"]
            sizes = (("tokens", str(manifest["dtype"]), int(c["tokens"])),
                     ("sent_offsets", "int64", int(c["sentences"]) + 1),
                     ("doc_offsets", "int64", int(c["documents"]) + 1))
            np.dtype(sizes[0][1])
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"{MANIFEST} has bad counts or dtype: {e!r}") from None
        arrays = {}
        for name, dtype, n in sizes:
            f = path / f"{name}.bin"
            expect = n * np.dtype(dtype).itemsize
            if not f.exists() or f.stat().st_size != expect:
                raise _damaged(path, f"{f.name} is truncated or missing: expected {expect} bytes")
            arrays[name] = FileArray(f, dtype, length=n)
        so, do = arrays["sent_offsets"], arrays["doc_offsets"]
        if so[0] != 0 or so[-1] != len(arrays["tokens"]) or do[0] != 0 or do[-1] != len(so) - 1:
            raise _damaged(path, "sentence or document offsets do not span the tokens")
        return cls(path, manifest, arrays["tokens"], so, do)

    @property
    def num_sentences(self) -> int:
        return len(self.sent_offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def read_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(sentence offsets, document offsets) read whole into private memory (FileArray: nothing
        stays mapped), checked to be non-decreasing: done once, when a sample index is built."""
        out = []
        for name, arr in (("sent_offsets", self.sent_offsets), ("doc_offsets", self.doc_offsets)):
            a = np.asarray(arr)
            if len(a) > 1 and (np.diff(a) < 0).any():
                raise _damaged(self.path, f"{name}.bin is not increasing")
            out.append(a)
        return out[0], out[1]

    def __repr__(self) -> str:
        c = self.manifest["counts"]
        return f"CorpusCache({self.path}, documents={c['documents']}, sentences={c['sentences']}, tokens={c['tokens']})"


def _shard_stat(corpus_path: str | Path) -> tuple[Path, os.stat_result]:
    p = Path(corpus_path)
    problem = text_file_problem(p, sniff_bytes=0)
    if problem == "no such file or directory":
        raise FileNotFoundError(f"corpus not found: {p} (expected a .dat text file: one sentence per line, "
                                f"a blank line between documents)")
    if problem and not problem.startswith("is empty"):
        raise ValueError(f"corpus {p} {problem}")
    return p, p.stat()


def _inputs(corpus_path: str | Path, tokenizer: KoTokenizer) -> dict:
    p, st = _shard_stat(corpus_path)
    return {"format_version": FORMAT_VERSION,
            "corpus": {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "morpheme": tokenizer.morpheme,
                          **({"split": MORPHEME_SPLIT_VERSION} if tokenizer.morpheme else {})}}


def _cache_hash(inputs: dict) -> str:
    key = {"v": inputs["format_version"], "size": inputs["corpus"]["size"],
           "mtime_ns": inputs["corpus"]["mtime_ns"], "tok": inputs["tokenizer"]["fingerprint"]}
    if "split" in inputs["tokenizer"]:  # morpheme mode's pre-tokenization changed: new caches (plain ones keep theirs)
        key["split"] = inputs["tokenizer"]["split"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


def cache_home(corpus_dir: Path, name: str) -> Path:
    """Where our file `name` for a corpus in corpus_dir goes: beside it (or under
    $CORPUS_CACHE_DIR/<hash of corpus_dir>/, or under ~/.cache/ko_pretrain/corpus when the
    directory is read-only and holds none yet)."""
    folder = _dir_key(corpus_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / folder / name
    beside = corpus_dir / name
    if beside.exists() or _writable(corpus_dir):
        return beside
    return _fallback_root() / folder / name


def _dir_key(corpus_dir: Path) -> str:
    """The folder of a corpus directory's caches away from it: one per directory, so shards of the same
    name never collide."""
    return hashlib.sha256(str(corpus_dir.resolve()).encode()).hexdigest()[:12]


def _fallback_root() -> Path:
    """Where the caches of read-only corpus directories go (unless $CORPUS_CACHE_DIR is set)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ko_pretrain" / "corpus"


def cache_homes(corpus_dir: Path) -> list[Path]:
    """Every directory where caches of the shards of corpus_dir may be: beside them, under
    $CORPUS_CACHE_DIR and under the fallback for read-only directories (`info` lists them all: a
    cache built while the directory was read-only, or with CORPUS_CACHE_DIR set, is not beside it)."""
    folder = _dir_key(corpus_dir)
    homes = [corpus_dir]
    if os.environ.get(CACHE_ENV):
        homes.append(Path(os.environ[CACHE_ENV]) / folder)
    homes.append(_fallback_root() / folder)
    return homes


def cache_dir_for(corpus_path: str | Path, tokenizer: KoTokenizer) -> Path:
    """`<corpus>.<hash>.cache` (see cache_home for where)."""
    p = Path(corpus_path)
    return cache_home(p.parent, f"{p.name}.{_cache_hash(_inputs(p, tokenizer))}.cache")


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
    flat, lengths = _W_TOK.encode_batch_flat(texts)
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
    return {"ids": flat.astype(dtype), "lengths": lengths, "new_doc": new_doc, "trailing_break": brk,
            "skipped": {k: int(v) for k, v in skipped.items() if v}, "bytes": end - start, "lines": len(lines)}


class _TokenizerPool:
    """The tokenizer processes of one builder, forked once and kept for every shard it builds.

    One worker tokenizes in this process (the `tokenizers` library then uses its own threads)."""

    def __init__(self, tokenizer: KoTokenizer, num_workers: int, total_bytes: int):
        self.tokenizer, self.num_workers, self.total_bytes = tokenizer, num_workers, total_bytes
        self._pool = None
        self._env = os.environ.get("TOKENIZERS_PARALLELISM")

    def start(self) -> None:
        """Fork the workers (once). Called before the builder opens a cache's files: a worker forked
        while they are open would hold them as long as the pool lives (a failed build's removed files
        then keep their disk space, and the error reported no free space)."""
        if self.total_bytes >= BYPASS_MIN_BYTES:
            self.tokenizer.prepare_batch_encoding()  # once here, not in every forked worker
        if self.num_workers > 1 and self._pool is None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no threads in a process that forks
            self._pool = mp.get_context("fork").Pool(self.num_workers, _worker_init, (self.tokenizer,))

    def run(self, tasks: Iterable[tuple], consume: Callable[[dict], None]) -> None:
        """consume(_tokenize_range(task)) for each task, in order; 2 per worker in flight."""
        self.start()
        if self.num_workers <= 1:
            _worker_init(self.tokenizer)
            os.environ.pop("TOKENIZERS_PARALLELISM", None)  # one process: let tokenizers use threads
            for t in tasks:
                consume(_tokenize_range(t))
            return
        window: collections.deque = collections.deque()
        for t in tasks:
            window.append(self._pool.apply_async(_tokenize_range, (t,)))
            if len(window) >= 2 * self.num_workers:
                consume(window.popleft().get())
        while window:
            consume(window.popleft().get())

    def __enter__(self) -> "_TokenizerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and give TOKENIZERS_PARALLELISM back its value."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self._env


def _write_cache(corpus: Path, tokenizer: KoTokenizer, tmp: Path, inputs: dict, num_workers: int,
                 bar=None, pool: _TokenizerPool | None = None) -> dict:
    """Tokenize `corpus` into the files of `tmp`; returns the manifest. `bar`: a tqdm over bytes or None;
    `pool`: the builder's worker processes (else made for this file)."""
    size = inputs["corpus"]["size"]
    dtype = "uint16" if tokenizer.vocab_size <= 65535 else "uint32"
    # small shards in smaller chunks: the workers finish a file together instead of one waiting on the other
    chunk = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, size // (16 * max(1, num_workers))))
    ranges = _chunk_bounds(corpus, size, chunk)
    tasks = ((str(corpus), a, b, dtype) for a, b in ranges)
    t0 = time.perf_counter()
    n_tok = n_sent = n_docs = n_lines = max_id = n_unk = 0
    unk = tokenizer.unk_id  # None: a byte-level BPE has no unknown token
    skipped: collections.Counter = collections.Counter()
    pending_break = True  # the first sentence starts a document
    done = [0, -PROGRESS_SECONDS]  # bytes tokenized, when PROGRESS was last written (first: at once)
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(_TokenizerPool(tokenizer, num_workers, size))
        pool.start()  # forked before the files open: the workers hold none of them
        ftok, fsent, fdoc = (stack.enter_context(open(tmp / f"{n}.bin", "wb"))
                             for n in ("tokens", "sent_offsets", "doc_offsets"))

        def consume(r: dict) -> None:
            nonlocal n_tok, n_sent, n_docs, n_lines, pending_break, max_id, n_unk
            lengths = r["lengths"]
            if len(lengths):
                new_doc = r["new_doc"].copy()
                new_doc[0] |= pending_break
                starts = n_sent + np.flatnonzero(new_doc)
                starts.astype(np.int64).tofile(fdoc)
                n_docs += len(starts)
                (n_tok + np.cumsum(lengths) - lengths).astype(np.int64).tofile(fsent)
                r["ids"].tofile(ftok)
                max_id = max(max_id, int(r["ids"].max()))
                n_unk += 0 if unk is None else int(np.count_nonzero(r["ids"] == unk))
                n_tok += int(lengths.sum())
                n_sent += len(lengths)
                pending_break = r["trailing_break"]
            else:
                pending_break |= r["trailing_break"]
            skipped.update(r["skipped"])
            n_lines += r["lines"]
            if bar is not None:
                bar.update(r["bytes"])
            done[0] += r["bytes"]
            if time.monotonic() - done[1] >= PROGRESS_SECONDS:  # for processes waiting on this shard
                (tmp / PROGRESS).write_text(str(done[0]))
                done[1] = time.monotonic()

        pool.run(tasks, consume)
        (tmp / PROGRESS).write_text(str(done[0]))
        np.array([n_tok], dtype=np.int64).tofile(fsent)
        np.array([n_sent], dtype=np.int64).tofile(fdoc)
    seconds = time.perf_counter() - t0
    skipped = {k: int(v) for k, v in sorted(skipped.items())}
    if n_tok == 0:
        raise ValueError(f"corpus {corpus} has no tokens ({n_lines} lines read, skipped: {skipped or 'none'}); "
                         f"expected UTF-8 text, one sentence per line, a blank line between documents")
    if skipped:
        logger.warning("corpus %s: skipped %s (counted in the cache manifest)", corpus, skipped)
    if n_unk > UNKNOWN_WARN_FRACTION * n_tok:
        logger.warning("corpus %s: %.0f%% of its %d tokens are [UNK]: the tokenizer's vocabulary misses this text "
                       "(a transformers folder that lowercases and strips accents turns Hangul into jamo; another "
                       "language's vocabulary). Check `python -m data.tokenizer encode --tokenizer DIR TEXT` on a "
                       "line of it; use a tokenizer trained on such text (`python -m data.tokenizer train`)",
                       corpus, 100 * n_unk / n_tok, n_tok)
    return {**inputs, "dtype": dtype,
            "counts": {"lines": n_lines, "sentences": n_sent, "documents": n_docs, "tokens": n_tok,
                       "unknown": n_unk},
            "max_token_id": max_id,
            "skipped": skipped,
            "build": {"seconds": round(seconds, 3), "tokens_per_s": round(n_tok / max(seconds, 1e-9)),
                      "num_workers": num_workers, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "host": os.uname().nodename, "pid": os.getpid()}}


def _default_workers(local_world_size: int = 1) -> int:
    """The cores of this node shared among its processes."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True):
    """Yield True holding an exclusive flock on `path`; without blocking, yield False if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (leftovers of dead builders are removable)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CACHE_ENTRY = re.compile(rf"(?P<shard>.+){CACHE_ENTRY_SUFFIX}")


class CacheListing:
    """The cache entries of each cache directory (`<shard>.<hash>.cache`, with their `.tmp-HOST-PID`
    and `.lock`), listed once and grouped by shard name. Looking them up shard by shard with a glob
    lists the whole directory every time: quadratic in the shards of one directory (2,922 shards:
    `data.corpus info` 15 s, most of it in glob; 10,000 shards: minutes)."""

    def __init__(self) -> None:
        self._dirs: dict[Path, dict[str, list[str]]] = {}

    def entries(self, directory: Path, shard_name: str) -> list[str]:
        """Names of `shard_name`'s cache entries in `directory`, sorted, as listed on first use."""
        by_shard = self._dirs.get(directory)
        if by_shard is None:
            by_shard = collections.defaultdict(list)
            try:
                names = sorted(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                names = []
            for name in names:
                m = _CACHE_ENTRY.fullmatch(name)
                if m:
                    by_shard[m["shard"]].append(name)
            self._dirs[directory] = by_shard
        return by_shard.get(shard_name, [])


def _build_tag(name: str) -> tuple[str, str]:
    """(host, pid) of a build's temporary directory `<cache>.tmp-HOST-PID`."""
    host, _, pid = name.rsplit(".tmp-", 1)[1].rpartition("-")
    return host, pid


def remove_stale_tmp(cache_dir: Path, listing: CacheListing | None = None) -> list[Path]:
    """Remove `<cache>.tmp-HOST-PID` directories of this shard (any hash) left by dead processes of
    this host (a killed build). Those of other hosts, or of live processes, are left alone."""
    host = os.uname().nodename
    prefix = cache_dir.name.rsplit(".", 2)[0]  # <shard name>
    removed = []
    for name in (listing or CacheListing()).entries(cache_dir.parent, prefix):
        if ".cache.tmp-" not in name:
            continue
        p = cache_dir.parent / name
        h, pid = _build_tag(name)
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        logger.info("removed %d leftover cache build(s) of dead processes: %s", len(removed),
                    [p.name for p in removed])
    return removed


def _build_locked(corpus: Path, tokenizer: KoTokenizer, out: Path, num_workers: int, bar=None,
                  pool: _TokenizerPool | None = None, listing: CacheListing | None = None) -> dict:
    """Build out (the caller holds its lock and checked that it has no manifest). `listing`: the
    cache directories as listed when the caller started (leftovers of dead builds, older caches)."""
    inputs = _inputs(corpus, tokenizer)
    listing = listing or CacheListing()
    remove_stale_tmp(out, listing)
    others = [n for n in listing.entries(out.parent, corpus.name) if n.endswith(".cache") and n != out.name]
    if others:
        logger.info("corpus or tokenizer changed; building %s (older caches left in place: %s)", out.name, others)
    tmp = out.with_name(f"{out.name}.tmp-{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        manifest = _write_cache(corpus, tokenizer, tmp, inputs, num_workers, bar, pool)
        _test_delay(corpus)
        now = _inputs(corpus, tokenizer)["corpus"]
        if now != inputs["corpus"]:
            raise ValueError(f"corpus {corpus} changed while its cache was being built (size {inputs['corpus']['size']}"
                             f" -> {now['size']} bytes); nothing was kept. Let whatever writes it finish, then run again")
        (tmp / PROGRESS).unlink(missing_ok=True)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if out.exists():  # a directory without manifest: an interrupted rename or a manual copy
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:  # a full disk (numpy's tofile says only "N requested and M written"), no permission
        shutil.rmtree(tmp, ignore_errors=True)
        # ~2 bytes per token and 8 per sentence: about half the shard
        raise CacheWriteError(out.parent, f"the corpus cache of {corpus}", e,
                              f"it needs about half the shard's size, {corpus.stat().st_size / 2**21:.1f} MiB") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built %s: %s tokens, %s sentences, %s documents in %.1f s (%s tokens/s)", out,
                manifest["counts"]["tokens"], manifest["counts"]["sentences"],
                manifest["counts"]["documents"], manifest["build"]["seconds"], manifest["build"]["tokens_per_s"])
    return manifest


class CacheWriteError(ValueError):
    """A cache or sample index could not be written (a full disk, no permission): the message names
    the directory, the free space there and the fix; what was written is removed."""

    def __init__(self, directory: Path, what: str, error: OSError, need: str = ""):
        try:
            room = f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free there"
        except OSError:
            room = "free space unknown"
        size = f"; {need}" if need else ""
        super().__init__(
            f"cannot write {what} in {directory} ({error}; {room}{size}): nothing of it was kept. Free space "
            f"there, or build the caches elsewhere with CORPUS_CACHE_DIR=/a/disk/with/room (every process of the "
            f"job must see it), then run again")


def _test_delay(corpus: Path) -> None:
    """Tests only: CORPUS_TEST_BUILD_DELAY=NAME:SECONDS makes the build of shard NAME last longer
    (to show that a build longer than the process-group timeout does not kill a job)."""
    name, _, seconds = os.environ.get("CORPUS_TEST_BUILD_DELAY", "").partition(":")
    if name and name == corpus.name:
        time.sleep(float(seconds))


def _bytes_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=1.0)


def build_cache(corpus_path: str | Path, tokenizer: KoTokenizer, num_workers: int | None = None,
                progress: bool = True) -> Path:
    """Build the cache of one shard unless it exists (waiting on its lock); returns its directory."""
    corpus, st = _shard_stat(corpus_path)
    out = cache_dir_for(corpus, tokenizer)
    if (out / MANIFEST).exists():
        return out
    with _file_lock(out.with_name(out.name + ".lock")):
        if not (out / MANIFEST).exists():  # else another process built it while we waited
            bar = _bytes_bar(st.st_size, f"caching {corpus.name}", progress)
            try:
                _build_locked(corpus, tokenizer, out, num_workers or _default_workers(), bar)
            finally:
                if bar is not None:
                    bar.close()
    return out


def _bytes_in_progress(outs: Sequence[Path]) -> dict[Path, int]:
    """Per cache, the bytes of its shard another process has tokenized so far (the largest PROGRESS of its
    builds' temporary directories; one listing per directory): a process waiting on a large shard sees
    it move."""
    by_dir: dict[Path, set[str]] = collections.defaultdict(set)
    for o in outs:
        by_dir[o.parent].add(o.name)
    done: dict[Path, int] = collections.defaultdict(int)
    for d, names in by_dir.items():
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for n in entries:
            out = n.rsplit(".tmp-", 1)[0]
            if ".cache.tmp-" in n and out in names:
                with contextlib.suppress(OSError, ValueError):
                    done[d / out] = max(done[d / out], int((d / n / PROGRESS).read_text()))
    return done


def _my_share(sizes: Sequence[int], rank: int, world: int) -> list[int]:
    """Shard indices for `rank`: largest first to the least loaded rank (the same on every rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return [i for i in range(len(sizes)) if owner[i] == rank]


def _note_recopied(shards: Sequence[Path], stats: Sequence[os.stat_result], missing: Sequence[int],
                   tokenizer: KoTokenizer, listing: CacheListing, log: Callable[[str], None]) -> None:
    """Say when shards about to be cached have a cache of the same size and tokenizer but another
    modification time: a copy that did not keep the times (`cp` without -p, `rsync` without -t/-a) makes
    every cache stale, and a corpus of tens of GB is tokenized again while the old caches stay."""
    moved = []
    for i in missing:
        home = cache_dir_for(shards[i], tokenizer).parent
        for name in listing.entries(home, shards[i].name):
            if not name.endswith(".cache"):
                continue
            try:
                m = json.loads((home / name / MANIFEST).read_text())
                if (m["corpus"]["size"] == stats[i].st_size and m["corpus"]["mtime_ns"] != stats[i].st_mtime_ns
                        and m["tokenizer"]["fingerprint"] == tokenizer.fingerprint):
                    moved.append(shards[i])
                    break
            except (OSError, ValueError, KeyError, TypeError):
                continue
    if moved:
        log(f"[corpus] {len(moved)} of the {len(missing)} shard(s) to cache have a cache of the same size and "
            f"tokenizer but another modification time, e.g. {moved[0]} (copied without keeping times: `cp` "
            f"without -p, `rsync` without -t?). A cache is named by size and time, so they are tokenized again; "
            f"if their text is unchanged, stop and copy them again keeping the times (`cp -p`, `rsync -a`) to "
            f"reuse the caches. The old caches stay in place (`python -m data.corpus info` lists them)")


def ensure_caches(shards: Sequence[Path], tokenizer: KoTokenizer, rank: int = 0, world_size: int = 1,
                  num_workers: int | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS) -> list[Path]:
    """Make sure every shard has its cache; returns the cache directories in shard order.

    This process builds its share of the shards first (divided by size over `world_size`), then
    any other shard that is still missing and whose lock is free, and finally waits for the shards
    other processes are building by polling their manifests (no collective: no timeout)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    stats = [_shard_stat(s)[1] for s in shards]
    outs = [cache_dir_for(s, tokenizer) for s in shards]
    missing = [i for i, o in enumerate(outs) if not (o / MANIFEST).exists()]
    if not missing:
        return outs
    listing = CacheListing()
    if rank == 0:
        _note_recopied(shards, stats, missing, tokenizer, listing, log)
    if not os.environ.get(CACHE_ENV) and rank == 0:  # read-only corpus directories: say where their caches go
        away = sorted({str(shards[i].parent) for i in missing if outs[i].parent != shards[i].parent})
        if away:
            log(f"[corpus] {', '.join(away[:3])}{' ...' if len(away) > 3 else ''} not writable: the shard caches go "
                f"under {_fallback_root()} instead. A job on other machines finds them there only with "
                f"{CACHE_ENV}={_fallback_root()} (a directory they all see); else set {CACHE_ENV} to such a "
                f"directory now")
    workers = num_workers or _default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    mine = [missing[k] for k in _my_share([stats[i].st_size for i in missing], rank, world_size)]
    taken = set(mine)
    order = mine + [i for i in missing if i not in taken]
    total = sum(stats[i].st_size for i in missing)
    bar = _bytes_bar(sum(stats[i].st_size for i in mine), f"caching {len(mine)} shard(s)",
                     progress and bool(mine))
    built = 0
    t0 = last_report = time.monotonic()
    pool = _TokenizerPool(tokenizer, workers, total)
    try:
        while True:
            waiting = []
            for i in order:
                out = outs[i]
                if (out / MANIFEST).exists():
                    continue
                with _file_lock(out.with_name(out.name + ".lock"), blocking=False) as got:
                    if got and not (out / MANIFEST).exists():
                        if bar is not None and i not in mine:
                            bar.total += stats[i].st_size
                        _build_locked(shards[i], tokenizer, out, workers, bar, pool, listing)
                        built += 1
                    elif not got:
                        waiting.append(i)
            if not waiting:
                break
            order = waiting
            now = time.monotonic()
            if now - last_report >= WAIT_REPORT_SECONDS or last_report == t0:
                done = _bytes_in_progress([outs[i] for i in waiting])
                left = sum(max(0, stats[i].st_size - done.get(outs[i], 0)) for i in waiting)
                log(f"[corpus] rank {rank}: waiting for {len(waiting)} shard cache(s) being built by other "
                    f"processes ({left / 2**20:.1f} of {total / 2**20:.1f} MiB left, {now - t0:.0f} s), "
                    f"e.g. {shards[waiting[0]]}")
                last_report = now
            time.sleep(poll_seconds)
    finally:
        pool.close()
        if bar is not None:
            bar.close()
    if built:
        logger.info("rank %d built %d of %d missing shard cache(s)", rank, built, len(missing))
    return outs


class Corpus:
    """The shard caches of a corpus spec side by side, memory-mapped, never copied.

    Global token offset t of shard k is token_base[k] + local offset; sentences and documents are
    numbered the same way (sent_base, doc_base). A document never crosses shards."""

    def __init__(self, spec: CorpusSpec, caches: list[CorpusCache]):
        if not caches:
            raise ValueError("a corpus needs at least one shard")
        self.spec, self.caches = spec, caches
        self.part_of_shard = np.array(spec.part_of_shard(), dtype=np.int64)
        cum = lambda xs: np.concatenate([[0], np.cumsum(xs)]).astype(np.int64)
        self.token_base = cum([c.num_tokens for c in caches])
        self.sent_base = cum([c.num_sentences for c in caches])
        self.doc_base = cum([c.num_documents for c in caches])
        fps = {c.manifest["tokenizer"]["fingerprint"] for c in caches}
        if len(fps) > 1:
            raise ValueError(f"the shard caches were built with different tokenizers {sorted(fps)}")
        self.tokenizer_fingerprint = fps.pop()
        self.max_token_id = max(int(c.manifest.get("max_token_id", 0)) for c in caches)

    @classmethod
    def of(cls, cache: "CorpusCache | Corpus") -> "Corpus":
        if isinstance(cache, Corpus):
            return cache
        corpus = Path(cache.manifest["corpus"]["path"])
        from data.spec import Part
        return cls(CorpusSpec(str(corpus), (Part(str(corpus), None, (corpus,)),)), [cache])

    @property
    def num_tokens(self) -> int:
        return int(self.token_base[-1])

    @property
    def num_sentences(self) -> int:
        return int(self.sent_base[-1])

    @property
    def num_documents(self) -> int:
        return int(self.doc_base[-1])

    @property
    def path(self) -> str:
        return self.spec.text

    def span(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) in global offsets, inside one shard; as int64."""
        if end <= start:
            return np.zeros(0, dtype=np.int64)
        k = int(np.searchsorted(self.token_base, start, side="right")) - 1
        base = int(self.token_base[k])
        return np.asarray(self.caches[k].tokens[start - base:end - base], dtype=np.int64)

    def shard_of_token(self, start: int) -> int:
        return int(np.searchsorted(self.token_base, start, side="right")) - 1

    def counts(self) -> dict:
        return {"shards": len(self.caches), "documents": self.num_documents, "sentences": self.num_sentences,
                "tokens": self.num_tokens}

    def __repr__(self) -> str:
        return f"Corpus({self.spec.text!r}, {self.counts()})"


def open_corpus(spec: str | Path | Sequence[str | Path] | CorpusSpec, tokenizer: KoTokenizer, *, rank: int = 0,
                world_size: int = 1, num_workers: int | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS) -> Corpus:
    """Resolve the spec, build the missing shard caches (shared among world_size processes, see
    ensure_caches) and open the corpus view."""
    cs = spec if isinstance(spec, CorpusSpec) else resolve(spec)
    dirs = ensure_caches(cs.shards, tokenizer, rank, world_size, num_workers, progress, log, poll_seconds)
    caches = [CorpusCache.open(d) for d in dirs]
    for c, d in zip(caches, dirs):
        if c.manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            raise _damaged(d, "its manifest names another tokenizer than its hash")
    return Corpus(cs, caches)


def load_or_build(corpus_path: str | Path, tokenizer: KoTokenizer, *, num_workers: int | None = None,
                  progress: bool = True) -> CorpusCache:
    """One shard's cache, built first if needed (concurrent callers build it once)."""
    return CorpusCache.open(build_cache(corpus_path, tokenizer, num_workers, progress))


_INDEX_ENTRY = re.compile(r"(?P<shard>.+)\.[0-9a-f]{12}\.index")


def sample_indexes(shards: Sequence[Path]) -> list[Path]:
    """The sample index directories (data.pretrain: `<first shard>.<hash>.index`) kept beside these shards
    (or where their caches go): every corpus, objective, length, split and weights trained with leaves one,
    and those of tens of GB of text take GBs."""
    names: dict[Path, set[str]] = collections.defaultdict(set)
    for s in shards:
        for home in cache_homes(s.parent):
            names[home].add(s.name)
    out = []
    for home, shard_names in names.items():
        try:
            entries = sorted(os.listdir(home))
        except OSError:
            continue
        out.extend(home / n for n in entries if (m := _INDEX_ENTRY.fullmatch(n)) and m["shard"] in shard_names
                   and (home / n).is_dir())
    return out


def shard_info(shard: Path, tokenizer: KoTokenizer | None = None, listing: CacheListing | None = None) -> dict:
    """A shard's caches: which are current (match its size and mtime; with a tokenizer: that
    tokenizer's) and which are stale (left by an older shard or another tokenizer)."""
    st = shard.stat()
    row: dict = {"shard": str(shard), "bytes": st.st_size, "current": None, "stale": []}
    want = cache_dir_for(shard, tokenizer) if tokenizer is not None else None
    listing = listing or CacheListing()
    entries = [home / n for home in cache_homes(shard.parent) for n in listing.entries(home, shard.name)]
    found = [d for d in entries if d.name.endswith(".cache")]
    if want is None:  # the one training would open first, when several are current
        found.sort(key=lambda d: d.parent != cache_home(shard.parent, d.name).parent)
    row["stale_bytes"], row["building"] = 0, []
    host = os.uname().nodename
    # a build's temporary directory: running, or left by a killed build
    for d in [d for d in entries if ".cache.tmp-" in d.name]:
        h, pid = _build_tag(d.name)
        name = d.name if d.parent == shard.parent else str(d)
        if h == host and pid.isdigit() and pid_alive(int(pid)):
            row["building"].append(f"{name} (process {pid})")
            continue
        why = ("left by a killed build on this host: the next build of this shard here removes it" if h == host else
               f"a build on host {h}: left by a killed build unless one runs there now (delete it then)")
        row["stale"].append(f"{name} ({why})")
        with contextlib.suppress(OSError):
            row["stale_bytes"] += sum(f.stat().st_size for f in d.iterdir())
    for d in found:
        name = d.name if d.parent == shard.parent else str(d)  # elsewhere: the path, to find it
        try:
            m = json.loads((d / MANIFEST).read_text())
            fresh = m["corpus"]["size"] == st.st_size and m["corpus"]["mtime_ns"] == st.st_mtime_ns
            c = m["counts"]
            size = (int(c["tokens"]) * np.dtype(m["dtype"]).itemsize
                    + 8 * (int(c["sentences"]) + int(c["documents"]) + 2))
        except (OSError, ValueError, KeyError, TypeError):
            row["stale"].append(f"{name} (damaged or incomplete)")
            continue
        if fresh and (want is None or d == want) and row["current"] is None:
            row["current"] = {"cache": str(d), **m["counts"], "skipped": m.get("skipped", {}),
                              "tokenizer": m["tokenizer"]["fingerprint"]}
        else:
            why = ("shard changed since" if not fresh else "an older morpheme pre-tokenization"
                   if m["tokenizer"].get("morpheme") and m["tokenizer"].get("split") != MORPHEME_SPLIT_VERSION
                   else "a copy of the current one, not used" if row["current"] and d.name == Path(
                       row["current"]["cache"]).name else "another tokenizer")
            row["stale"].append(f"{name} ({why})")
            row["stale_bytes"] += size
    return row


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or check) the cache of every shard, e.g. in a CPU job before training")
    b.add_argument("--corpus_path", required=True, help="corpus spec: file, directory, glob, comma list, :weights")
    b.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json), the one training uses")
    b.add_argument("--num_workers", type=int, default=0, help="tokenizer processes (0 = every core)")
    b.add_argument("--no_progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="shards, tokens, documents, skipped lines and stale caches of a corpus spec")
    i.add_argument("spec", help="corpus spec: file, directory, glob, comma list, :weights")
    i.add_argument("--tokenizer", default=None, help="report the caches of this tokenizer (default: any current one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build":
            if args.num_workers < 0:
                ap.error(f"--num_workers must be >= 0, got {args.num_workers}")
            tj = Path(args.tokenizer)  # a folder or its tokenizer.json, as KoTokenizer.load takes
            if not ((tj / "tokenizer.json").is_file() or (tj.is_file() and tj.suffix == ".json")):
                ap.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there; "
                         f"{missing_tokenizer_hint(args.tokenizer)}")
            cs = resolve(args.corpus_path)
            tok = KoTokenizer.load(args.tokenizer)
            t0 = time.perf_counter()
            corpus = open_corpus(cs, tok, num_workers=args.num_workers or None, progress=not args.no_progress)
            print(f"{len(cs.shards)} shard cache(s) ready in {time.perf_counter() - t0:.1f} s: {corpus.counts()}")
            return 0
        cs = resolve(args.spec)
        tok = KoTokenizer.load(args.tokenizer) if args.tokenizer else None
        total = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        print(f"{'shard':<50} {'part':>4} {'MiB':>9} {'documents':>10} {'sentences':>11} {'tokens':>12}  cache")
        listing = CacheListing()
        elsewhere: collections.Counter = collections.Counter()
        for shard, part in zip(cs.shards, cs.part_of_shard()):
            row = shard_info(shard, tok, listing)
            cur = row["current"]
            total["bytes"] += row["bytes"]
            if cur:
                for k in ("documents", "sentences", "tokens"):
                    total[k] += cur[k]
                skipped.update(cur["skipped"])
                total["built"] += 1
                if Path(cur["cache"]).parent != shard.parent:
                    elsewhere[str(Path(cur["cache"]).parent.parent)] += 1
            total["stale"] += len(row["stale"])
            total["stale_bytes"] += row["stale_bytes"]
            cells = (f"{cur['documents']:>10,} {cur['sentences']:>11,} {cur['tokens']:>12,}  ok" if cur
                     else f"{'-':>10} {'-':>11} {'-':>12}  missing")
            stale = f"; stale: {', '.join(row['stale'])}" if row["stale"] else ""
            stale += f"; being built: {', '.join(row['building'])}" if row["building"] else ""
            print(f"{str(shard):<50} {part:>4} {row['bytes'] / 2**20:>9.2f} {cells}{stale}")
        weights = ", ".join(f"{p.text}: {p.weight}" for p in cs.parts) if cs.weighted else "none (proportional to size)"
        print(f"\n{len(cs.shards)} shard(s) in {len(cs.parts)} part(s), {total['bytes'] / 2**20:.1f} MiB; weights: "
              f"{weights}\n{total['built']} built: {total['documents']:,} documents, {total['sentences']:,} "
              f"sentences, {total['tokens']:,} tokens; skipped lines: {dict(skipped) or 'none'}")
        for where, n in elsewhere.items():
            print(f"{n} of the caches are not beside their shards but under {where} (a read-only corpus directory, "
                  f"or ${CACHE_ENV}): a job on another machine finds them only with {CACHE_ENV}={where} there (a "
                  f"directory it sees), else it builds them again")
        if total["stale"]:
            print(f"{total['stale']} stale cache(s) or build leftover(s), {total['stale_bytes'] / 2**20:.1f} MiB "
                  f"(named above): training reads only each shard's current cache. One left by a changed shard is "
                  f"never read again; one of another tokenizer is read by runs with that tokenizer. Delete those you "
                  f"do not need with `rm -r <cache>` (a run reading one stops, naming it; others are unaffected)")
        indexes = sample_indexes(cs.shards)
        if indexes:
            size = sum(f.stat().st_size for d in indexes for f in d.iterdir() if f.is_file())
            print(f"{len(indexes)} sample index(es), {size / 2**20:.1f} MiB, kept with the caches: one per corpus, "
                  f"objective, --max_seq_length, split and weights trained with; delete those no run needs with "
                  f"`rm -r` (the next run that needs one builds it again, a few seconds per GB of text): "
                  f"{', '.join(str(d) for d in indexes[:4])}{' ...' if len(indexes) > 4 else ''}")
        return 0
    except (SpecError, ValueError, FileNotFoundError) as e:
        print(f"python -m data.corpus {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(_cli())
    except BrokenPipeError:  # `info SPEC | head`: the reader stopped reading, nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when exiting flushes
        sys.exit(0)
