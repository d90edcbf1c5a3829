import hashlib
import json
import os
import shutil
import threading

import numpy as np
import pytest

import data.corpus as corpus_mod
from data.corpus import CorpusCache, FileArray, build_cache, cache_dir_for, load_or_build
from data.tokenizer import KoTokenizer


def reference(path, tok):
    """Documents as lists of token-id lists, parsed the obvious way."""
    docs, cur = [], []
    for line in path.read_bytes().split(b"\n"):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            ids = tok.encode(text)
            if ids:
                cur.append(ids)
        elif cur:
            docs.append(cur)
            cur = []
    if cur:
        docs.append(cur)
    return docs


def as_docs(cache):
    t, so, do = np.asarray(cache.tokens), cache.sent_offsets, cache.doc_offsets
    return [[t[so[s]:so[s + 1]].tolist() for s in range(do[d], do[d + 1])] for d in range(len(do) - 1)]


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path):
    p = tmp_path / "c.dat"
    shutil.copy(tiny_corpus, p)
    return p


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = corpus_mod._write_cache

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(corpus_mod, "_write_cache", counting)
    return calls


def test_cache_matches_reference_and_documents(corpus_copy, tiny_tokenizer):
    cache = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    ref = reference(corpus_copy, tiny_tokenizer)
    assert as_docs(cache) == ref
    assert cache.path.parent == corpus_copy.parent and cache.path.name.startswith("c.dat.")
    assert cache.path.name.endswith(".cache") and len(cache.path.name.split(".")[2]) == 12
    assert isinstance(cache.tokens, FileArray) and cache.tokens.dtype == np.uint16
    c = cache.manifest["counts"]
    assert (c["documents"], c["sentences"], c["tokens"]) == (len(ref), sum(map(len, ref)),
                                                            sum(len(s) for d in ref for s in d))
    assert cache.manifest["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint
    assert cache.manifest["skipped"] == {}
    assert np.asarray(cache.tokens).max() < tiny_tokenizer.vocab_size and not set(np.unique(cache.tokens)) & {0, 2, 3, 4, 5}


def test_large_reads_loop_over_short_reads(corpus_copy, tiny_tokenizer, monkeypatch):
    """One pread returns at most 2 GiB - 4 KiB on Linux, so reading a large array whole (the sentence
    offsets of a 30 GB single-file corpus at index build) took a short read for a damaged cache. With
    reads cut at 100 bytes and chunks of 64, whole arrays and slices come back complete."""
    import os

    cache = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    whole = {name: np.fromfile(cache.path / f"{name}.bin", dtype=getattr(cache, name).dtype)
             for name in ("tokens", "sent_offsets", "doc_offsets")}
    real_pread, real_preadv = os.pread, os.preadv

    def short_pread(fd, n, offset):
        return real_pread(fd, min(n, 100), offset)

    def short_preadv(fd, buffers, offset):
        (view,) = buffers
        return real_preadv(fd, [view[:100]], offset)

    monkeypatch.setattr(corpus_mod, "PREAD_CHUNK", 64, raising=False)
    monkeypatch.setattr(os, "pread", short_pread)
    monkeypatch.setattr(os, "preadv", short_preadv)
    fresh = CorpusCache.open(cache.path)
    for name, expect in whole.items():
        assert expect.nbytes > 200  # several cut reads
        np.testing.assert_array_equal(np.asarray(getattr(fresh, name)), expect)
        np.testing.assert_array_equal(getattr(fresh, name)[3:300], expect[3:300])
    so, do = fresh.read_offsets()
    np.testing.assert_array_equal(so, whole["sent_offsets"])
    with pytest.raises(IndexError):
        fresh.tokens[len(whole["tokens"])]


def test_a_file_array_collected_during_a_read_does_not_deadlock(corpus_copy, tiny_tokenizer):
    """A FileArray's __del__ closes its descriptor through the process's pool; garbage collection
    can run it inside a read, while the pool's lock is held by the same thread: the lock is
    reentrant (a plain lock hung there)."""
    import gc

    cache = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    a = FileArray(cache.path / "tokens.bin", cache.tokens.dtype)
    b = FileArray(cache.path / "tokens.bin", cache.tokens.dtype)
    cycle = [b]
    cycle.append(cycle)  # b only reachable from a cycle: freed by the collector, not by refcount
    assert a[0] == b[0]
    b_key = id(b)
    del b, cycle

    def read_while_collecting():
        with corpus_mod._DESCRIPTORS._lock:  # as inside a read
            gc.collect()
            a[1]

    t = threading.Thread(target=read_while_collecting, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "deadlock: __del__ waited for the lock its own thread held"
    open_keys = corpus_mod._DESCRIPTORS._fds
    assert b_key not in open_keys and id(a) in open_keys  # b's descriptor closed by its __del__, a's kept


def test_a_cache_removed_under_a_reader_is_named(corpus_copy, tiny_tokenizer, monkeypatch):
    """Descriptors closed by the pool are reopened on the next read; if the cache was deleted in
    between (a user cleaning caches, a tmp reaper), the error names the folder and what to do."""
    cache = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    shutil.copytree(cache.path, corpus_copy.parent / "copy.cache")
    a = FileArray(corpus_copy.parent / "copy.cache" / "tokens.bin", cache.tokens.dtype)
    first = a[0]
    corpus_mod._DESCRIPTORS.close(id(a))  # as the pool does to its least recently used descriptor
    shutil.rmtree(corpus_copy.parent / "copy.cache")
    with pytest.raises(FileNotFoundError, match=r"copy.cache was removed \(or moved\) while this process reads it: "
                                                r"a corpus cache or sample index in use\. Nothing else is lost; run "
                                                r"again \(it is rebuilt\) and resume with --checkpoint auto"):
        a[0]
    assert first == cache.tokens[0]


def test_multiprocess_build_equals_single_process(corpus_copy, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 8192)  # many chunks, documents cut across chunks
    arrays = []
    for workers in (1, 2):
        monkeypatch.setenv(corpus_mod.CACHE_ENV, str(tmp_path / f"w{workers}"))
        c = CorpusCache.open(build_cache(corpus_copy, tiny_tokenizer, num_workers=workers, progress=False))
        assert c.manifest["build"]["num_workers"] == workers
        arrays.append((np.array(c.tokens), np.array(c.sent_offsets), np.array(c.doc_offsets)))
    for a, b in zip(*arrays):
        np.testing.assert_array_equal(a, b)


def test_large_build_path_gives_the_reference_cache(tmp_path, tiny_tokenizer, monkeypatch):
    """What a build of >= BYPASS_MIN_BYTES does (normalizer bypass, lines joined per group:
    data.tokenizer.JoinedEncoder), on 1 and 2 workers, equals the line-by-line reference, on reviews
    beyond the tokenizer's training slice with odd lines among them."""
    from tests.conftest import NSMC_CORPUS
    from tests.test_tokenizer import ODD_LINES

    lines = NSMC_CORPUS.read_text(encoding="utf-8").splitlines()[3000:7000]
    path = tmp_path / "large.dat"
    path.write_text("\n".join(lines[:2000] + ODD_LINES + [""] + lines[2000:]) + "\n", encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "BYPASS_MIN_BYTES", 0)
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 65536)
    import data.tokenizer as tokenizer_mod

    joined = []
    real = tokenizer_mod.JoinedEncoder.encode_flat
    monkeypatch.setattr(tokenizer_mod.JoinedEncoder, "encode_flat",
                        lambda self, texts: joined.append(len(texts)) or real(self, texts))
    ref = reference(path, tiny_tokenizer)
    for workers in (1, 2):
        monkeypatch.setenv(corpus_mod.CACHE_ENV, str(tmp_path / f"w{workers}"))
        cache = CorpusCache.open(build_cache(path, tiny_tokenizer, num_workers=workers, progress=False))
        assert as_docs(cache) == ref
        if workers == 1:  # in this process: the joined path did the work
            assert sum(joined) > 3900


def test_reuse_and_invalidation(corpus_copy, tiny_tokenizer, tmp_path, count_builds):
    first = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    again = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    assert again.path == first.path and len(count_builds) == 1
    assert (first.path / "manifest.json").stat().st_mtime_ns == (again.path / "manifest.json").stat().st_mtime_ns

    st = corpus_copy.stat()  # touch: same content, new mtime -> new cache
    os.utime(corpus_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    assert touched.path != first.path and len(count_builds) == 2
    with open(corpus_copy, "a", encoding="utf-8") as f:  # modified content
        f.write("\n새로운 문서의 문장입니다\n")
    modified = load_or_build(corpus_copy, tiny_tokenizer, progress=False)
    assert modified.path not in (first.path, touched.path)
    assert modified.num_documents == first.num_documents + 1 and len(count_builds) == 3

    from data.tokenizer import train_tokenizer
    other_tok = train_tokenizer([corpus_copy], 1500, tmp_path / "tok1500")
    other = load_or_build(corpus_copy, other_tok, progress=False)
    assert other.path != modified.path and len(count_builds) == 4
    assert first.path.exists()  # stale caches are left in place


def test_concurrent_builders_build_once(corpus_copy, tiny_tokenizer, count_builds):
    paths, errors = [], []

    def run():
        try:
            paths.append(build_cache(corpus_copy, tiny_tokenizer, num_workers=1, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(count_builds) == 1
    leftovers = [p.name for p in corpus_copy.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_ranks_share_the_build_without_a_collective(tmp_path, tiny_corpus, tiny_tokenizer, count_builds):
    """Two 'ranks' (threads) build 4 shards between them: each shard once, both see every cache."""
    shards = []
    lines = tiny_corpus.read_bytes().split(b"\n\n")
    for k in range(4):
        p = tmp_path / f"s{k}.dat"
        p.write_bytes(b"\n\n".join(lines[k::4]) + b"\n")
        shards.append(p)
    out, errors = {}, []

    def rank(r):
        try:
            out[r] = corpus_mod.ensure_caches(shards, tiny_tokenizer, rank=r, world_size=2, num_workers=1,
                                              progress=False, poll_seconds=0.05)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and out[0] == out[1] and len(count_builds) == 4
    assert all((d / "manifest.json").exists() for d in out[0])


def test_missing_and_empty_corpus(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.dat"):
        load_or_build(tmp_path / "nope.dat", tiny_tokenizer)
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"\n  \n\n")
    with pytest.raises(ValueError, match="has no tokens"):
        load_or_build(empty, tiny_tokenizer, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no half-built cache left


def test_non_utf8_and_overlong_lines_are_counted(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_LINE_BYTES", 200)
    p = tmp_path / "bad.dat"
    p.write_bytes("첫 문서 첫 문장\n".encode() + b"\xff\xfe broken \xc3\n" + "첫 문서 둘째 문장\n\n".encode()
                  + b"\x80\n\n" + "둘째 문서\n".encode() + ("아주 긴 줄 " * 50 + "\n").encode()
                  + "\x00\x01\n\n셋째 문서\r\n".encode())
    cache = load_or_build(p, tiny_tokenizer, progress=False)
    assert cache.manifest["skipped"] == {"non_utf8": 2, "too_long_line": 1, "no_tokens": 1}
    docs = as_docs(cache)
    assert len(docs) == 3 and [len(d) for d in docs] == [2, 1, 1]
    assert docs[2][0] == tiny_tokenizer.encode("셋째 문서")  # \r\n handled


def test_corrupt_cache_has_clear_error(corpus_copy, tiny_tokenizer):
    path = build_cache(corpus_copy, tiny_tokenizer, progress=False)
    with open(path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        CorpusCache.open(path)
    mf = json.loads((path / "manifest.json").read_text())
    assert mf["format_version"] == corpus_mod.FORMAT_VERSION


def test_read_only_corpus_dir_falls_back(corpus_copy, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(corpus_mod, "_writable", lambda d: False)
    assert cache_dir_for(corpus_copy, tiny_tokenizer).is_relative_to(tmp_path / "xdg")


def test_morpheme_tokenizer_cache_multiprocess(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("mecab")
    from data.tokenizer import train_tokenizer

    p = tmp_path / "m.dat"
    p.write_bytes(b"\n".join(tiny_corpus.read_bytes().split(b"\n")[:400]) + b"\n")
    tok = train_tokenizer([p], 800, tmp_path / "tok", morpheme="mecab")
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 4096)
    cache = load_or_build(p, KoTokenizer.load(tmp_path / "tok"), num_workers=2, progress=False)
    assert cache.manifest["tokenizer"]["morpheme"] == "mecab"
    assert as_docs(cache) == reference(p, tok)  # mecab applied inside the worker processes


def test_morpheme_caches_of_the_older_pre_tokenization_are_rebuilt(tiny_corpus, tmp_path):
    """Morpheme mode's pre-tokenization changed (MORPHEME_SPLIT_VERSION): its caches get a new key,
    an older one is listed as stale, why said; a plain tokenizer's cache key stays what it was."""
    pytest.importorskip("mecab")
    from data.tokenizer import MORPHEME_SPLIT_VERSION, train_tokenizer

    p = tmp_path / "m.dat"
    p.write_bytes(b"\n".join(tiny_corpus.read_bytes().split(b"\n")[:200]) + b"\n")
    train_tokenizer([p], 600, tmp_path / "tok", morpheme="mecab")
    tok = KoTokenizer.load(tmp_path / "tok")
    cache = load_or_build(p, tok, num_workers=1, progress=False)
    assert cache.manifest["tokenizer"]["split"] == MORPHEME_SPLIT_VERSION
    old = corpus_mod._inputs(p, tok)
    del old["tokenizer"]["split"]
    older = cache.path.with_name(f"{p.name}.{corpus_mod._cache_hash(old)}.cache")
    assert older != cache.path
    shutil.copytree(cache.path, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["tokenizer"]["split"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    row = corpus_mod.shard_info(p, tok)
    assert row["current"]["cache"] == str(cache.path)
    assert row["stale"] == [f"{older.name} (an older morpheme pre-tokenization)"]
    plain = corpus_mod._inputs(p, KoTokenizer(tok.tokenizer, None))
    assert "split" not in plain["tokenizer"]
    key = {"v": plain["format_version"], "size": plain["corpus"]["size"], "mtime_ns": plain["corpus"]["mtime_ns"],
           "tok": plain["tokenizer"]["fingerprint"]}
    assert corpus_mod._cache_hash(plain) == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
