"""Tokenizers of transformers folders (not trained here): klue/bert-base's and Google's BERT layout
([PAD] 0, [unused*], [UNK] 100, [CLS] 101, ...), ModernBERT's byte-level BPE with its special tokens
at the end, RoBERTa's <s> </s> names. They load, encode as transformers' AutoTokenizer does, mask
and fine-tune, and export with the model."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.tokenizer import KoTokenizer, TokenizerError, check_vocab_size
from tests.trainer_util import launch

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NSMC_TRAIN = SHARED / "nsmc" / "sentiment_train.tsv"
GOOGLE_SPECIALS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = ["태어나 처음으로 가슴아리는 영화였다. 20년이상 지났지만..", "아 더빙.. 진짜 짜증나네요 목소리",
         "Hello WORLD 漢字 😀 ㅋㅋㅋ", ""]


def _lines(corpus: Path) -> list[str]:
    return [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def google_bert_dir(tiny_corpus, tmp_path_factory) -> Path:
    """A WordPiece tokenizer in the layout of Google's and klue/bert-base's vocab.txt, saved by
    transformers' BertTokenizerFast (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    out = tmp_path_factory.mktemp("google_bert")
    transformers.BertTokenizerFast(tokenizer_object=_wordpiece(tiny_corpus, GOOGLE_SPECIALS), do_lower_case=False,
                                   strip_accents=False).save_pretrained(out)
    return out


