"""KLUE NER: file reading, character <-> token alignment round trip (plain and mecab tokenizers,
windows), metrics against hand-computed values and an independent strict-entity count, CRF
Viterbi against brute force, the task from a tiny pretrain (loss falls, 2 processes = 1), and
bad input."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from data.metrics import ner_scores
from data.ner import NERDataset, NERSentence, align, clean_tags, label_list, load_klue_ner, to_chars, to_tokens
from tests.pretrain_util import COMMON, KLUE, tiny_pretrain
from tests.test_tasks import assert_falls, eval_line, train_losses
from tests.trainer_util import launch

NER = KLUE / "ner_train.tsv"
pytestmark = pytest.mark.skipif(not NER.exists(), reason="../shared/data/klue not available")


@pytest.fixture(scope="module")
def sentences():
    return load_klue_ner(NER)[:300]


@pytest.fixture(scope="module")
def mecab_tokenizer(tiny_corpus, tmp_path_factory):
    from data.tokenizer import train_tokenizer

    return train_tokenizer([tiny_corpus], vocab_size=2000, out_dir=tmp_path_factory.mktemp("mecab_tok"), morpheme="mecab")


def test_reads_klue_layout(sentences):
    s = sentences[0]
    assert s.guid == "klue-ner-v1_dev_00002-wikitree"
    assert s.text.startswith("수학 A형의 1등급 커트라인은") and len(s.text) == len(s.tags)
    assert s.tags[s.text.index("1등급"):][:3] == ["B-QT", "I-QT", "I-QT"]
    assert label_list(load_klue_ner(NER)) == ["O"] + [f"{p}-{t}" for t in ("DT", "LC", "OG", "PS", "QT", "TI")
                                                      for p in "BI"]


def test_reads_word_level_files(tmp_path):
    """CoNLL-style word-per-line files (IOB2, IOB1, BIOES; tab or space columns; -DOCSTART-) and Naver NER's
    index/word/tag rows give the same character tags as the KLUE layout of the same sentence."""
    want_text = "이순신 장군은 1545년 서울 건천동에서 태어났다"
    want = ["B-PS", "I-PS", "I-PS", "O", "O", "O", "O", "O", "B-DT", "I-DT", "I-DT", "I-DT", "I-DT", "O",
            "B-LC", *["I-LC"] * 7, *["O"] * 5]                 # 서울 건천동에서: the word's tag covers 에서
    words = ["이순신", "장군은", "1545년", "서울", "건천동에서", "태어났다"]
    layouts = {
        "iob2.tsv": ["B-PS", "O", "B-DT", "B-LC", "I-LC", "O"],
        "iob1.txt": ["I-PS", "O", "I-DT", "I-LC", "I-LC", "O"],
        "bioes.tsv": ["S-PS", "O", "S-DT", "B-LC", "E-LC", "O"],
    }
    for name, tags in layouts.items():
        sep = " " if name.endswith(".txt") else "\t"
        body = "".join(f"{w}{sep}{t}\n" for w, t in zip(words, tags))
        (tmp_path / name).write_text(f"-DOCSTART- O\n\n{body}\n{body}", encoding="utf-8")
    naver = "".join(f"{i}\t{w}\t{t}\n" for i, (w, t) in
                    enumerate(zip(words, ["PS_B", "-", "DT_B", "LC_B", "LC_I", "-"]), start=1))
    (tmp_path / "naver.tsv").write_text(naver, encoding="utf-8")
    for name in [*layouts, "naver.tsv"]:
        got = load_klue_ner(tmp_path / name)
        assert [(x.text, x.tags) for x in got] == [(want_text, want)] * (1 if name == "naver.tsv" else 2), name
    # the source's word tags -> character tags: the entity's inner space is I-LC (as KLUE tags it)
    assert want[want_text.index("서울") + 2] == "I-LC"
    bad = tmp_path / "bad.tsv"
    bad.write_text("이순신\tPERSON\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:1: .*'PERSON' is not a NER tag"):
        load_klue_ner(bad)
    klue_damaged = tmp_path / "damaged.tsv"   # a KLUE file with one multi-character line stays a KLUE error
    klue_damaged.write_text("## g1\t<이순신:PS>\n이\tB-PS\n \tO\n순신\tI-PS\n", encoding="utf-8")
    with pytest.raises(ValueError, match="damaged.tsv:4: '순신.+I-PS' is not '<one character><TAB><tag>'"):
        load_klue_ner(klue_damaged)


@pytest.mark.parametrize("kind", ["plain", "mecab"])
def test_alignment_round_trip(kind, sentences, tiny_tokenizer, mecab_tokenizer):
    """characters -> (token, slot) tags -> characters gives the gold tags for every sentence, also
    through windows of 14 tokens every 7 (most sentences are split), reading each character from
    the window where it has the most context."""
    tok = tiny_tokenizer if kind == "plain" else mecab_tokenizer
    boundary_inside_token = 0
    for s in sentences:
        ids, offsets = tok.encode_with_offsets(s.text)
        for a, b in offsets:        # offsets refer to the original text (mecab splits it first)
            assert 0 <= a < b <= len(s.text) and not s.text[a:b].isspace()
        al = align(s.text, offsets)
        assert [c for c, _, _ in al] == [i for i, ch in enumerate(s.text) if not ch.isspace()]
        assert clean_tags(s.text, to_chars(to_tokens(s.tags, al), al, len(s.text))) == clean_tags(s.text, s.tags)
        boundary_inside_token += any(len({s.tags[i] for i in range(a, b)} - {"O"}) and s.tags[a] != s.tags[b - 1]
                                     for a, b in offsets)
    if kind == "plain":  # the case first-character labelling cannot represent is present in the slice
        assert boundary_inside_token > 10
    ds = NERDataset(sentences, tok, label_list(sentences), max_seq_length=16, stride=7)
    assert ds.num_split > len(sentences) // 2 and ds.num_lossy == 0
    gold_windows = [w.char_labels for w in ds.windows]
    for s, tags in zip(sentences, ds.sentence_tags(gold_windows)):
        assert clean_tags(s.text, tags) == clean_tags(s.text, s.tags)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["char_index"].shape == batch["char_labels"].shape == batch["char_mask"].shape
    assert int(batch["char_index"].max()) < batch["input_ids"].shape[1] * ds.slots


def _entities(seq):
    """Strict IOB2 entities (type, start, end): a B-X and the I-X that follow it."""
    out, i = set(), 0
    while i < len(seq):
        if seq[i].startswith("B-"):
            j = i + 1
            while j < len(seq) and seq[j] == "I-" + seq[i][2:]:
                j += 1
            out.add((seq[i][2:], i, j))
            i = j
        else:
            i += 1
    return out


def test_metrics_hand_computed_and_against_seqeval():
    gold = [["B-PS", "I-PS", "O", "B-LC", "I-LC"], ["O", "B-DT", "O"]]
    pred = [["B-PS", "I-PS", "O", "B-OG", "I-OG"], ["O", "B-DT", "I-DT"]]
    r = ner_scores(gold, pred, ["O", "B-DT", "I-DT", "B-LC", "I-LC", "B-OG", "I-OG", "B-PS", "I-PS"])
    # entities: gold {PS, LC, DT}, predicted {PS, OG, DT(2 chars)}: only PS is exact
    assert r["entity_precision"] == pytest.approx(100 / 3) and r["entity_recall"] == pytest.approx(100 / 3)
    assert r["entity_f1"] == pytest.approx(100 / 3)
    assert r["entity_f1/PS"] == 100 and r["entity_f1/LC"] == 0 and r["entity_f1/DT"] == 0
    assert r["entity_macro_f1"] == pytest.approx(100 / 4)   # PS 100, LC 0, OG 0, DT 0
    # characters: B-PS 1, I-PS 1, B-DT 1, I-DT 0 (1 predicted, 0 gold), B-LC/I-LC/B-OG/I-OG 0 -> 3/8
    assert r["char_f1"] == pytest.approx(100 * 3 / 8)

    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PS", "I-PS", "B-LC", "I-LC"]
    for _ in range(20):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(8)]
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
        r = ner_scores(gold, pred)
        assert r["entity_f1"] == pytest.approx(100 * f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0))
        g_ent = {(k,) + e for k, s in enumerate(gold) for e in _entities(s)}
        p_ent = {(k,) + e for k, s in enumerate(pred) for e in _entities(s)}
        hit = len(g_ent & p_ent)
        expected = 0.0 if not hit else 200 * hit / (len(g_ent) + len(p_ent))
        assert r["entity_f1"] == pytest.approx(expected)


@torch.no_grad()
def test_crf_viterbi_matches_brute_force():
    from models import build_model, load_config

    torch.manual_seed(0)
    cfg = load_config("tests/configs/tiny_transformer.json")
    model = build_model(cfg, "ner", num_labels=3, slots=4, crf=True).eval()
    with torch.no_grad():
        model.crf.transitions.normal_(0, 2.0)
        model.crf.start_transitions.normal_(0, 2.0)
        model.crf.end_transitions.normal_(0, 2.0)
        model.tag_head.classifier.weight.normal_(0, 1.0)
    ids = torch.randint(6, cfg.vocab_size, (2, 6))
    index = torch.tensor([[4, 5, 8, 12, 13], [4, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, char_index=index, char_mask=mask, decode=True)
    em, crf = out["char_logits"], model.crf
    for b in range(2):
        n = int(mask[b].sum())

        def score(path):
            s = crf.start_transitions[path[0]] + em[b, 0, path[0]] + crf.end_transitions[path[-1]]
            for i in range(1, n):
                s = s + crf.transitions[path[i - 1], path[i]] + em[b, i, path[i]]
            return float(s.detach())

        best = max(itertools.product(range(3), repeat=n), key=score)
        assert out["char_tags"][b, :n].tolist() == list(best)
        assert out["char_tags"][b, n:].tolist() == [0] * (5 - n)
    # the loss is the negative log-likelihood per character (all paths enumerated for the first row)
    labels = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 1, -100, -100]])
    with torch.no_grad():
        em = em.detach()
        loss = model(input_ids=ids[:1], char_index=index[:1], char_mask=mask[:1], char_labels=labels[:1])["tag_loss"]
    em0 = em[0:1]
    paths = list(itertools.product(range(3), repeat=5))

    def total(p):
        s = crf.start_transitions[p[0]] + em0[0, 0, p[0]] + crf.end_transitions[p[-1]]
        return s + sum(crf.transitions[p[i - 1], p[i]] + em0[0, i, p[i]] for i in range(1, 5))

    log_z = torch.logsumexp(torch.stack([total(p) for p in paths]), 0)
    assert float(loss) == pytest.approx(float(log_z - total((0, 1, 2, 1, 0))) / 5, rel=1e-5)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    return tiny_pretrain(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


def run_ner(env, name, extra, nproc=1, check=True):
    return launch("train.py", ["--model_name", name, "--model", str(env.cfg), "--output_dir", str(env.out), *COMMON,
                               "--train_mode", "ner", "--train_file", str(NER), "--checkpoint", str(env.pre / "final"),
                               "--max_train_examples", "48", "--max_eval_examples", "40", "--doc_stride", "32",
                               "--num_steps", "16", *extra], nproc=nproc, check=check)


def test_ner_two_processes_equal_one(env):
    """From the tiny pretrain: the loss falls; 2 processes x 4 windows train and evaluate like 1 x 8
    (the loss is a mean of per-window means); predictions.tsv holds every held-out sentence."""
    two = run_ner(env, "ner2", ["--train_batch_size", "4"], nproc=2)
    one = run_ner(env, "ner1", ["--train_batch_size", "8"])
    l2, l1 = train_losses(env.out / "ner2"), train_losses(env.out / "ner1")
    assert_falls(l1, "ner")
    assert l2 == pytest.approx(l1, abs=1e-4)
    e2, e1 = eval_line(two.stdout), eval_line(one.stdout)
    assert e2 == pytest.approx(e1, abs=1e-3)
    saved = json.loads((env.out / "ner1" / "eval.json").read_text())
    assert {"entity_f1", "char_f1", "entity_macro_f1", "entity_f1/PS"} <= set(saved)
    predicted = load_klue_ner(env.out / "ner1" / "predictions.tsv")
    from data.pairs import hash_split

    held = hash_split(load_klue_ner(NER), lambda s: s.guid, 0.1)[1][:40]
    assert [p.guid for p in predicted] == [s.guid for s in held] and [p.text for p in predicted] == [s.text for s in held]

    # the checkpoint records its tags: evaluated alone on a file with fewer entity types (its other
    # entities untagged), the model keeps its tag ids and predicts what it predicted in training
    from types import SimpleNamespace

    from trainer.tasks.ner import write_predictions

    ps_only = [NERSentence(s.guid, s.text, [t if t.endswith("-PS") else "O" for t in s.tags]) for s in held]
    write_predictions(SimpleNamespace(sentences=ps_only), [s.tags for s in ps_only], env.out / "ps_only.tsv")
    launch("train.py", ["--model_name", "ner1_ps", "--model", str(env.cfg), "--output_dir", str(env.out), *COMMON,
                        "--train_mode", "ner", "--eval_file", str(env.out / "ps_only.tsv"), "--checkpoint",
                        str(env.out / "ner1" / "final"), "--doc_stride", "32", "--num_steps", "0"])
    again = load_klue_ner(env.out / "ner1_ps" / "predictions.tsv")
    assert [s.tags for s in again] == [s.tags for s in predicted]


@pytest.mark.slow
def test_ner_crf_loss_falls(env):
    proc = run_ner(env, "nercrf", ["--crf", "--train_batch_size", "8"])
    assert "+ CRF" in proc.stdout
    assert_falls(train_losses(env.out / "nercrf"), "ner --crf")
    assert 0 <= eval_line(proc.stdout)["char_f1"] <= 100


def test_bad_ner_input(env, tmp_path, monkeypatch, capsys, tiny_corpus):
    """A TSV that is not KLUE NER, or a tokenizer that is not the checkpoint's, stop the run
    (trainer.loop.main, in this process) before it writes anything."""
    from tests.test_bad_input import _run_main

    base = ["--model", str(env.cfg), "--output_dir", str(tmp_path), *COMMON, "--train_mode", "ner",
            "--checkpoint", str(env.pre / "final"), "--num_steps", "2"]
    nsmc = KLUE.parent / "nsmc" / "sentiment_test.tsv"
    code, err = _run_main(["--model_name", "bad", "--train_file", str(nsmc), *base], monkeypatch, capsys)
    assert code and "sentiment_test.tsv:1: " in err and "'label' is not a NER tag" in err and "KLUE NER TSV" in err
    assert not (tmp_path / "bad").exists()
    from data.tokenizer import train_tokenizer

    train_tokenizer([tiny_corpus], vocab_size=1999, out_dir=tmp_path / "tok")
    code, err = _run_main(["--model_name", "bad2", "--train_file", str(NER), "--tokenizer", str(tmp_path / "tok"),
                           *base], monkeypatch, capsys)
    assert code and "is not the tokenizer --checkpoint" in err
    assert not (tmp_path / "bad2").exists()
