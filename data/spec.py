"""Corpus specs: which `.dat` shards a `--corpus_path`, `--eval_corpus` or tokenizer `--input` names.

A spec is one part or several separated by commas; each part is
    a file                     `corpus.dat` (any name: `split -l` shards have none)
    a directory                `shards/`: every `*.dat` file under it, recursively, sorted by path
    a glob                     `traindata/*`, `wiki/**/*.dat` (`**` recurses): the files it matches, sorted
and may end in `:WEIGHT` (Megatron-style blending, `wiki/:0.7,news/*.dat:0.3`): the part's share of
the samples. Without weights every shard contributes its own samples (proportional to size).
Either every part has a weight or none does. A part naming an existing file or directory is that path,
whatever `,`, `:NUMBER` or glob characters (`wiki[ko].dat`) its name holds. Our own files beside the
shards (caches, their locks, trained tokenizers, sample indexes) are never taken as shards.

This is the one place where specs are resolved: the launchers, `python -m data.tokenizer train`,
`python -m data.corpus build|info` and the benchmarks all call `resolve`. Bad specs raise
SpecError (a ValueError) naming the offending path and the fix, before any work.
"""
from __future__ import annotations

import codecs
import glob
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.jsonfile import iconv_command, json_lines_keys, text_key

SHARD_SUFFIX = ".dat"
SNIFF_BYTES = 1 << 16
FORMAT_HINT = "UTF-8 text, one sentence per line, a blank line between documents"
# the suffix of a shard's cache entries: <shard>.<12-hex hash>.cache, its .lock and its .tmp-HOST-PID
# build leftovers (data.corpus.CacheListing groups them by shard)
CACHE_ENTRY_SUFFIX = r"\.[0-9a-f]{12}\.cache(?:\.lock|\.tmp-.*)?"
# names we write beside a corpus: cache entries, <shard>.tokenizer, indexes
_ARTIFACT = re.compile(rf"({CACHE_ENTRY_SUFFIX}|\.tokenizer|\.index(\.lock|\.tmp-.*)?)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class SpecError(ValueError):
    """A corpus spec that names no usable shard; the message names the path and the fix."""


class MissingShard(SpecError, FileNotFoundError):
    """A file named by a spec does not exist (also a FileNotFoundError, as callers of a single file expect)."""


@dataclass(frozen=True)
class Part:
    text: str                   # the part as written (without its weight)
    weight: float | None
    shards: tuple[Path, ...]


@dataclass(frozen=True)
class CorpusSpec:
    text: str
    parts: tuple[Part, ...]

    @property
    def shards(self) -> tuple[Path, ...]:
        return tuple(s for p in self.parts for s in p.shards)

    @property
    def weighted(self) -> bool:
        return self.parts[0].weight is not None

    def part_of_shard(self) -> list[int]:
        return [i for i, p in enumerate(self.parts) for _ in p.shards]


def is_artifact(path: Path) -> bool:
    """A cache, lock, tokenizer or index this project writes beside the shards."""
    return bool(_ARTIFACT.search(path.name))


COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
              (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
              (b"PK\x03\x04", "zip", "unzip"))


def compressed_problem(path: Path, head: bytes) -> str | None:
    """The problem of a compressed file (by its magic bytes) given its first bytes, else None."""
    for magic, kind, tool in COMPRESSED:
        if head.startswith(magic):
            return (f"is {kind}-compressed; corpus shards are read as plain UTF-8 text (their caches index the "
                    f"file's bytes): decompress it first (`{tool} {path}`) and pass the text file")
    return None


def text_file_problem(path: Path, sniff_bytes: int = SNIFF_BYTES) -> str | None:
    """Why `path` cannot be a UTF-8 text shard (missing, not a regular file, empty, compressed, UTF-16,
    binary or in another encoding, JSON lines), or None.

    Only the first bytes are read: enough to catch a wrong file without reading a 100 GB corpus."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "no such file or directory"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return f"is a directory; expected a .dat text file ({FORMAT_HINT})"
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        return (f"is {kind}, not a regular file; the corpus must be text files on disk (its cache is named "
                f"by size and modification time): write the stream to a .dat file first")
    if st.st_size == 0:
        return f"is empty; expected {FORMAT_HINT}"
    try:
        with open(path, "rb") as f:
            head = f.read(sniff_bytes)
    except OSError as e:
        return f"cannot be read ({e.strerror}); check its permissions"
    if compressed := compressed_problem(path, head):
        return compressed
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows' "Unicode" (UTF-16) text
        return (f"is UTF-16 text (it starts with a UTF-16 byte order mark), not UTF-8: convert it with "
                f"{iconv_command(path, 'utf-16')}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character may be cut at the end
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        return (f"is not UTF-8 text (byte {e.start}: {e.reason}); a binary file or another encoding? "
                f"convert it with e.g. {iconv_command(path, 'cp949')}")
    if st.st_size <= len(head) and not head.strip():  # blank lines only: as empty (skipped in a directory)
        return f"is empty (blank lines only); expected {FORMAT_HINT}"
    if b"\n" not in head and head.count(b"\r") > 1:  # read by \n, it would be one line: one sentence, one document
        return (f"ends its lines with a carriage return alone (classic Mac OS line endings), so it would be read as "
                f"one line; convert it with `tr '\\r' '\\n' < {path} > {Path(path).stem}.lf{Path(path).suffix}`")
    return structured_problem(path, head)


def structured_problem(path: Path, head: bytes) -> str | None:
    """A JSON-lines corpus given the file's first bytes, else None: its lines would be trained on as text,
    braces, keys and escapes included."""
    keys = json_lines_keys(head)
    if keys is None:
        return None
    text = text_key(keys)
    target = Path(path).with_suffix(".dat").name
    if target == Path(path).name:  # `> dump.dat` would empty the input before jq reads it
        target = f"{Path(path).stem}.text.dat"
    return (f"holds JSON lines (its first line is an object with the key(s) {keys[:5]}), not text: its "
            f"lines would be trained on as they are, braces, keys and escapes included; write the text out "
            f"first, one sentence per line and a blank line between documents, e.g. "
            f"`jq -r '.{text}, \"\"' {path} > {target}` (each record's text, then "
            f"a blank line)")


def _weight_of(part: str) -> tuple[str, float] | None:
    """(the path, the weight) of a part ending in `:NUMBER`, unless the whole part names an existing
    path; None when there is no such weight."""
    head, sep, tail = part.rpartition(":")
    if not (sep and head) or Path(part).exists():
        return None
    try:
        return head, float(tail)
    except ValueError:
        return None


def _names_a_path(text: str) -> bool:
    """`text` (or `text` without a trailing `:NUMBER` weight) is an existing file or directory."""
    text = text.strip()
    weighted = _weight_of(text)
    return Path(text).exists() or (weighted is not None and Path(weighted[0]).exists())


def _comma_parts(spec: str) -> list[str]:
    """`spec` cut at its commas, except where a piece that names no path, joined with the next ones
    (up to 8 commas), names an existing one (`news,2020.dat`, `a/b,c/`)."""
    pieces = spec.split(",")
    out, i = [], 0
    while i < len(pieces):
        j = i + 1
        if not _GLOB_CHARS.search(pieces[i]) and not _names_a_path(pieces[i]):
            j = next((j for j in range(min(len(pieces), i + 9), i + 1, -1)
                      if _names_a_path(",".join(pieces[i:j]))), i + 1)
        out.append(",".join(pieces[i:j]))
        i = j
    return out


def split_parts(spec: str) -> list[tuple[str, float | None]]:
    """`a.dat,b/:0.3` -> [("a.dat", None), ("b/", 0.3)]. A trailing `:NUMBER` is a weight unless the
    whole part names an existing path; a comma separates parts unless it is inside an existing
    path's name."""
    out = []
    for raw in _comma_parts(spec):
        part = raw.strip()
        if not part:
            raise SpecError(f"corpus spec {spec!r} has an empty part (two commas, or a comma at an end); "
                            f"separate files, directories or globs by single commas")
        weight = None
        weighted = _weight_of(part)
        if weighted is not None:
            part, weight = weighted
            if not (math.isfinite(weight) and weight > 0):
                raise SpecError(f"corpus spec part {raw.strip()!r}: the weight must be a number > 0, got "
                                f"{raw.strip().rpartition(':')[2]}; write e.g. {part}:0.5")
        out.append((part, weight))
    return out


def _is_pattern(part: str) -> bool:
    """A glob, unless the part names an existing path (`wiki[ko].dat`, a folder `set[1]`)."""
    return bool(_GLOB_CHARS.search(part)) and not Path(part).exists()


def _expand(part: str) -> list[Path]:
    if _is_pattern(part):
        hits = [Path(h) for h in sorted(glob.glob(part, recursive=True))]
        files: list[Path] = []
        for h in hits:
            if is_artifact(h):
                continue
            files.extend(_directory_shards(h) if h.is_dir() else [h])
        if not files:
            raise SpecError(f"{part}: the pattern matches no file; check it (and quote it, so that the shell "
                            f"does not expand it first)")
        return files
    p = Path(part)
    if p.is_dir():
        files = _directory_shards(p)
        if not files:
            packed = sorted(q.name for q in p.rglob(f"*{SHARD_SUFFIX}.*") if q.suffix in (".gz", ".bz2", ".xz", ".zst",
                                                                                          ".zip"))
            hint = (f"; it holds compressed shards ({', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}): "
                    f"decompress them, shards are read as plain text") if packed else ""
            raise SpecError(f"{part}: the directory holds no *{SHARD_SUFFIX} file (searched recursively){hint}; put "
                            f"the shards there as *{SHARD_SUFFIX}, or name them with a glob such as "
                            f"'{part.rstrip('/')}/*'")
        return files
    return [p]


def _directory_shards(root: Path) -> list[Path]:
    """Every *.dat file under root, symlinked subdirectories included (as `root/**/*.dat` takes them;
    Path.rglob leaves them out), each real directory once (a symlink loop ends there)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        found.extend(p for p in (Path(top, f) for f in files if f.endswith(SHARD_SUFFIX))
                     if p.is_file() and not is_artifact(p))
    return sorted(found, key=str)


def _file_key(path: Path) -> tuple[int, int] | Path:
    """The identity of a file: its device and inode (a hard link or a symlink is the same file), or its
    resolved path when it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return path.resolve()
    return st.st_dev, st.st_ino


def check_disjoint(train: CorpusSpec, held_out: CorpusSpec, train_flag: str = "--corpus_path",
                   held_out_flag: str = "--eval_corpus") -> None:
    """Refuse held-out (validation) text that is also training text: a `src_valid.dat` inside the training
    directory (or matched by its glob) would be trained on, and its validation loss would measure
    memorisation. Raises SpecError naming the shards and the fix."""
    keys = {_file_key(s): s for s in train.shards}
    both = [s for s in held_out.shards if _file_key(s) in keys]
    if both:
        names = ", ".join(str(s) for s in both[:3]) + (f" and {len(both) - 3} more" if len(both) > 3 else "")
        raise SpecError(f"{held_out_flag} {held_out.text}: {len(both)} of its shard(s) are also training shards of "
                        f"{train_flag} {train.text} ({names}): the model would train on its validation text. Leave "
                        f"them out of {train_flag} (move the validation file out of the training directory, or name "
                        f"the training shards with a glob that does not match it, e.g. 'DIR/train*'), or hold out "
                        f"part of the training text with --eval_fraction instead")


def resolve(spec: str | Path | Sequence[str | Path], check_text: bool = True) -> CorpusSpec:
    """The shards a spec names, grouped by part. A sequence is several specs (e.g. repeated --input).

    With check_text, every shard's beginning is checked to be UTF-8 text: an explicitly named
    empty or binary file is an error, and so is any binary shard found in a directory or glob
    (an empty one there is skipped)."""
    texts = [str(spec)] if isinstance(spec, (str, Path)) else [str(s) for s in spec]
    if not texts or not any(t.strip() for t in texts):
        raise SpecError(f"empty corpus spec; give a .dat file, a directory of .dat shards or a glob ({FORMAT_HINT})")
    parts: list[Part] = []
    seen: dict[tuple[int, int] | Path, tuple[Path, str]] = {}
    for text in texts:
        for part, weight in split_parts(text):
            shards = []
            explicit = not _is_pattern(part) and not Path(part).is_dir()
            for shard in _expand(part):
                if check_text:
                    problem = text_file_problem(shard)
                    if problem and not explicit and problem.startswith("is empty"):
                        continue
                    if problem:
                        where = "" if explicit else f" (a shard of {part})"
                        error = MissingShard if problem.startswith("no such file") else SpecError
                        raise error(f"{shard}{where}: {problem}")
                key = _file_key(shard)
                if key in seen:
                    first, where = seen[key]
                    same = "" if first.resolve() == shard.resolve() else f"; it is the same file as {first} (a link)"
                    raise SpecError(f"{shard} is named twice in the corpus spec (by {where!r} and {part!r}{same}); "
                                    f"list every shard once")
                seen[key] = (shard, part)
                shards.append(shard)
            if not shards:
                raise SpecError(f"{part}: every file it names is empty; expected {FORMAT_HINT}")
            parts.append(Part(part, weight, tuple(shards)))
    weighted = [p.weight is not None for p in parts]
    if any(weighted) and not all(weighted):
        missing = [p.text for p in parts if p.weight is None]
        raise SpecError(f"corpus spec {','.join(texts)!r}: give every part a weight or none (no weight on "
                        f"{missing}); e.g. {parts[0].text}:0.7,{parts[-1].text}:0.3")
    return CorpusSpec(",".join(texts), tuple(parts))