def _wordpiece(corpus: Path, specials: list[str]):
    """A BERT-style WordPiece tokenizer (no lowercasing) trained on `corpus`, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_lines(corpus), trainers.WordPieceTrainer(
        vocab_size=1500, special_tokens=specials, show_progress=False))
    return tok


@pytest.fixture(scope="module")
def bpe_dir(tiny_corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer as ModernBERT's: special tokens after the merges' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(tiny_corpus), trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    out = tmp_path_factory.mktemp("bpe")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                         pad_token="[PAD]", mask_token="[MASK]").save_pretrained(out)
    return out


def _hf_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [hf(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_google_bert_layout_reads_and_encodes_as_transformers(google_bert_dir, tiny_corpus):
    tok = KoTokenizer.load(google_bert_dir)
    assert tok.foreign
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.eod_id == tok.sep_id  # no [EOD]: documents end with [SEP]
    special = tok.is_special()
    assert special[:104].all() and not special[104:].any()
    toks = tok.convert_ids_to_tokens(range(tok.vocab_size))
    assert list(tok.is_word_start()) == [not t.startswith("##") for t in toks]
    assert [tok.encode(t) for t in TEXTS] == _hf_ids(google_bert_dir, TEXTS)
    # encode_batch's fast paths (normalizer bypass, joined encoding) give the same ids on a real corpus
    lines = _lines(tiny_corpus)
    first = tok.encode_batch(lines[:2000])
    tok.prepare_batch_encoding()
    assert tok._bypass  # BertNormalizer without lowercasing qualifies
    assert tok.encode_batch(lines[:2000]) == first == [tok.encode(t) for t in lines[:2000]]
    flat, lengths = tok.encode_batch_flat(lines[:2000])
    assert flat.tolist() == [i for ids in first for i in ids] and lengths.tolist() == [len(ids) for ids in first]


def test_byte_level_bpe_reads_and_encodes_as_transformers(bpe_dir):
    tok = KoTokenizer.load(bpe_dir)
    n = tok.vocab_size
    assert tok.foreign and (tok.unk_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == tuple(range(n - 5, n))
    assert tok.is_special().sum() == 5 and tok.is_special()[n - 5:].all()
    toks = tok.convert_ids_to_tokens(range(n))
    assert list(tok.is_word_start()) == [t.startswith("\u0120") for t in toks]
    assert [tok.encode(t) for t in TEXTS] == _hf_ids(bpe_dir, TEXTS)
    ids, offsets = tok.encode_with_offsets(TEXTS[0])
    assert ids == tok.encode(TEXTS[0]) and offsets[0][0] == 0 and offsets[-1][1] == len(TEXTS[0])


def test_truncation_padding_and_bpe_dropout_of_a_file_are_off(bpe_dir, tmp_path):
    """A transformers tokenizer.json may carry truncation (512), padding or BPE dropout: corpus lines
    would be cut, padded or encoded differently each time. They are switched off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok.enable_truncation(4)
    tok.enable_padding(length=64, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.model.dropout = 0.5
    (tmp_path / "t").mkdir()
    tok.save(str(tmp_path / "t" / "tokenizer.json"))
    assert json.loads((tmp_path / "t" / "tokenizer.json").read_text())["model"]["dropout"] == 0.5
    plain, noisy = KoTokenizer.load(bpe_dir), KoTokenizer.load(tmp_path / "t")
    texts = TEXTS[:2] * 3
    assert [noisy.encode(t) for t in texts] == [plain.encode(t) for t in texts] == noisy.encode_batch(texts)
    assert len(noisy.encode(TEXTS[0])) > 4


def test_roles_by_name_without_a_map_and_missing_roles_refused(google_bert_dir, tmp_path):
    raw = json.loads((google_bert_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = raw["model"]["vocab"]
    renamed = {"[PAD]": "<pad>", "[UNK]": "<unk>", "[CLS]": "<s>", "[SEP]": "</s>", "[MASK]": "<mask>"}
    for old, new in renamed.items():
        vocab[new] = vocab.pop(old)
    for t in raw["added_tokens"]:
        t["content"] = renamed.get(t["content"], t["content"])
    raw["post_processor"] = None
    raw["model"]["unk_token"] = "<unk>"
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    tok = KoTokenizer.load(tmp_path / "roberta")  # RoBERTa's names, no special_tokens_map.json
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)

    # a map naming other tokens wins over the names
    (tmp_path / "roberta" / "special_tokens_map.json").write_text(json.dumps({"mask_token": {"content": "[unused7]"}}))
    assert KoTokenizer.load(tmp_path / "roberta").mask_id == 8

    vocab["<masked>"] = vocab.pop("<mask>")
    for t in raw["added_tokens"]:
        t["content"] = "<masked>" if t["content"] == "<mask>" else t["content"]
    (tmp_path / "no_mask").mkdir()
    (tmp_path / "no_mask" / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"no mask \(\[MASK\] or <mask>\) token.*special_tokens_map.json"):
        KoTokenizer.load(tmp_path / "no_mask")


def test_our_tokenizer_keeps_its_fingerprint(tiny_tokenizer):
    """Corpus caches are named by the fingerprint: reading foreign tokenizers must not rename ours."""
    h = hashlib.sha256(tiny_tokenizer.tokenizer.to_str().encode())
    h.update(json.dumps({"morpheme": None}).encode())
    assert not tiny_tokenizer.foreign and tiny_tokenizer.fingerprint == h.hexdigest()[:16]


def test_foreign_tokenizer_pickles_saves_and_sizes(google_bert_dir, bpe_dir, tmp_path):
    tok = KoTokenizer.load(bpe_dir)
    again = pickle.loads(pickle.dumps(tok))  # DataLoader workers
    assert (again.roles, again.fingerprint) == (tok.roles, tok.fingerprint)
    tok.save(tmp_path / "saved")
    saved = KoTokenizer.load(tmp_path / "saved")
    assert (saved.roles, saved.fingerprint) == (tok.roles, tok.fingerprint)
    assert KoTokenizer.load(google_bert_dir).fingerprint != tok.fingerprint
    # a transformers model may have more embedding rows than its tokenizer has tokens (rounded up)
    check_vocab_size(tok, tok.vocab_size + 40)
    with pytest.raises(ValueError, match="tokenizer has"):
        check_vocab_size(tok, tok.vocab_size - 1)


def test_masking_with_a_foreign_tokenizer(google_bert_dir, tiny_corpus, tmp_path):
    """MLM masks with [MASK] = 103, never masks or samples [CLS]/[SEP]/[unused*], and documents are
    separated by [SEP] (no [EOD])."""
    import shutil

    from data.corpus import open_corpus
    from data.pretrain import PretrainDataset

    tok = KoTokenizer.load(google_bert_dir)
    shutil.copy(tiny_corpus, tmp_path / "c.dat")
    ds = PretrainDataset(open_corpus(str(tmp_path / "c.dat"), tok), tok, 64, objective="mlm",
                         mlm_probability=0.3, whole_word_mask=True, seed=1)
    special = tok.is_special()
    masked = 0
    for i in range(40):
        s = ds[i]
        ids, labels = np.asarray(s["input_ids"]), np.asarray(s["mlm_labels"])
        assert ids[0] == tok.cls_id
        assert not special[labels[labels >= 0]].any()      # only text is predicted
        assert not ((ids >= 1) & (ids < 100)).any()         # no [unused*] sampled as a random token
        masked += int((ids == tok.mask_id).sum())
        assert set(ids[special[ids]].tolist()) <= {tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id}
    assert masked > 0


@pytest.mark.parametrize("objective,separator", [("mlm", "eod"), ("mlm", "sep"), ("sop", "sep"), ("ict", "sep")])
def test_whole_word_masking_splits_lines_of_a_byte_level_bpe(bpe_dir, tiny_corpus, tmp_path, objective, separator):
    """A byte-level BPE without prefix space marks no line's first word ("Ġ" only after a space): where
    lines are joined (mlm with --mlm_separator eod, SOP segments, ICT passages) that word still is a
    word of its own for whole-word masking, not the end of the previous line's last word."""
    import shutil

    from data.corpus import open_corpus
    from data.pretrain import PretrainDataset

    tok = KoTokenizer.load(bpe_dir)
    shutil.copy(tiny_corpus, tmp_path / "c.dat")
    corpus = open_corpus(str(tmp_path / "c.dat"), tok)
    ds = PretrainDataset(corpus, tok, 64, objective=objective, mlm_probability=0.3, whole_word_mask=True, seed=1,
                         mlm_separator=separator)
    ws, special = tok.is_word_start(), tok.is_special()
    unmarked = differ = 0
    for i in range(min(len(ds), 300)):
        if objective == "mlm":     # the row's line starts, checked against the lines' own tokens
            s, e = (int(x) for x in ds.groups[i])
            ids, starts = ds._mlm_row(s, e, int(ds.mlm_skip[i]))
            if i < 20 and ds.mlm_skip[i] == 0:
                for u, at in zip(range(s, e), np.flatnonzero(starts)):
                    n = min(len(ds._span(u, u + 1)), len(ids) - 1 - at)     # the row ends with [SEP]
                    assert list(ids[at:at + n]) == list(ds._span(u, u + 1)[:n])
            sample = ds[i]
            rows = [(np.asarray(sample["input_ids"]), np.asarray(sample["mlm_labels"]), starts)]
        elif objective == "sop":
            sample = ds[i]
            rows = [(np.asarray(sample["input_ids"]), np.asarray(sample["mlm_labels"]), None)]
        else:
            sample = ds[i]
            rows = [(np.asarray(sample[p + "input_ids"]), np.asarray(sample[p + "mlm_labels"]), None)
                    for p in ("query_", "passage_")]
        for ids, labels, starts in rows:
            sel = labels != -100
            orig = np.where(sel, labels, ids)
            cand = ~special[orig]
            # a piece that continues a word (no mark, after a text piece) is selected with the piece before
            # it, except at a line start: there the selections may differ, and must sometimes
            cont = ~ws[orig][1:] & cand[1:] & cand[:-1]
            if starts is not None:
                assert (sel[1:][cont & ~starts[1:]] == sel[:-1][cont & ~starts[1:]]).all()
                unmarked += int((cont & starts[1:]).sum())
            differ += int((sel[1:][cont] != sel[:-1][cont]).sum())
    if separator == "eod":
        assert unmarked > 0                     # the case exists: lines joined without a mark
    if separator == "eod" or objective != "mlm":
        assert differ > 0                       # and those lines' first words are masked on their own
    else:
        assert differ == 0                      # [SEP] after every line: nothing is joined


@pytest.mark.skipif(not NSMC_TRAIN.exists(), reason="../shared/data not available")
def test_fine_tune_and_export_a_google_layout_bert_folder(google_bert_dir, tmp_path):
    """A transformers BertForMaskedLM folder with its own (Google-layout) tokenizer: --model and
    --checkpoint take the folder, its tokenizer is used, and the fine-tuned export loads with
    AutoTokenizer + AutoModelForSequenceClassification giving our logits."""
    from trainer.export import build_ours, export, load_source

    hf_dir = tmp_path / "hf"
    tok = KoTokenizer.load(google_bert_dir)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(google_bert_dir, local_files_only=True).save_pretrained(hf_dir)
    out = tmp_path / "runs"
    launch("train.py", ["--model_name", "cls", "--model", str(hf_dir), "--checkpoint", str(hf_dir),
                        "--output_dir", str(out), "--max_seq_length", "64", "--num_workers", "0", "--no_progress",
                        "--logging_steps", "1", "--train_mode", "classify", "--train_file", str(NSMC_TRAIN),
                        "--max_train_examples", "16", "--train_batch_size", "8", "--num_steps", "2"])
    final = out / "cls" / "final"
    assert KoTokenizer.load(final).roles == tok.roles  # the run kept the folder's tokenizer
    summary = export(final, tmp_path / "cls_hf", do_verify=True)
    assert summary["architectures"] == ["BertForSequenceClassification"] and max(summary["verify"].values()) < 1e-5
    reviews = [ln.split("\t")[1] for ln in NSMC_TRAIN.read_text(encoding="utf-8").splitlines()[1:6]]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "cls_hf", local_files_only=True)
    batch = hf_tok(reviews, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert batch["input_ids"][0, 0] == 101 and (batch["input_ids"] == 102).any()
    assert batch["input_ids"][0, 1:].tolist()[:5] == tok.encode(reviews[0])[:5]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls_hf", local_files_only=True)
    with torch.no_grad():
        diff = (hf.eval()(**batch).logits - build_ours(load_source(final))(**batch)["logits"]).abs().max().item()
    assert diff < 1e-5

    # trainer.evaluate scores the folder itself (converted once; its tokenizer files go along)
    ev = tmp_path / "ev"
    subprocess.run([sys.executable, "-m", "trainer.evaluate", str(hf_dir), "--tasks", "nsmc", "--output_dir", str(ev),
                    "--no_progress", "--set", "all.max_seq_length=64", "--set", "all.num_steps=2", "--set",
                    "all.warmup_steps=0", "--set", "all.max_train_examples=16", "--set", "all.max_eval_examples=16",
                    "--set", "all.train_batch_size=8"],
                   cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    run = json.loads((ev / "results.json").read_text())["runs"]["hf|nsmc|42"]
    assert 0.0 <= run["metrics"]["accuracy"] <= 1.0
    assert KoTokenizer.load(ev / "checkpoints" / "hf").roles == tok.roles


@pytest.mark.skipif(not (SHARED / "klue" / "nli_train.json").exists(), reason="../shared/data not available")
def test_nli_from_a_klue_roberta_style_folder(tiny_corpus, tmp_path):
    """klue/roberta-base's shape: a RobertaForMaskedLM (positions from pad + 1, one token type) with a
    WordPiece tokenizer in KLUE's layout ([CLS] 0, [PAD] 1, [SEP] 2, [UNK] 3, [MASK] 4). NLI pairs (our
    segments 0 and 1) fine-tune from it; the export is a BERT that AutoTokenizer + AutoModel... run
    as we do."""
    from trainer.export import build_ours, export, load_source

    hf_dir = tmp_path / "roberta"
    klue_layout = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    fast = transformers.BertTokenizerFast(tokenizer_object=_wordpiece(tiny_corpus, klue_layout), do_lower_case=False,
                                          strip_accents=False, bos_token="[CLS]", eos_token="[SEP]")
    cfg = transformers.RobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(cfg).save_pretrained(hf_dir)
    fast.save_pretrained(hf_dir)
    assert (KoTokenizer.load(hf_dir).cls_id, KoTokenizer.load(hf_dir).pad_id) == (0, 1)
    out = tmp_path / "runs"
    launch("train.py", ["--model_name", "nli", "--model", str(hf_dir), "--checkpoint", str(hf_dir),
                        "--output_dir", str(out), "--max_seq_length", "64", "--num_workers", "0", "--no_progress",
                        "--logging_steps", "1", "--train_mode", "nli", "--train_file",
                        str(SHARED / "klue" / "nli_train.json"), "--max_train_examples", "16",
                        "--train_batch_size", "8", "--num_steps", "2"])
    final = out / "nli" / "final"
    summary = export(final, tmp_path / "nli_hf", do_verify=True)
    assert summary["architectures"] == ["BertForSequenceClassification"] and max(summary["verify"].values()) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "nli_hf", local_files_only=True)
    batch = hf_tok(["영화가 재밌다", "배우 연기가 좋았다 정말로"], ["재밌는 영화다", "연기가 별로였다"], padding=True,
                   return_tensors="pt")
    assert batch["input_ids"][0, 0] == 0 and batch["token_type_ids"].max() == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "nli_hf", local_files_only=True)
    assert hf.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    with torch.no_grad():
        diff = (hf.eval()(**batch).logits - build_ours(load_source(final))(**batch)["logits"]).abs().max().item()
    assert diff < 1e-5


def test_pretrain_from_a_modernbert_folder_with_its_bpe_tokenizer(bpe_dir, tiny_corpus, tmp_path):
    """A transformers ModernBertForMaskedLM folder (byte-level BPE tokenizer, special tokens at the end,
    embedding rows rounded up past the tokenizer) continues pretraining on a Korean corpus, SOP
    included (documents end with [SEP]), and exports back to ModernBERT with its tokenizer."""
    import shutil

    from trainer.export import export

    hf_dir = tmp_path / "mb"
    tok = KoTokenizer.load(bpe_dir)
    rows = -(-tok.vocab_size // 64) * 64 + 64
    cfg = transformers.ModernBertConfig(vocab_size=rows, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=64, local_attention=16,
                                        pad_token_id=tok.pad_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id,
                                        bos_token_id=tok.cls_id, eos_token_id=tok.sep_id)
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(cfg).save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(bpe_dir, local_files_only=True).save_pretrained(hf_dir)
    shutil.copy(tiny_corpus, tmp_path / "c.dat")
    out = tmp_path / "runs"
    proc = launch("train.py", ["--model_name", "mb", "--model", str(hf_dir), "--checkpoint", str(hf_dir),
                               "--corpus_path", str(tmp_path / "c.dat"), "--output_dir", str(out),
                               "--max_seq_length", "48", "--num_workers", "0", "--no_progress", "--logging_steps", "1",
                               "--objective", "sop", "--train_batch_size", "4", "--num_steps", "2"])
    assert "it has no [EOD], so pretraining documents end with [SEP]" in proc.stdout
    summary = export(out / "mb" / "final", tmp_path / "mb_hf", do_verify=True)
    assert summary["architectures"] == ["ModernBertForMaskedLM"] and max(summary["verify"].values()) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "mb_hf", local_files_only=True)
    assert hf_tok("영화")["input_ids"][:1] == [tok.cls_id] and hf_tok.mask_token_id == tok.mask_id


def test_train_overwrite_over_a_transformers_folder_leaves_one_tokenizer(google_bert_dir, tiny_corpus, tmp_path,
                                                                          monkeypatch):
    """`data.tokenizer train --overwrite` into a transformers model folder: its tokenizer files are
    replaced by ours as a whole (its special_tokens_map.json and tokenizer_config.json, which name
    other roles, go), the model's own files stay; a save cut short leaves no tokenizer.json."""
    import shutil

    import data.tokenizer as tokmod

    folder = tmp_path / "bert"
    shutil.copytree(google_bert_dir, folder)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit):  # without --overwrite: refused, nothing changed
        tokmod.main(["train", "--input", str(tiny_corpus), "--vocab_size", "1000", "--out", str(folder)])
    assert KoTokenizer.load(folder).fingerprint == KoTokenizer.load(google_bert_dir).fingerprint
    tokmod.main(["train", "--input", str(tiny_corpus), "--vocab_size", "1000", "--out", str(folder), "--overwrite"])
    fresh = tmp_path / "fresh"
    tokmod.main(["train", "--input", str(tiny_corpus), "--vocab_size", "1000", "--out", str(fresh)])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pretokenizer.json", "tokenizer.json",
                                                         "vocab.txt"]
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in fresh.iterdir())
    tok = KoTokenizer.load(folder)
    assert not tok.foreign and tok.roles == KoTokenizer.load(fresh).roles

    calls = []

    def replace_then_fail(src, dst):  # the disk fills after the first file
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        os.replace(src, dst)

    monkeypatch.setattr(tokmod.os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        KoTokenizer.load(google_bert_dir).save(folder)
    assert not (folder / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        KoTokenizer.load(folder)
