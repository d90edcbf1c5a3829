"""Writing where a user's files live, in one place (DESIGN.md: anything that writes there goes
through one helper that refuses to overwrite what it did not write).

- `staged_dir(out, ...)`: build a folder as `.NAME.tmp` beside it and swap it in when complete.
  Before any work it refuses to replace a folder that is not an earlier output of ours (a
  `MARKER` file lists the files we wrote) unless the caller's override (`--overwrite`) is given,
  and it never replaces a training run directory or a folder holding one, nor the folder it
  reads from. A failure removes the `.NAME.tmp` (and the parents it created).
- `replace_dir(tmp, dest)`: the swap itself (`dest` -> `.dest.old`, `tmp` -> `dest`, drop the
  old), also used for a step-N checkpoint saved twice.
- `RunLock`: one training run at a time owns `output_dir/model_name` (global rank 0 holds a
  POSIX lock on its `.lock` file; the kernel, or the file server, frees it when the process
  dies, so a lock is never stale; a restarted torchrun attempt waits for its predecessor's).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = ".written_by_trainer.json"
LOCK = ".run.lock"
# what makes a folder a training run directory (output_dir/model_name)
_RUN_FILES = ("loss.tsv", "eval.json", "encoder.json", LOCK)
_RUN_DIRS = re.compile(r"^(step-\d+|\.step-\d+\.(tmp|old)|tensorboard)$")


class UnsafeWrite(ValueError):
    """Writing there would replace files we did not write; the message names the fix."""


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


def run_dir_signs(path: Path) -> list[str]:
    """What marks `path` as a training run directory (step-N checkpoints, loss.tsv, TensorBoard
    logs, ...); empty when nothing does."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    signs = sorted(e.name + ("/" if e.is_dir() else "") for e in entries
                   if (e.is_dir(follow_symlinks=False) and _RUN_DIRS.match(e.name))
                   or (e.is_file(follow_symlinks=False) and e.name in _RUN_FILES))
    return signs


def find_run_dir(path: Path) -> tuple[Path, list[str]] | None:
    """`path` itself or the first folder below it that is a run directory, with its signs."""
    for root, dirs, _ in os.walk(path):
        signs = run_dir_signs(Path(root))
        if signs:
            return Path(root), signs
        dirs.sort()
    return None


_RUN_PARTS = ((re.compile(r"^final$"), "the model exported by"), (re.compile(r"^\.?step-\d+(\.tmp|\.old)?$"), "a checkpoint of"),
              (re.compile(r"^tensorboard$"), "the TensorBoard logs of"),
              (re.compile(r"^(superseded-after-step-\d+|earlier-run)(-\d+)?$"), "what was moved aside in"))


def run_part(path: Path) -> str | None:
    """What `path` is to the training run directory holding it ("a checkpoint of RUN", ...), or None:
    a folder an export or a copy must never replace, whatever flags were given."""
    path = Path(path)
    if not run_dir_signs(path.parent):
        return None
    for pattern, what in _RUN_PARTS:
        if pattern.match(path.name):
            return f"{what} the training run {path.parent}"
    return None


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _written_by_us(path: Path) -> tuple[bool, list[str]]:
    """(is `path` an earlier output of ours, the files in it we did not write)."""
    marker = path / MARKER
    if marker.is_file():
        try:
            ours = set(json.loads(marker.read_text())["files"]) | {MARKER}
        except (OSError, ValueError, KeyError, TypeError):
            return False, []
        return True, [f for f in _files(path) if f not in ours]
    return _legacy_export(path), []


def _legacy_export(path: Path) -> bool:
    """Exports written before the marker existed: our safetensors writer records tied-weight
    aliases in the metadata; the export CLI's README names itself."""
    weights = path / "model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                if "aliases" in (f.metadata() or {}):
                    return True
        except Exception:  # not a safetensors file at all: not ours
            pass
    readme = path / "README.md"
    try:
        return readme.is_file() and "python -m trainer.export" in readme.read_text(errors="replace")[:4000]
    except OSError:
        return False


