"""The corpus pipeline as users with real-size data run it: many shards mixed by weight, a src_valid file
beside the training text, caches built ahead on another machine (read-only directories), killed and
failed builds, stale caches. Small reproductions of what was found at scale (thousands of shards, a
1 GB shard); the refusals and notes are rows of docs/operations.md's "Bad input" table."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import data.corpus as corpus_mod
from data.corpus import _cli, ensure_caches, open_corpus
from data.pretrain import PretrainDataset
import data.spec as spec_mod
from data.spec import SpecError, resolve
from tests.trainer_util import REPO


def _lines(tiny_corpus, n, skip=0):
    return b"".join(tiny_corpus.read_bytes().splitlines(keepends=True)[skip:skip + n])


@pytest.fixture
def two_dirs(tiny_corpus, tmp_path):
    """a/ with one small shard, c/ with two larger ones (documents of the NSMC slice)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "s0.dat").write_bytes(_lines(tiny_corpus, 300))
    (tmp_path / "c" / "s1.dat").write_bytes(_lines(tiny_corpus, 1000, 300))
    (tmp_path / "c" / "s2.dat").write_bytes(_lines(tiny_corpus, 1000, 1300))
    return tmp_path


def test_a_weight_rounding_a_part_to_no_samples_warns_instead_of_crashing(two_dirs, tiny_tokenizer, caplog):
    # 'a:0.001,c:1000' crashed the index build with an IndexError in _blend (the first part's share of the
    # samples rounds to 0); now that part is left out with a warning naming it
    spec = f"{two_dirs / 'a'}:0.001,{two_dirs / 'c'}:1000"
    corpus = open_corpus(spec, tiny_tokenizer, progress=False, num_workers=1)
    with caplog.at_level(logging.WARNING, logger="data.pretrain"):
        ds = PretrainDataset(corpus, tiny_tokenizer, 64, objective="mlm")
    first_part = ds.samples_per_shard[0]
    blend = np.asarray(ds.blend)
    assert len(blend) == sum(ds.samples_per_shard) and blend.min() >= first_part  # none from a/
    assert any("get 0 of the" in r.getMessage() and str(two_dirs / "a") in r.getMessage() for r in caplog.records)
    ds[0], ds[len(ds) - 1]
    # a share of a few samples still draws them, as before
    ds2 = PretrainDataset(open_corpus(f"{two_dirs / 'a'}:0.05,{two_dirs / 'c'}:1", tiny_tokenizer, progress=False,
                                      num_workers=1), tiny_tokenizer, 64, objective="mlm")
    assert 0 < int((np.asarray(ds2.blend) < first_part).sum()) < len(ds2) // 10


def test_src_valid_inside_the_training_directory_is_refused(two_dirs, tiny_corpus, tmp_path):
    # the common layout: corpus/ holds the training shards and src_valid.dat; --corpus_path corpus/ trained
    # on the validation file too
    valid = two_dirs / "c" / "src_valid.dat"
    valid.write_bytes(_lines(tiny_corpus, 200, 2300))
    with pytest.raises(SpecError, match=r"also training shards.*src_valid\.dat.*move the validation file"):
        spec_mod.check_disjoint(resolve(str(two_dirs / "c")), resolve(str(valid)))
    # a hard link of a training shard is the same text under another name
    os.link(two_dirs / "c" / "s1.dat", tmp_path / "valid_link.dat")
    with pytest.raises(SpecError, match="1 of its shard"):
        spec_mod.check_disjoint(resolve(f"{two_dirs / 'a'},{two_dirs / 'c' / 's1.dat'}"),
                                resolve(str(tmp_path / "valid_link.dat")))
    spec_mod.check_disjoint(resolve(f"{two_dirs / 'c'}/s[0-9].dat"), resolve(str(valid)))  # a glob leaving it out
    # and the launcher stops before any work (no tokenizer, cache or run directory made)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--model_name", "leak", "--output_dir",
                           str(tmp_path / "out"), "--corpus_path", str(two_dirs / "c"), "--eval_corpus", str(valid),
                           "--num_steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "would train on its validation text" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not list((two_dirs / "c").glob("*.cache"))


