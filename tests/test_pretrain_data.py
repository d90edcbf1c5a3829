import numpy as np
import pytest
import torch

from data.corpus import load_or_build
from data.pretrain import PretrainDataset
from data.tokenizer import train_tokenizer

NUM_DOCS = 15
DOC_WORDS = [chr(0xAC00 + 28 * d) for d in range(NUM_DOCS)]      # 가 개 갸 ...: one per document
POS_WORDS = [chr(0xC544 + 28 * k) for k in range(30)]            # 아 애 야 ...: sentence position


@pytest.fixture(scope="module")
def nsmc(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("nsmc")
    p = d / "c.dat"
    p.write_bytes(tiny_corpus.read_bytes())
    return load_or_build(p, tiny_tokenizer, progress=False), tiny_tokenizer


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Document d, sentence k = "<doc word d> <position word k>", 1 to 30 sentences per document."""
    d = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    sizes = [1] + list(rng.integers(2, 30, NUM_DOCS - 1))
    docs = ["\n".join(f"{DOC_WORDS[i]} {POS_WORDS[k]}" for k in range(n)) for i, n in enumerate(sizes)]
    p = d / "syn.dat"
    p.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer([p], vocab_size=200, out_dir=d / "tok")
    cache = load_or_build(p, tok, progress=False)
    assert cache.manifest["counts"]["tokens"] == 2 * sum(sizes)
    doc_of = {tok.token_to_id(w): i for i, w in enumerate(DOC_WORDS)}
    pos_of = {tok.token_to_id(w): k for k, w in enumerate(POS_WORDS)}
    return cache, tok, doc_of, pos_of, sizes


def sentences(ids, doc_of, pos_of):
    """(doc, position) pairs of a segment written as doc/pos token pairs."""
    ids = [int(i) for i in ids]
    assert len(ids) % 2 == 0
    return [(doc_of[ids[j]], pos_of[ids[j + 1]]) for j in range(0, len(ids), 2)]


def test_masking_statistics(nsmc):
    cache, tok = nsmc
    ds = PretrainDataset(cache, tok, 128, "mlm", seed=1)
    plain = PretrainDataset(cache, tok, 128, "mlm", mlm_probability=0.0, seed=1)
    special = tok.is_special()
    n_cand = n_sel = n_mask = n_same = n_rand = 0
    for i in range(0, len(ds), max(1, len(ds) // 300)):
        x, orig = ds[i], plain[i]["input_ids"]
        lab, inp = x["mlm_labels"], x["input_ids"]
        sel = lab != -100
        assert not special[orig[sel]].any()                       # specials never masked
        np.testing.assert_array_equal(lab[sel], orig[sel])         # labels are the original tokens
        np.testing.assert_array_equal(inp[~sel], orig[~sel])       # nothing else changes
        n_cand += (~special[orig]).sum()
        n_sel += sel.sum()
        n_mask += (inp[sel] == tok.mask_id).sum()
        n_same += (inp[sel] == orig[sel]).sum()
        rand = sel & (inp != tok.mask_id) & (inp != orig)
        n_rand += rand.sum()
        assert not special[inp[rand]].any()                        # random tokens are real tokens
    assert abs(n_sel / n_cand - 0.15) < 0.01
    assert abs(n_mask / n_sel - 0.8) < 0.03
    assert abs(n_rand / n_sel - 0.1) < 0.02
    assert abs(n_same / n_sel - 0.1) < 0.02


def test_whole_word_masking(nsmc):
    cache, tok = nsmc
    ds = PretrainDataset(cache, tok, 128, "mlm", whole_word_mask=True, seed=2)
    plain = PretrainDataset(cache, tok, 128, "mlm", mlm_probability=0.0, seed=2)
    ws = tok.is_word_start()
    n_sel = n_cand = 0
    for i in range(0, len(ds), max(1, len(ds) // 200)):
        orig, sel = plain[i]["input_ids"], ds[i]["mlm_labels"] != -100
        # a continuation piece is selected exactly when the piece before it is (same word); full rows
        # may start inside a word, whose pieces after [CLS] are then a word of their own
        cont = ~ws[orig][1:] & ~tok.is_special()[orig][:-1]
        assert (sel[1:][cont] == sel[:-1][cont]).all()
        n_sel += sel.sum()
        n_cand += (~tok.is_special()[orig]).sum()
    assert abs(n_sel / n_cand - 0.15) < 0.02


def test_deterministic_in_seed_epoch_index(nsmc):
    cache, tok = nsmc
    a, b = PretrainDataset(cache, tok, 64, "sop", seed=3), PretrainDataset(cache, tok, 64, "sop", seed=3)
    for k in a[7]:
        np.testing.assert_array_equal(a[7][k], b[7][k])
    b.set_epoch(1)
    assert not np.array_equal(a[7]["mlm_labels"], b[7]["mlm_labels"])
    c = PretrainDataset(cache, tok, 64, "sop", seed=4)
    assert not np.array_equal(a[7]["mlm_labels"], c[7]["mlm_labels"])


def test_sop_pairs_stay_in_one_document(synthetic):
    cache, tok, doc_of, pos_of, sizes = synthetic
    ds = PretrainDataset(cache, tok, 24, "sop", mlm_probability=0.0)
    assert ds.stats["dropped_short"] == 0 and len(ds) > 20
    labels = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x = ds[i]
            ids, tt = x["input_ids"], x["token_type_ids"]
            assert len(ids) <= 24 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
            sep = int(np.flatnonzero(ids == tok.sep_id)[0])
            a, b = ids[1:sep], ids[sep + 1:-1]
            assert (tt[:sep + 1] == 0).all() and (tt[sep + 1:] == 1).all()
            if len(a) % 2 or len(b) % 2:  # a one-sentence document split inside its sentence
                assert len(a) + len(b) == 2
                continue
            sa, sb = sentences(a, doc_of, pos_of), sentences(b, doc_of, pos_of)
            assert len({d for d, _ in sa + sb}) == 1                 # never across documents
            pa, pb = [k for _, k in sa], [k for _, k in sb]
            assert pa == sorted(pa) and pb == sorted(pb)
            assert (max(pa) < min(pb)) == (x["sop_label"] == 0)     # label 1 = swapped
            labels.append(x["sop_label"])
    assert abs(np.mean(labels) - 0.5) < 0.06


def test_mlm_packs_across_documents_with_eod(synthetic):
    cache, tok, doc_of, pos_of, sizes = synthetic
    ds = PretrainDataset(cache, tok, 32, "mlm", mlm_probability=0.0, mlm_separator="eod", mlm_packing="units")
    n_tokens = n_eod = 0
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert len(ids) <= 32
        body = ids[1:-1]
        eod = np.flatnonzero(body == tok.eod_id)
        n_eod += len(eod)
        for seg in np.split(body, eod):
            seg = seg[seg != tok.eod_id]
            if len(seg):
                assert len({d for d, _ in sentences(seg, doc_of, pos_of)}) == 1
        n_tokens += (body != tok.eod_id).sum()
    assert n_eod == NUM_DOCS and n_tokens == cache.manifest["counts"]["tokens"]
    assert len(ds) < cache.num_sentences / 5  # packed, not one sentence per sample


@pytest.mark.parametrize("separator", ["eod", "sep", "wrap"])
@pytest.mark.parametrize("packing", ["units", "full"])
def test_mlm_layouts(synthetic, separator, packing):
    """Every mlm layout renders each sentence once, in corpus order, with its separators; full packing
    fills every row but a run's last to max_seq_length, greedy packing never cuts a sentence."""
    cache, tok, doc_of, pos_of, sizes = synthetic
    L = 32
    ds = PretrainDataset(cache, tok, L, "mlm", mlm_probability=0.0, mlm_separator=separator, mlm_packing=packing)
    special = {tok.cls_id, tok.sep_id, tok.eod_id}
    rows = [ds[i]["input_ids"] for i in range(len(ds))]
    assert all(len(r) <= L for r in rows)
    if packing == "full":
        assert all(len(r) == L for r in rows[:-1])
    stream = []
    for r in rows:
        if separator != "wrap":
            assert r[0] == tok.cls_id
            r = r[1:]
        if separator == "eod":
            assert r[-1] == tok.sep_id
            r = r[:-1]
        stream += [int(t) for t in r]
    if packing == "units":  # rows end at a sentence boundary: the stream is the plain concatenation
        words = [t for t in stream if t not in special]
        assert sentences(words, doc_of, pos_of) == [(d, k) for d, n in enumerate(sizes) for k in range(n)]
    expect = []
    for d, n in enumerate(sizes):
        for k in range(n):
            unit = [tok.token_to_id(DOC_WORDS[d]), tok.token_to_id(POS_WORDS[k])]
            expect += ([tok.cls_id] if separator == "wrap" else []) + unit + ([tok.sep_id] if separator != "eod" else [])
        expect.append(tok.eod_id)
    assert stream == expect
    if packing == "full":  # the same rows as cutting that stream every budget tokens
        assert len(ds) == -(-len(expect) // (L - (separator != "wrap") - (separator == "eod")))


def test_ict_queries_and_passages(synthetic):
    cache, tok, doc_of, pos_of, sizes = synthetic
    ds = PretrainDataset(cache, tok, 24, "ict", mlm_probability=0.0)
    assert ds.stats["units_without_context"] >= 1  # the one-sentence document
    kept = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x = ds[i]
            q = sentences(x["query_input_ids"][1:-1], doc_of, pos_of)
            p = sentences(x["passage_input_ids"][1:-1], doc_of, pos_of)
            assert len(q) == 1 and len(p) >= 1 and len(x["passage_input_ids"]) <= 24
            assert {d for d, _ in p} == {q[0][0]}                    # context from the query's document
            assert (q[0] in p) == x["query_kept"]
            kept.append(x["query_kept"])
    assert abs(np.mean(kept) - 0.1) < 0.02


def test_overlong_sentences_are_split_and_counted(nsmc):
    cache, tok = nsmc
    ds = PretrainDataset(cache, tok, 16, "mlm", mlm_probability=0.0)
    assert ds.stats["split_sentences"] > 0
    total = 0
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert len(ids) <= 16
        total += (~np.isin(ids, [tok.cls_id, tok.sep_id, tok.eod_id])).sum()
    assert total == cache.manifest["counts"]["tokens"]  # every token is used once
    sop = PretrainDataset(cache, tok, 16, "sop")
    assert max(len(sop[i]["input_ids"]) for i in range(len(sop))) <= 16


@pytest.mark.parametrize("objective", ["sop", "mlm", "ict"])
def test_collate_and_dataloader(nsmc, objective):
    cache, tok = nsmc
    ds = PretrainDataset(cache, tok, 100, objective)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=ds.collate, num_workers=2 if objective == "sop" else 0)
    batch = next(iter(loader))
    prefixes = ["query_", "passage_"] if objective == "ict" else [""]
    for p in prefixes:
        ids, am, lab = batch[p + "input_ids"], batch[p + "attention_mask"], batch[p + "mlm_labels"]
        assert ids.dtype == am.dtype == lab.dtype == torch.int64
        L = ids.shape[1]
        assert L <= 100 and (L % 8 == 0 or L == 100) and L - am.sum(1).max() < 8
        assert (ids[am == 0] == tok.pad_id).all() and (lab[am == 0] == -100).all()
        assert ids.shape == am.shape == lab.shape
    if objective == "sop":
        assert batch["sop_labels"].shape == (8,) and batch["token_type_ids"].shape == batch["input_ids"].shape


def test_bad_arguments(nsmc, synthetic):
    cache, tok = nsmc
    with pytest.raises(ValueError, match="objective"):
        PretrainDataset(cache, tok, 128, "nsp")
    with pytest.raises(ValueError, match="built with tokenizer"):
        PretrainDataset(cache, synthetic[1], 128)
    with pytest.raises(ValueError, match="max_seq_length"):
        PretrainDataset(cache, tok, 4)


def test_a_corpus_without_blank_lines(tmp_path, tiny_tokenizer_dir):
    """A corpus of one document per line without blank lines is one document: a held-out split finds no
    whole document and says why; a run of sop over it warns that the blank lines are missing."""
    from data.tokenizer import KoTokenizer
    from tests.trainer_util import launch, write_config

    words = ["영화", "정말", "재미있다", "배우", "연기", "최고"]
    corpus = tmp_path / "lines.dat"
    corpus.write_text("".join(f"{words[i % 6]} {words[(i // 6) % 6]} {words[(i // 36) % 6]}\n" for i in range(10_000)),
                      encoding="utf-8")
    tok = KoTokenizer.load(tiny_tokenizer_dir)
    cache = load_or_build(corpus, tok, progress=False)
    with pytest.raises(ValueError, match=r"the whole corpus has 1 document\(s\) in 10000 lines, and documents are held "
                                         r"out whole: documents are separated by blank lines"):
        PretrainDataset(cache, tok, 64, "sop", split="eval", eval_fraction=0.1)
    proc = launch("train.py", ["--model_name", "lines", "--model", str(write_config(tmp_path / "tiny.json")),
                               "--output_dir", str(tmp_path / "out"), "--corpus_path", str(corpus),
                               "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_length", "32", "--train_batch_size", "4",
                               "--num_steps", "1", "--num_workers", "0", "--no_progress", "--save_steps", "0"])
    assert "has 1 document(s) in 10000 lines: documents are separated by blank lines" in proc.stdout


def _reference_units(so, do, piece, extra):
    """The units and mlm costs as first computed (whole-shard temporaries, ~66 bytes per sentence
    at the index build's peak): `_units` and `_rendered_cost` must give exactly these."""
    lengths = np.diff(so)
    n_pieces = np.maximum(1, -(-lengths // piece))
    first_unit = np.concatenate([[0], np.cumsum(n_pieces)])
    within = np.arange(first_unit[-1]) - np.repeat(first_unit[:-1], n_pieces)
    U = np.concatenate([np.repeat(so[:-1], n_pieces) + within * piece, so[-1:]])
    doc_units = first_unit[do]
    is_end = np.zeros(first_unit[-1], dtype=bool)
    is_end[doc_units[1:] - 1] = True
    cum = np.concatenate([[0], np.cumsum(np.diff(U) + extra + is_end)])
    return (U, is_end, doc_units, {"sentences": len(lengths), "split_sentences": int((n_pieces > 1).sum()),
                                   "extra_pieces": int((n_pieces - 1).sum())}), cum


def test_lean_units_equal_the_reference():
    """Random shards (sentences of 0 to 3 rows' length, documents of 1 to 30 sentences, a
    one-sentence shard): the same unit offsets, flags, document units, counts and mlm costs, with
    the same dtypes, as the whole-array reference."""
    from data.pretrain import _rendered_cost, _units

    rng = np.random.default_rng(7)
    for trial in range(20):
        S = int(rng.integers(1, 4000)) if trial else 1
        piece = int(rng.choice([16, 64, 128])) - 3
        lengths = np.where(rng.random(S) < 0.05, rng.integers(piece, 3 * piece, S), rng.integers(0, piece // 2, S))
        so = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cuts = np.unique(rng.integers(1, S, max(0, S // int(rng.integers(1, 30))))) if S > 1 else []
        do = np.concatenate([[0], cuts, [S]]).astype(np.int64)
        got = _units(so, do, piece)
        want, want_cum = _reference_units(so, do, piece, extra=trial % 3)
        assert got[3] == want[3]
        for g, w in zip(got[:3], want[:3]):
            assert g.dtype == w.dtype and np.array_equal(g, w), trial
        cum = _rendered_cost(got[0], got[1], trial % 3)
        assert cum.dtype == want_cum.dtype and np.array_equal(cum, want_cum), trial