def _inside(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def check_replaceable(out: Path, *, overwrite: bool = False, fix: str = "pass --overwrite to replace it",
                      source: Path | None = None) -> None:
    """Raise UnsafeWrite unless `out` may be replaced by a new output of ours: it is missing,
    empty, or an earlier output of ours holding nothing else; any other folder only with
    `overwrite`; never a run directory, a folder holding one, the source or a folder holding it."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UnsafeWrite(f"{out} exists and is {'a symbolic link' if out.is_symlink() else 'a file'}, not a "
                          f"folder; pick another output folder (nothing was changed)")
    if not out.exists():
        return
    found = find_run_dir(out)
    if found is not None:
        run, signs = found
        where = f"{out} is" if run == out else f"{out} holds {run}, which is"
        raise UnsafeWrite(f"{where} a training run directory ({', '.join(signs[:5])}); it is never replaced, "
                          f"not even with --overwrite: pick another output folder, e.g. {out / 'hf'}")
    if source is not None and _inside(Path(source), out):
        raise UnsafeWrite(f"{out} holds the source {source}: writing there would replace what is being read; "
                          f"pick another output folder")
    files = _files(out)
    if not files:
        return
    ours, foreign = _written_by_us(out)
    if ours and not foreign:
        return
    if overwrite:
        return
    if ours:
        raise UnsafeWrite(f"{out} is an earlier export but also holds files it did not write "
                          f"({_some(foreign)}); move them away, or {fix}")
    raise UnsafeWrite(f"{out} already exists and holds {len(files)} file(s) not written by us ({_some(files)}); "
                      f"pick a new or empty folder, or {fix}")


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def write_marker(folder: Path, info: dict | None = None) -> None:
    """Record the files of `folder` as ours, so a later output may replace exactly them."""
    body = dict(info or {}, written_by="trainer", files=_files(folder))
    (folder / MARKER).write_text(json.dumps(body, indent=2, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap the complete folder `tmp` in as `dest` (renames only; the old one removed last)."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _missing_parents(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """rmdir each (deepest first) that is still empty; anything with content stays."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            pass


@contextmanager
def staged_dir(out: Path, *, overwrite: bool = False, fix: str = "pass --overwrite to replace it",
               source: Path | None = None, info: dict | None = None) -> Iterator[Path]:
    """Yield `.NAME.tmp` beside `out` to fill; on success mark it ours and swap it in as `out`.
    Refuses (UnsafeWrite, before anything is written) what `check_replaceable` refuses; on any
    failure the `.NAME.tmp` and the parent folders this created are removed."""
    out = Path(out)
    check_replaceable(out, overwrite=overwrite, fix=fix, source=source)
    created = _missing_parents(out.parent)
    tmp = out.parent / f".{out.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier attempt killed outright
        tmp.mkdir(parents=True)
        yield tmp
        write_marker(tmp, info)
        check_replaceable(out, overwrite=overwrite, fix=fix, source=source)  # nothing appeared meanwhile
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
        raise


def free_mb(path: Path) -> float:
    """Free space (MB) of the file system holding `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free / 2**20
    return float("nan")


def tree_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


class RunLock:
    """Exclusive use of a run directory by one live process.

    A POSIX record lock (fcntl) on `run_dir/.lock`: it dies with its process (SIGKILL and OOM
    included), is not inherited by forked DataLoader workers, and works across nodes on NFS
    (lockd / NFSv4) and on Lustre/GPFS mounted with locking; a node that crashes loses its lock
    when the file server's lease expires. The file holds the holder's host, pid and command, for
    the message of whoever is refused. Caveat of POSIX locks: closing *any* descriptor of the
    file in the holding process drops the lock, so the holder never opens it a second time.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to `wait_s` for a holder to go away; RunLocked if it does not."""
        self.created = _missing_parents(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    print(f"[lock] warning: the file system of {self.run_dir} does not support locks ({e.strerror}): "
                          f"nothing stops a second run with the same --model_name from writing there",
                          file=sys.stderr, flush=True)
                    self.path.unlink(missing_ok=True)
                    return
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RunLocked(self._refusal()) from None
            try:  # the holder may have unlinked the file between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
            self.fd = fd
            return

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            who = (f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}: "
                   f"{holder['command']}")
        except (OSError, ValueError, KeyError, TypeError):
            who = "holder unknown"
        return (f"{self.run_dir} is in use by another training run ({who}). Two runs writing one run directory "
                f"corrupt each other's checkpoints and logs: wait for it to finish (or stop it), or pick another "
                f"--model_name/--output_dir. (A lock dies with its process; if that host crashed, the file "
                f"server frees it when its lease runs out, about 90 s on NFS.)")

    def release(self) -> None:
        """Unlink, then unlock (a process that opened the old file re-checks it), then remove the
        folders `acquire` created if they are still empty."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
        remove_if_empty(self.created)
