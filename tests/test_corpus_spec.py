"""Corpus specs (files, directories, globs, weighted lists), per-shard caches, the parallel
build without a collective, the build/info CLI, the shared sample index, the deterministic
tokenizer and validation during pretraining, on real Korean shards (slices of NSMC)."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import data.corpus as corpus_mod
from data.corpus import CorpusCache, FileArray, build_cache, ensure_caches, open_corpus
from data.pretrain import PretrainDataset
from data.spec import SpecError, resolve
from tests.trainer_util import launch, read_tsv, write_config


def _split_docs(src, out_dir, names, sizes=None):
    """The documents of src dealt round-robin (or by `sizes`: counts) into shard files."""
    docs = [d for d in src.read_bytes().split(b"\n\n") if d.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, name in enumerate(names):
        part = docs[k::len(names)] if sizes is None else docs[start:start + sizes[k]]
        start += sizes[k] if sizes else 0
        p = out_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\n\n".join(part) + b"\n")
        paths.append(p)
    return paths


@pytest.fixture
def shards(tiny_corpus, tmp_path):
    """wiki/ with a.dat, b.dat and sub/c.dat; news/ with n0.dat, n1.dat (no suffix filter for globs)."""
    wiki = _split_docs(tiny_corpus, tmp_path / "wiki", ["a.dat", "b.dat", "sub/c.dat"])
    news = _split_docs(tiny_corpus, tmp_path / "news", ["n0.dat", "n1.dat"])
    return tmp_path, wiki, news


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = corpus_mod._write_cache

    def counting(corpus, *a, **k):
        calls.append(corpus.name)
        return real(corpus, *a, **k)

    monkeypatch.setattr(corpus_mod, "_write_cache", counting)
    return calls


def test_spec_forms(shards, tiny_tokenizer):
    root, wiki, news = shards
    assert resolve(root / "wiki").shards == (wiki[0], wiki[1], wiki[2])               # recursive, sorted
    assert resolve(str(root / "news" / "*")).shards == tuple(news)
    spec = resolve(f"{root / 'wiki'}:0.7,{root / 'news'}/*.dat:0.3")
    assert spec.weighted and [p.weight for p in spec.parts] == [0.7, 0.3] and len(spec.shards) == 5
    assert resolve([str(wiki[0]), str(news[0])]).shards == (wiki[0], news[0])       # a list = several specs
    build_cache(wiki[0], tiny_tokenizer, progress=False)  # our caches and locks beside the shards are never shards
    assert resolve(str(root / "wiki" / "*")).shards == (wiki[0], wiki[1], wiki[2])
    # commas inside existing names (a file, a directory) do not separate parts; with weights too
    comma = _split_docs(wiki[0], root / "dump,2020", ["news,kr.dat"])[0]
    assert resolve(str(comma)).shards == (comma,)
    spec = resolve(f"{comma}:0.2,{root / 'dump,2020'}/../news:0.8")
    assert [(p.text, p.weight) for p in spec.parts] == [(str(comma), 0.2), (f"{root / 'dump,2020'}/../news", 0.8)]
    assert resolve(f"{root / 'dump,2020'},{wiki[1]}").shards == (comma, wiki[1])


@pytest.mark.parametrize("case, expect", [
    ("{r}/wiki/*.txt", "the pattern matches no file"),
    ("{r}/empty_dir", "the directory holds no *.dat file"),
    ("{r}/wiki:0", "the weight must be a number > 0"),
    ("{r}/wiki:-1,{r}/news:1", "the weight must be a number > 0"),
    ("{r}/wiki:0.5,{r}/news", "give every part a weight or none"),
    ("{r}/wiki,{r}/wiki/a.dat", "is named twice"),
    ("{r}/mixed", "(a shard of {r}/mixed): is not UTF-8 text"),
    ("{r}/fifo.dat", "is a FIFO, not a regular file"),
    ("/dev/zero", "is a device, not a regular file"),
    ("{r}/nope.dat", "no such file"),
    ("{r}/wiki,,{r}/news", "has an empty part"),
])
def test_bad_specs_name_the_path_and_fix(shards, case, expect):
    root = shards[0]
    (root / "empty_dir").mkdir()
    (root / "mixed").mkdir()
    shutil.copy(shards[1][0], root / "mixed" / "good.dat")
    (root / "mixed" / "bin.dat").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(root / "fifo.dat")
    with pytest.raises(SpecError) as e:
        resolve(case.format(r=root))
    assert expect.format(r=root) in str(e.value)


def test_weighted_and_proportional_samples(shards, tiny_tokenizer):
    root, wiki, news = shards
    tok = tiny_tokenizer

    def part_share(spec):
        corpus = open_corpus(spec, tok, progress=False)
        ds = PretrainDataset(corpus, tok, 64, "mlm", mlm_probability=0.0)
        idx = np.asarray(ds.blend) if ds.blend is not None else np.arange(len(ds))
        shard = np.searchsorted(corpus.token_base, np.asarray(ds.unit_offsets)[np.asarray(ds.groups)[idx, 0]],
                                side="right") - 1
        return ds, corpus.part_of_shard[shard]

    plain, parts = part_share(f"{root / 'wiki'},{root / 'news'}")
    n_wiki = sum(plain.samples_per_shard[:3])
    assert (parts == 0).sum() == n_wiki and len(plain) == sum(plain.samples_per_shard)   # natural sizes
    weighted, parts = part_share(f"{root / 'wiki'}:0.7,{root / 'news'}:0.3")
    assert len(weighted) == len(plain) and abs((parts == 0).mean() - 0.7) < 0.002
    for i in range(0, len(weighted), 7):   # no sample crosses a shard: its tokens lie in one shard
        s, e = (int(x) for x in weighted.groups[int(weighted.blend[i])])
        a, b = int(weighted.unit_offsets[s]), int(weighted.unit_offsets[e])
        assert weighted.corpus.shard_of_token(a) == weighted.corpus.shard_of_token(b - 1)


def test_adding_a_shard_builds_only_it_and_index_is_shared(shards, tiny_tokenizer, count_builds):
    root, wiki, news = shards
    open_corpus(root / "wiki", tiny_tokenizer, progress=False)
    assert sorted(count_builds) == ["a.dat", "b.dat", "c.dat"]
    _split_docs(news[0], root / "wiki", ["d.dat"])
    corpus = open_corpus(root / "wiki", tiny_tokenizer, progress=False)
    assert count_builds[3:] == ["d.dat"] and len(corpus.caches) == 4
    # the corpus view equals the shards' own caches side by side, documents never crossing shards
    for k, cache in enumerate(corpus.caches):
        assert corpus.doc_base[k + 1] - corpus.doc_base[k] == cache.num_documents
        np.testing.assert_array_equal(corpus.span(int(corpus.token_base[k]), int(corpus.token_base[k + 1])),
                                      np.asarray(cache.tokens))
    a = PretrainDataset(corpus, tiny_tokenizer, 64, "sop")
    mtime = (a.index_dir / "index.json").stat().st_mtime_ns
    b = PretrainDataset(corpus, tiny_tokenizer, 64, "sop")
    assert b.index_dir == a.index_dir and (b.index_dir / "index.json").stat().st_mtime_ns == mtime
    assert isinstance(b.groups, FileArray) and isinstance(b.unit_offsets, FileArray)
    assert b[5]["input_ids"].tolist() == a[5]["input_ids"].tolist()


def test_many_shards_stay_within_the_open_file_limit(tiny_corpus, tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    """60 shards are 180 cache arrays: a process whose open-file limit (`ulimit -n`) is 64 opens the
    corpus and reads every sample in random order (one descriptor kept per array failed here with
    "Too many open files"), the samples those of an unlimited process, at most 16 descriptors held."""
    import subprocess
    import sys

    from tests.trainer_util import REPO

    lines = [x for x in tiny_corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    (tmp_path / "many").mkdir()
    for k in range(60):  # 40 lines each, one document
        (tmp_path / "many" / f"s{k:02d}.dat").write_text("\n".join(lines[40 * k:40 * k + 40]) + "\n", encoding="utf-8")
    corpus = open_corpus(str(tmp_path / "many" / "*"), tiny_tokenizer, progress=False)
    assert len(corpus.caches) == 60
    ds = PretrainDataset(corpus, tiny_tokenizer, 64, "sop")
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    expect = [ds[i]["input_ids"].tolist() for i in order]
    script = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import data.corpus as c
from data.pretrain import PretrainDataset
from data.tokenizer import KoTokenizer
tok = KoTokenizer.load({str(tiny_tokenizer_dir)!r})
ds = PretrainDataset(c.open_corpus({str(tmp_path / "many" / "*")!r}, tok, progress=False), tok, 64, "sop")
order = json.loads(sys.stdin.read())
out = [[ds[i]["input_ids"].tolist() for i in order] for _ in range(2)]
print(json.dumps({{"limit": c._DESCRIPTORS.limit, "held": len(c._DESCRIPTORS), "ids": out}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(order), capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["limit"] == 16 and 0 < got["held"] <= 16
    assert got["ids"][0] == expect and got["ids"][1] == expect


def test_cache_listing_groups_entries_by_exact_shard_name(tmp_path):
    """One listing of a cache directory, grouped by shard (a glob per shard listed the directory
    once per shard: quadratic in shards): a shard's caches, locks and build leftovers, not those of
    a shard whose name extends it, and names with glob characters taken literally."""
    from data.corpus import CacheListing

    names = ["a.dat.0123456789ab.cache", "a.dat.0123456789ab.cache.lock", "a.dat.0123456789ab.cache.tmp-h-1",
             "a.dat.x.fedcba987654.cache", "[1].dat.00112233aabb.cache", "a.dat", "notes.txt", "a.dat.cache"]
    for n in names:
        (tmp_path / n).mkdir()
    listing = CacheListing()
    assert listing.entries(tmp_path, "a.dat") == names[:3]
    assert listing.entries(tmp_path, "a.dat.x") == ["a.dat.x.fedcba987654.cache"]
    assert listing.entries(tmp_path, "[1].dat") == ["[1].dat.00112233aabb.cache"]
    assert listing.entries(tmp_path, "b.dat") == [] and listing.entries(tmp_path / "none", "a.dat") == []


def test_full_disk_while_caching_or_indexing_is_one_clear_error(shards, tiny_tokenizer, monkeypatch):
    """A full disk while a shard's cache or the sample index is written (numpy's tofile says only
    "N requested and M written") is a ValueError naming what, where, the free space and
    CORPUS_CACHE_DIR; the partial files are removed and a later run builds them."""
    import data.pretrain as pretrain_mod

    root, wiki, _ = shards
    real_write, real_index = corpus_mod._write_cache, pretrain_mod._shard_index

    def full_disk(corpus, tok, tmp, *a, **k):
        (tmp / "tokens.bin").write_bytes(b"\0" * 100)
        raise OSError("16180 requested and 2554 written")

    monkeypatch.setattr(corpus_mod, "_write_cache", full_disk)
    with pytest.raises(ValueError, match=r"cannot write the corpus cache of .*a\.dat in .*wiki \(16180 requested "
                                         r"and 2554 written; \d+ MiB free there; it needs about half the shard's "
                                         r"size, [0-9.]+ MiB\)"
                                         r": nothing of it was kept\. .*CORPUS_CACHE_DIR="):
        open_corpus(root / "wiki", tiny_tokenizer, progress=False)
    assert not [p for p in (root / "wiki").iterdir() if ".cache" in p.name and not p.name.endswith(".lock")]
    monkeypatch.setattr(corpus_mod, "_write_cache", real_write)
    corpus = open_corpus(root / "wiki", tiny_tokenizer, progress=False)

    def full_disk_index(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrain_mod, "_shard_index", full_disk_index)
    with pytest.raises(ValueError, match=r"cannot write the sample index of .* \(\[Errno 28\] No space left on "
                                         r"device; \d+ MiB free there\): nothing of it was kept"):
        PretrainDataset(corpus, tiny_tokenizer, 64, "sop")
    assert not [p for p in (root / "wiki").iterdir() if ".index" in p.name and not p.name.endswith(".lock")]
    monkeypatch.setattr(pretrain_mod, "_shard_index", real_index)
    assert len(PretrainDataset(corpus, tiny_tokenizer, 64, "sop")) > 0


def test_held_out_documents_are_stable_and_disjoint(shards, tiny_tokenizer):
    root, wiki, _ = shards
    corpus = open_corpus(root / "wiki", tiny_tokenizer, progress=False)
    train = PretrainDataset(corpus, tiny_tokenizer, 64, "sop", split="train", eval_fraction=0.3)
    held = PretrainDataset(corpus, tiny_tokenizer, 64, "sop", split="eval", eval_fraction=0.3)
    whole = PretrainDataset(corpus, tiny_tokenizer, 64, "sop")
    assert train.stats["documents"] + held.stats["documents"] == corpus.num_documents
    assert 0.15 < held.stats["documents"] / corpus.num_documents < 0.45
    tr = {tuple(map(int, g)) for g in np.asarray(train.groups)}
    ev = {tuple(map(int, g)) for g in np.asarray(held.groups)}
    assert not tr & ev and tr | ev == {tuple(map(int, g)) for g in np.asarray(whole.groups)}


def test_parallel_build_equals_single_and_stale_tmp_removed(shards, tiny_tokenizer, tmp_path, monkeypatch):
    root, wiki, _ = shards
    dead = tmp_path / "wiki" / f"a.dat.0123456789ab.cache.tmp-{os.uname().nodename}-999999999"
    live = tmp_path / "wiki" / f"a.dat.0123456789ab.cache.tmp-{os.uname().nodename}-{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    dirs = ensure_caches(wiki, tiny_tokenizer, rank=0, world_size=1, num_workers=2, progress=False)
    assert not dead.exists() and live.exists()  # a killed build's leftover goes, a running one stays
    monkeypatch.setenv(corpus_mod.CACHE_ENV, str(tmp_path / "single"))
    for shard, d in zip(wiki, dirs):
        one = CorpusCache.open(build_cache(shard, tiny_tokenizer, num_workers=1, progress=False))
        other = CorpusCache.open(d)
        for name in ("tokens", "sent_offsets", "doc_offsets"):
            np.testing.assert_array_equal(getattr(one, name), getattr(other, name))


def test_damaged_caches_name_the_cache_and_the_fix(shards, tiny_tokenizer, monkeypatch):
    root, wiki, _ = shards
    d = build_cache(wiki[0], tiny_tokenizer, progress=False)
    mf = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({k: v for k, v in mf.items() if k != "counts"}))
    with pytest.raises(ValueError, match=f"corpus cache {d} is damaged.*lacks \\['counts'\\].*delete that directory"):
        CorpusCache.open(d)
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match=f"{d} is damaged .manifest.json is unreadable"):
        CorpusCache.open(d)
    (d / "manifest.json").write_text(json.dumps(mf))
    so = np.memmap(d / "sent_offsets.bin", dtype=np.int64, mode="r+")
    so[3], so[4] = so[4], so[3] - 1
    so.flush()
    with pytest.raises(ValueError, match=f"corpus cache {d} is damaged .sent_offsets.bin is not increasing"):
        PretrainDataset(CorpusCache.open(d), tiny_tokenizer, 64, "sop")
    shutil.rmtree(d)
    d = build_cache(wiki[0], tiny_tokenizer, progress=False)
    tokens = np.memmap(d / "tokens.bin", dtype=np.uint16, mode="r+")
    tokens[:] = 60000
    tokens.flush()
    ds = PretrainDataset(CorpusCache.open(d), tiny_tokenizer, 64, "mlm")
    with pytest.raises(ValueError, match=f"corpus cache {d} is damaged .token id 60000 >= vocab size 2000"):
        ds[0]


def test_corpus_changing_during_build_keeps_nothing(shards, tiny_tokenizer, monkeypatch):
    root, wiki, _ = shards
    real = corpus_mod._write_cache

    def appending(corpus, *a, **k):
        out = real(corpus, *a, **k)
        with open(corpus, "a", encoding="utf-8") as f:
            f.write("\n늦게 쓰인 문장\n")
        return out

    monkeypatch.setattr(corpus_mod, "_write_cache", appending)
    with pytest.raises(ValueError, match="changed while its cache was being built.*nothing was kept"):
        build_cache(wiki[0], tiny_tokenizer, progress=False)
    assert not [p for p in wiki[0].parent.iterdir() if ".cache" in p.name and not p.name.endswith(".lock")]


def test_build_and_info_cli(shards, tiny_tokenizer_dir, capsys):
    root, wiki, news = shards
    spec = f"{root / 'wiki'}:0.7,{root / 'news'}/*:0.3"
    assert corpus_mod._cli(["info", spec]) == 0
    assert "0 built" in capsys.readouterr().out
    assert corpus_mod._cli(["build", "--corpus_path", spec, "--tokenizer", str(tiny_tokenizer_dir),
                            "--num_workers", "1", "--no_progress"]) == 0
    assert "5 shard cache(s) ready" in capsys.readouterr().out
    os.utime(news[1], ns=(0, 10**18))  # a changed shard: its old cache is stale
    assert corpus_mod._cli(["info", spec, "--tokenizer", str(tiny_tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 built" in out and "missing; stale: n1.dat." in out and "(shard changed since)" in out
    assert f"{root / 'wiki'}: 0.7" in out
    assert corpus_mod._cli(["info", str(root / "nothing*")]) == 2
    assert "the pattern matches no file" in capsys.readouterr().err


def test_tokenizer_training_is_deterministic_and_takes_specs(shards, tmp_path):
    from data.tokenizer import main

    root = shards[0]
    for name in ("A", "B"):
        main(["train", "--input", str(root / "wiki"), "--input", f"{root / 'news'}/*", "--vocab_size", "1500",
              "--out", str(tmp_path / name), "--sample_lines", "2000"])
    for f in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):
        assert (tmp_path / "A" / f).read_bytes() == (tmp_path / "B" / f).read_bytes()
    vocab = (tmp_path / "A" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 1500 and vocab[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOD]"]
    tok = json.loads((tmp_path / "A" / "tokenizer.json").read_text())
    assert [t["content"] for t in tok["added_tokens"]] == vocab[:6]  # the "##c" pieces are not special


def _run(root, tok_dir, cfg, name, nproc, batch, extra=(), env=None):
    args = ["--model", str(cfg), "--model_name", name, "--output_dir", str(root / "out"),
            "--corpus_path", f"{root / 'wiki'},{root / 'news'}", *(["--tokenizer", str(tok_dir)] if tok_dir else []),
            "--max_seq_length", "64", "--train_batch_size", str(batch), "--num_steps", "4", "--save_steps", "2",
            "--logging_steps", "1", "--learning_rate", "5e-3", "--scheduler_num_steps", "100",
            "--num_workers", "0", "--no_progress", "--eval_fraction", "0.2", "--eval_steps", "2",
            "--eval_samples", "48", "--eval_batch_size", "8", *extra]
    return launch("train.py", args, nproc=nproc, env=env)


def _evals(run_dir):
    return [{k: v for k, v in r.items() if k.startswith("eval_")} for r in read_tsv(run_dir / "loss.tsv")
            if "eval_mlm_loss" in r]


def test_slow_build_outlasts_pg_timeout_and_validation_equal_on_1_and_2_processes(shards):
    """2 processes, no --tokenizer: one process trains the tokenizer, then rank 0 builds the largest
    shard, each for longer than the lowered process-group timeout, while the other waits (on the
    tokenizer's file lock, then by polling the caches), and the job trains and validates. The same
    weights validated by 1 process (an evaluate-only resume of step-4) give the 2-process values."""
    root, wiki, news = shards
    cfg = write_config(root / "tiny.json")
    biggest = max(wiki + news, key=lambda p: p.stat().st_size)
    two = _run(root, None, cfg, "two", 2, 4,
               env={"TRAINER_PG_TIMEOUT_S": "3", "CORPUS_TEST_BUILD_DELAY": f"{biggest.name}:6",
                    "TOKENIZER_TEST_TRAIN_DELAY": "4"})
    log = two.stdout + two.stderr
    assert "waiting for the tokenizer another process is training" in log
    # usually rank 1 waits for rank 0's delayed shard; when rank 0 comes late from the tokenizer's lock,
    # rank 1 takes that shard's lock first and rank 0 is the one that waits
    assert re.search(r"rank [01]: waiting for \d+ shard cache\(s\) being built by other processes", log), log[-3000:]
    assert (sorted(wiki)[0].parent / (sorted(wiki)[0].name + ".tokenizer") / "tokenizer.json").is_file()
    out = root / "out"
    e2 = _evals(out / "two")
    assert len(e2) == 2 and set(e2[0]) == {"eval_mlm_loss", "eval_mlm_acc", "eval_perplexity", "eval_sop_acc"}
    _run(root, None, cfg, "one", 1, 8, ["--checkpoint", str(out / "two" / "step-4")])
    e1 = json.loads((out / "one" / "eval.json").read_text())
    assert e1["step"] == 4
    for k, v in e2[-1].items():
        assert e1[k[len("eval_"):]] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_resumed_run_logs_the_same_validation(shards, tiny_tokenizer_dir, monkeypatch, capsys):
    from trainer.loop import main

    root = shards[0]
    cfg = write_config(root / "tiny.json")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    base = ["--model", str(cfg), "--output_dir", str(root / "out"), "--corpus_path", str(root / "wiki"),
            "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_length", "64", "--train_batch_size", "8",
            "--num_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--num_workers", "0", "--no_progress", "--eval_fraction", "0.25", "--eval_steps", "2",
            "--eval_samples", "40", "--eval_batch_size", "16", "--objective", "ict"]
    for argv in (["--model_name", "full"], ["--model_name", "resumed", "--checkpoint", str(root / "out/full/step-2")]):
        try:
            main(0, base + argv)
        except SystemExit as e:
            assert e.code in (0, None), capsys.readouterr()
    full, resumed = _evals(root / "out/full"), _evals(root / "out/resumed")
    assert set(full[0]) == {"eval_mlm_loss", "eval_mlm_acc", "eval_perplexity", "eval_ict_acc"}
    assert len(full) == 2 and resumed == full[1:]