def test_the_same_shard_through_a_hard_link_is_named_twice(two_dirs):
    os.link(two_dirs / "c" / "s1.dat", two_dirs / "a" / "copy.dat")
    with pytest.raises(SpecError, match="named twice.*the same file as"):
        resolve(f"{two_dirs / 'a'},{two_dirs / 'c'}")


def test_caches_of_a_read_only_directory_are_found_by_info_and_their_place_is_said(
        two_dirs, tiny_tokenizer, tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    # a read-only corpus directory (a read-only mount: root too cannot write there) puts its caches under
    # ~/.cache/ko_pretrain/corpus; `info` looked only beside the shards and said "missing", and the build
    # did not say where they went (other machines of the job then build them again)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CORPUS_CACHE_DIR", raising=False)
    ro = two_dirs / "c"
    monkeypatch.setattr(corpus_mod, "_writable", lambda d: d != ro)
    said = []
    dirs = ensure_caches(resolve(str(ro)).shards, tiny_tokenizer, progress=False, num_workers=1, log=said.append)
    root = tmp_path / "xdg" / "ko_pretrain" / "corpus"
    assert all(d.is_relative_to(root) for d in dirs) and not list(ro.glob("*.cache"))
    assert any(f"{ro} not writable" in m and f"CORPUS_CACHE_DIR={root}" in m for m in said), said
    capsys.readouterr()
    for tok in ([], ["--tokenizer", str(tiny_tokenizer_dir)]):
        assert _cli(["info", str(ro), *tok]) == 0
        out = capsys.readouterr().out
        assert out.count("  ok") == 2 and "missing" not in out, out
        assert f"not beside their shards but under {root}" in out


def test_info_totals_stale_caches_and_names_leftovers_of_killed_builds(two_dirs, tiny_tokenizer, capsys):
    shard = two_dirs / "a" / "s0.dat"
    old = ensure_caches([shard], tiny_tokenizer, progress=False, num_workers=1)[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a copy without -p
    ensure_caches([shard], tiny_tokenizer, progress=False, num_workers=1)
    # a build killed on another node of the job (the next build here leaves it: not this host's)
    (shard.parent / f"{old.name}.tmp-othernode-123").mkdir()
    (shard.parent / f"{old.name}.tmp-othernode-123" / "tokens.bin").write_bytes(b"\0" * 2**20)
    assert _cli(["info", str(shard)]) == 0
    out = capsys.readouterr().out
    assert f"{old.name} (shard changed since)" in out
    assert "tmp-othernode-123 (a build on host othernode: left by a killed build" in out
    assert "2 stale cache(s) or build leftover(s), 1.0 MiB" in out and "rm -r" in out
    assert old.exists()  # info deletes nothing


def test_a_full_disk_reports_the_space_left_after_cleaning_up(tiny_corpus, tiny_tokenizer, tmp_path):
    # the build's worker processes were forked while the cache files were open and kept them: the removed
    # files' space stayed taken, and the error said "0 MiB free" on a disk with room once cleaned up.
    # A small tmpfs is a real full disk; mounting one needs root (CAP_SYS_ADMIN)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        shard = mnt / "x.dat"
        shard.write_bytes(tiny_corpus.read_bytes() * 12)  # ~3 MiB: its cache (~1.8 MiB) does not fit in 1.5
        (mnt / "filler").write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 3 * 2**19))
        free = shutil.disk_usage(mnt).free
        with pytest.raises(corpus_mod.CacheWriteError) as e:
            ensure_caches([shard], tiny_tokenizer, progress=False, num_workers=2)
        assert f"{free / 2**20:.0f} MiB free there" in str(e.value) and "nothing of it was kept" in str(e.value)
        assert shutil.disk_usage(mnt).free == free and sorted(p.name for p in mnt.iterdir()) == [
            "filler", "x.dat", f"{corpus_mod.cache_dir_for(shard, tiny_tokenizer).name}.lock"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_shards_copied_without_their_times_are_named_before_they_are_tokenized_again(two_dirs, tiny_tokenizer):
    # `cp -r`/`rsync -r` of a corpus and its caches to another cluster changes every shard's mtime: all caches
    # went stale and the corpus was tokenized again with nothing said (the INFO log is not shown in training)
    shards = resolve(str(two_dirs / "c")).shards
    ensure_caches(shards, tiny_tokenizer, progress=False, num_workers=1)
    for s in shards:
        os.utime(s, ns=(s.stat().st_atime_ns, s.stat().st_mtime_ns + 5 * 10**9))
    said = []
    ensure_caches(shards, tiny_tokenizer, progress=False, num_workers=1, log=said.append)
    assert any("2 of the 2 shard(s) to cache have a cache of the same size and tokenizer but another "
               "modification time" in m and "cp -p" in m for m in said), said
    said.clear()  # a changed text (another size) or a first build: nothing to say
    shards[0].write_bytes(shards[0].read_bytes() + "추가 문장\n".encode())
    ensure_caches(shards, tiny_tokenizer, progress=False, num_workers=1, log=said.append)
    assert said == []


def test_info_piped_into_head_ends_quietly(tmp_path):
    # `python -m data.corpus info 'traindata/*' | head`: thousands of rows, and a BrokenPipeError traceback
    (tmp_path / "d").mkdir()
    for i in range(1500):
        (tmp_path / "d" / f"s{i:04d}.dat").write_text("한 문장입니다\n")
    proc = subprocess.Popen([sys.executable, "-m", "data.corpus", "info", str(tmp_path / "d")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().startswith(b"shard")
    proc.stdout.close()  # as head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


def test_info_lists_the_sample_indexes_that_pile_up(two_dirs, tiny_tokenizer, capsys):
    # every --max_seq_length, objective, split or weights leaves an index beside the first shard (GBs for tens
    # of GB of text); info said nothing of them
    corpus = open_corpus(str(two_dirs / "c"), tiny_tokenizer, progress=False, num_workers=1)
    for length in (32, 64):
        PretrainDataset(corpus, tiny_tokenizer, length, objective="mlm")
    assert _cli(["info", str(two_dirs / "c")]) == 0
    out = capsys.readouterr().out
    assert "2 sample index(es)" in out and str(two_dirs / "c" / "s1.dat") in out and "rm -r" in out
    assert _cli(["info", str(two_dirs / "a")]) == 0  # another corpus's shards: not its indexes
    assert "sample index" not in capsys.readouterr().out


def test_a_process_waiting_on_a_large_shard_sees_its_build_progress(two_dirs, tiny_tokenizer_dir, tiny_tokenizer):
    # another node builds one large shard for half an hour: the waiting ranks printed "1061.8 of 1061.8 MiB
    # left" every 30 s until it was done (they looked like hung); the builder now leaves its progress in its
    # temporary directory and the waiting line counts it
    shard = two_dirs / "c" / "s1.dat"
    out = corpus_mod.cache_dir_for(shard, tiny_tokenizer)
    builder = subprocess.Popen(
        [sys.executable, "-m", "data.corpus", "build", "--corpus_path", str(shard), "--tokenizer",
         str(tiny_tokenizer_dir), "--num_workers", "1", "--no_progress"], cwd=REPO, stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO), CORPUS_TEST_BUILD_DELAY="s1.dat:3"))
    try:
        deadline = time.monotonic() + 30
        while not list(out.parent.glob(f"{out.name}.tmp-*/{corpus_mod.PROGRESS}")):  # tokenized, not yet renamed
            assert time.monotonic() < deadline and builder.poll() is None
            time.sleep(0.05)
        said = []
        ensure_caches([shard], tiny_tokenizer, progress=False, num_workers=1, log=said.append, poll_seconds=0.1)
    finally:
        builder.wait(timeout=60)
    size = shard.stat().st_size / 2**20
    assert said and f"waiting for 1 shard cache(s) being built by other processes (0.0 of {size:.1f} MiB left" \
        in said[0], said
    assert builder.returncode == 0 and not (out / corpus_mod.PROGRESS).exists()
