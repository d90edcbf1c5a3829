"""trainer.export: transformers loads the export offline and computes our model (1e-5)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from models import ModelConfig, build_model
from tests.trainer_util import TINY_CONFIG, launch, write_config
from trainer import checkpoint
from trainer.export import build_ours, export, load_source, ours_outputs
from trainer.export import main as export_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")

SENTENCES = [("이 영화 정말 재밌었어요! 배우들 연기가 최고", "다음에 또 보고 싶네요"),
             ("별로였다", "시간 아까움")]
TOL = 1e-5


def _final_dir(tmp: Path, config: dict, tokenizer_dir: Path, objective: str = "sop", seed: int = 0,
               task: str = "pretrain", **task_kwargs) -> Path:
    """A final/ directory as the trainer writes it, for a random model whose LayerNorms and biases
    are random too (so a swapped or missing LayerNorm cannot go unnoticed)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict(config)
    model = build_model(cfg, task, **({"objective": objective} if task == "pretrain" else task_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    out = tmp / "final"
    out.mkdir(parents=True)
    checkpoint.save_weights(model.state_dict(), out / checkpoint.WEIGHTS, {"step": "7"})
    cfg.to_json(out / "config.json")
    for name in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


def _compare(export_dir: Path, src: Path, tokenizer_dir: Path, mlm_class=None) -> dict[str, float]:
    """Tokenize Korean sentence pairs with the exported HF tokenizer (padded), run transformers and
    our model; max |difference| over real tokens of hidden states and MLM logits."""
    from data.tokenizer import KoTokenizer

    tok = transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    ours_tok = KoTokenizer.load(tokenizer_dir)
    a, b = SENTENCES[0]
    assert tok(a, b)["input_ids"] == [2, *ours_tok.encode(a), 3, *ours_tok.encode(b), 3]
    batch = tok([s for s, _ in SENTENCES], [t for _, t in SENTENCES], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    real = batch["attention_mask"].bool()
    ours = build_ours(load_source(src))
    h_ours, logits_ours = ours_outputs(ours, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        base = transformers.AutoModel.from_pretrained(export_dir, local_files_only=True).eval()
        h_hf = base(**batch).last_hidden_state
        mlm = (mlm_class or transformers.AutoModelForMaskedLM).from_pretrained(export_dir, local_files_only=True).eval()
        logits_hf = mlm(**batch).logits
    assert not base.training and logits_hf.shape == logits_ours.shape
    return {"hidden": (h_hf - h_ours)[real].abs().max().item(),
            "logits": (logits_hf - logits_ours)[real].abs().max().item()}


@pytest.mark.parametrize("name,overrides,family,mlm_class", [
    ("bert", {}, "bert", "BertForMaskedLM"),
    ("albert", {"layer_group": 2, "embedding_size": 16}, "albert", "AlbertForMaskedLM"),
    ("preln", {"ln_pos": 0, "act_fn": "gelu"}, "roberta-prelayernorm", "RobertaPreLayerNormForMaskedLM"),
])
def test_hf_export_matches_ours(tmp_path, tiny_tokenizer_dir, name, overrides, family, mlm_class):
    src = _final_dir(tmp_path, TINY_CONFIG | overrides, tiny_tokenizer_dir)
    summary = export(src, tmp_path / "hf")
    assert summary["target"] == family
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == family
    diff = _compare(tmp_path / "hf", src, tiny_tokenizer_dir, getattr(transformers, mlm_class))
    assert diff["hidden"] < TOL and diff["logits"] < TOL, diff
    if family == "albert":
        assert cfg["num_hidden_groups"] == 1 and cfg["embedding_size"] == 16
    # the folder reads back as the model it was exported from (RoBERTa-PreLayerNorm has no SOP head)
    back, original = load_source(tmp_path / "hf").state, load_source(src).state
    kept = {k for k in original if family != "roberta-prelayernorm" or not k.startswith("sop_head.")}
    assert back.keys() == kept and all(torch.equal(back[k], original[k]) for k in back)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (tmp_path / "hf" / f).is_file(), f


def test_pretrain_heads_load_into_for_pretraining(tmp_path, tiny_tokenizer_dir):
    """SOP weights land in BertForPreTraining's pooler + seq_relationship: same SOP logits; the
    folder reads back as the pretraining model it came from (its SOP head too: ours kept our config
    beside it, a foreign BertForPreTraining's NSP head is not taken for one)."""
    src = _final_dir(tmp_path, TINY_CONFIG, tiny_tokenizer_dir)
    export(src, tmp_path / "hf")
    back, original = load_source(tmp_path / "hf").state, load_source(src).state
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    (tmp_path / "hf" / "ko_model_config.json").unlink()
    assert load_source(tmp_path / "hf").state.keys() == {k for k in original if not k.startswith("sop_head.")}
    ours = build_ours(load_source(src))
    ids = torch.tensor([[2, 100, 200, 300, 3, 400, 3, 0]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
        sop_hf = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).seq_relationship_logits
        sop_ours = ours(input_ids=ids, attention_mask=mask, token_type_ids=types)["sop_logits"]
    assert (sop_hf - sop_ours).abs().max().item() < TOL


@pytest.mark.parametrize("name,overrides,prefix", [
    ("bert", {}, "Bert"),
    ("albert", {"layer_group": 2, "embedding_size": 16}, "Albert"),
    ("preln", {"ln_pos": 0}, "RobertaPreLayerNorm"),
])
@pytest.mark.parametrize("task,kwargs", [("classify", {"num_labels": 3}), ("classify", {"num_labels": 1}),
                                         ("mrc", {})])
def test_fine_tuned_heads_export_as_transformers_task_classes(tmp_path, tiny_tokenizer_dir, name, overrides,
                                                              prefix, task, kwargs):
    """A fine-tuned classifier (or regressor) exports as ...ForSequenceClassification, an MRC model as
    ...ForQuestionAnswering: loaded by the Auto class with no missing or unexpected weights, they give
    our logits on padded Korean pairs."""
    src = _final_dir(tmp_path, TINY_CONFIG | overrides, tiny_tokenizer_dir, task=task, **kwargs)
    train_mode = {3: "nli", 1: "sts"}.get(kwargs.get("num_labels"), task)   # the run's, as args.json records it
    (src / "args.json").write_text(json.dumps({"train_mode": train_mode}))
    summary = export(src, tmp_path / "hf", do_verify=True)
    auto = {"classify": "AutoModelForSequenceClassification", "mrc": "AutoModelForQuestionAnswering"}[task]
    arch = prefix + auto.removeprefix("AutoModel")
    assert summary["architectures"] == [arch] and summary["not_exported"] == []
    assert max(summary["verify"].values()) < TOL, summary["verify"]
    assert f"{auto}.from_pretrained(PATH)" in (tmp_path / "hf" / "README.md").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    batch = tok([s for s, _ in SENTENCES], [t for _, t in SENTENCES], padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    ours = build_ours(load_source(src))
    assert type(ours).__name__ == {"classify": "ClassifyModel", "mrc": "MRCModel"}[task]
    with torch.no_grad():
        hf, info = getattr(transformers, auto).from_pretrained(tmp_path / "hf", local_files_only=True,
                                                               output_loading_info=True)
        assert type(hf).__name__ == arch and not info["missing_keys"] and not info["unexpected_keys"], info
        out, mine = hf.eval()(**batch), ours(**batch)
    back, original = load_source(tmp_path / "hf").state, load_source(src).state  # read back: the same model
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    if task == "classify":
        assert hf.config.num_labels == kwargs["num_labels"]
        assert hf.config.problem_type == ("regression" if kwargs["num_labels"] == 1 else "single_label_classification")
        assert hf.config.id2label == ({0: "similarity"} if kwargs["num_labels"] == 1 else
                                      {0: "entailment", 1: "neutral", 2: "contradiction"})
        assert (out.logits - mine["logits"]).abs().max().item() < TOL
    else:
        for end in ("start_logits", "end_logits"):
            assert (out[end] - mine[end])[real].abs().max().item() < TOL


def _korean_pairs(tokenizer_dir: Path):
    tok = transformers.BertTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    return tok([s for s, _ in SENTENCES], [t for _, t in SENTENCES], padding=True, return_tensors="pt")


@pytest.mark.parametrize("cls,task,safetensors", [
    ("BertForMaskedLM", "pretrain", True), ("BertForPreTraining", "pretrain", False), ("BertModel", "encoder", True),
    ("BertForSequenceClassification", "classify", True), ("BertForQuestionAnswering", "mrc", False),
])
def test_transformers_bert_folder_reads_as_our_model(tmp_path, tiny_tokenizer_dir, cls, task, safetensors):
    """A BERT folder written by transformers itself (safetensors or pytorch_model.bin; e.g.
    klue/bert-base) reads as our model with its head: same hidden states and head outputs on padded
    Korean pairs, and --model/--checkpoint take it (an NSP classifier is not our SOP head: left out)."""
    from models import load_config
    from models.hf_compat import bert_config_from_hf

    cfg = ModelConfig.from_dict(TINY_CONFIG | {"dropout_prob": 0.1, "kernel_size": 9})  # kernel_size: Mix LM's
    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
                                     intermediate_size=cfg.ff_dim, max_position_embeddings=cfg.max_position_embedding,
                                     layer_norm_eps=cfg.LN_eps, num_labels=3 if task == "classify" else 2)
    hf = _saved_hf_model(cls, hf_cfg, tmp_path / "hf", seed=4)
    if not safetensors:  # as older transformers wrote them (transformers 5 writes safetensors only)
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
        (tmp_path / "hf" / "model.safetensors").unlink()
    assert load_config(tmp_path / "hf") == bert_config_from_hf(hf_cfg.to_dict()) == cfg
    _assert_reads_as_ours(hf, load_source(tmp_path / "hf"), task, _korean_pairs(tiny_tokenizer_dir))


def _saved_hf_model(cls: str, hf_cfg, folder: Path, seed: int):
    """transformers' `cls` built from `hf_cfg` (norms and biases drawn away from 1 and 0, so a wrong
    mapping shows), in eval mode, saved to `folder`."""
    torch.manual_seed(seed)
    hf = getattr(transformers, cls)(hf_cfg).eval()
    with torch.no_grad():
        for name, q in hf.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                q.normal_(0.0, 0.5)
    hf.save_pretrained(folder)
    return hf


def _assert_reads_as_ours(hf, source, task: str, batch: dict, theirs: dict | None = None) -> None:
    """The folder `source` was read from holds `hf`'s `task` head (and no other), and our model built
    from it gives hf's hidden states and head outputs on the real tokens of `batch` (hf is given
    `theirs`, default the same batch)."""
    heads = {k.split(".")[0] for k in source.state if not k.startswith("encoder.")}
    assert heads == {"pretrain": {"mlm_head"}, "encoder": set(), "classify": {"classifier_head"},
                     "mrc": {"span_head"}}[task]
    ours = build_ours(source)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out = hf(**(theirs or batch), **({"output_hidden_states": True} if task != "encoder" else {}))
        h_hf = out.last_hidden_state if task == "encoder" else out.hidden_states[-1]
        assert (h_hf - ours.encoder(**batch).last_hidden_state)[real].abs().max().item() < TOL
        if task == "pretrain":
            logits = getattr(out, "prediction_logits", None)
            logits = out.logits if logits is None else logits
            assert (logits - ours_outputs(ours, **batch)[1])[real].abs().max().item() < TOL
        elif task == "classify":
            assert (out.logits - ours(**batch)["logits"]).abs().max().item() < TOL
        elif task == "mrc":
            mine = ours(**batch)
            for end in ("start_logits", "end_logits"):
                assert (out[end] - mine[end])[real].abs().max().item() < TOL


@pytest.mark.parametrize("cls,task", [
    ("RobertaForMaskedLM", "pretrain"), ("RobertaModel", "encoder"), ("RobertaForSequenceClassification", "classify"),
    ("RobertaForQuestionAnswering", "mrc"), ("XLMRobertaForMaskedLM", "pretrain"),
])
def test_transformers_roberta_folder_reads_as_our_bert(tmp_path, tiny_tokenizer_dir, cls, task):
    """A RoBERTa / XLM-R folder (klue/roberta-base's family: positions from pad_token_id + 1, one token
    type) reads as our BERT: same hidden states and head outputs on right-padded Korean pairs, with
    our segment ids 0/1 (both token-type rows are RoBERTa's one) against RoBERTa's zeros; a fine-tuning
    run takes the folder, and the result exports as BERT computing the same."""
    pad = 1
    config_cls = transformers.XLMRobertaConfig if cls.startswith("XLM") else transformers.RobertaConfig
    hf_cfg = config_cls(vocab_size=TINY_CONFIG["vocab_size"], hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64 + pad + 1,
                        pad_token_id=pad, type_vocab_size=1, layer_norm_eps=1e-5,
                        num_labels=3 if task == "classify" else 2)
    hf = _saved_hf_model(cls, hf_cfg, tmp_path / "hf", seed=5)
    source = load_source(tmp_path / "hf")
    assert source.config.max_position_embedding == 64 and source.config.type_vocab_size == 2
    batch = _korean_pairs(tiny_tokenizer_dir)
    real = batch["attention_mask"].bool()
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == pad, 7).masked_fill(~real, pad)  # RoBERTa's padding
    _assert_reads_as_ours(hf, source, task, dict(batch, input_ids=ids),
                          theirs={"input_ids": ids, "attention_mask": batch["attention_mask"]})
    if task == "classify":  # exported back: a BERT computing the same
        summary = export(tmp_path / "hf", tmp_path / "bert", do_verify=True)
        assert summary["architectures"] == ["BertForSequenceClassification"]
        assert max(summary["verify"].values()) < TOL


@pytest.mark.parametrize("cls,task", [("AlbertForMaskedLM", "pretrain"), ("AlbertModel", "encoder"),
                                      ("AlbertForSequenceClassification", "classify")])
def test_transformers_albert_folder_reads_as_our_model(tmp_path, tiny_tokenizer_dir, cls, task):
    """An ALBERT folder made by transformers (its default gelu_new, factorized embeddings, two layers
    sharing one group) reads as our layer_group / embedding_size model with its head."""
    hf_cfg = transformers.AlbertConfig(vocab_size=TINY_CONFIG["vocab_size"], embedding_size=16, hidden_size=32,
                                       num_hidden_layers=2, num_hidden_groups=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64, num_labels=3)
    assert hf_cfg.hidden_act == "gelu_new"
    hf = _saved_hf_model(cls, hf_cfg, tmp_path / "hf", seed=6)
    source = load_source(tmp_path / "hf")
    assert (source.config.layer_group, source.config.embedding_size, source.config.act_fn) == (2, 16, "gelu_tanh")
    _assert_reads_as_ours(hf, source, task, _korean_pairs(tiny_tokenizer_dir))
    nsmc = Path(__file__).resolve().parents[2] / "shared" / "data" / "nsmc" / "sentiment_train.tsv"
    if task == "classify" and nsmc.exists():  # a fine-tuning run starts from it and exports back to ALBERT
        launch("train.py", ["--model_name", "cls", "--model", str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "hf"),
                            "--tokenizer", str(tiny_tokenizer_dir), "--output_dir", str(tmp_path / "runs"),
                            "--max_seq_length", "64", "--num_workers", "0", "--no_progress", "--train_mode", "classify",
                            "--train_file", str(nsmc), "--max_train_examples", "16", "--train_batch_size", "8",
                            "--num_steps", "2"])
        summary = export(tmp_path / "runs" / "cls" / "final", tmp_path / "albert", do_verify=True)
        assert summary["architectures"] == ["AlbertForSequenceClassification"] and max(summary["verify"].values()) < TOL
        assert json.loads((tmp_path / "albert" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("cls,task,embedding", [
    ("ElectraForMaskedLM", "pretrain", 16), ("ElectraModel", "encoder", 32), ("ElectraForQuestionAnswering", "mrc", 16),
    ("ElectraForPreTraining", "encoder", 16), ("ElectraForSequenceClassification", "encoder", 32),
])
def test_transformers_electra_folder_reads_as_our_model(tmp_path, tiny_tokenizer_dir, capsys, cls, task, embedding):
    """An ELECTRA folder (KoELECTRA's family): BERT's encoder, factorized when embedding_size differs
    (embeddings_project is our projection), the generator's MLM head, qa_outputs. The discriminator and
    classification heads have no counterpart: the encoder comes with a warning."""
    hf_cfg = transformers.ElectraConfig(vocab_size=TINY_CONFIG["vocab_size"], embedding_size=embedding, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                        max_position_embeddings=64, num_labels=2 if task == "mrc" else 3)
    hf = _saved_hf_model(cls, hf_cfg, tmp_path / "hf", seed=7)
    source = load_source(tmp_path / "hf")
    assert source.config.embedding_size == (None if embedding == 32 else embedding)
    warned = "has no counterpart here" in capsys.readouterr().err
    headless = cls in ("ElectraForPreTraining", "ElectraForSequenceClassification")
    assert warned == headless
    if headless:  # compare the encoder
        hf = hf.electra
    _assert_reads_as_ours(hf, source, task, _korean_pairs(tiny_tokenizer_dir))


def test_transformers_bert_folder_is_checked(tmp_path, capsys):
    from models.hf_compat import bert_config_from_hf

    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert_config_from_hf(transformers.BertConfig(position_embedding_type="relative_key").to_dict())
    with pytest.raises(ValueError, match="no vocab_size"):
        bert_config_from_hf({"model_type": "bert"})
    hf_cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=False)
    hf = transformers.BertForMaskedLM(hf_cfg)
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.normal_()
    hf.save_pretrained(tmp_path / "untied")
    source = load_source(tmp_path / "untied")
    assert "its MLM head is not imported" in capsys.readouterr().err
    assert source.info["objective"] is None and not any(k.startswith("mlm_head.") for k in source.state)
    (tmp_path / "untied" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="without model.safetensors or pytorch_model.bin"):
        load_source(tmp_path / "untied")
    (tmp_path / "untied" / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(checkpoint.CheckpointError, match="pytorch_model.bin: cannot be read"):
        load_source(tmp_path / "untied")


@pytest.mark.parametrize("overrides,why", [
    ({"n_experts": 4}, "n_experts 4"),
    ({"model_type": "mix_lm", "n_experts": 2, "kernel_size": 5}, "model_type 'mix_lm'"),
    ({"ln_pos": 0, "layer_group": 2}, "pre-LN (ln_pos 0) with shared layers"),
])
def test_unmappable_models_export_our_format(tmp_path, tiny_tokenizer_dir, overrides, why):
    src = _final_dir(tmp_path, TINY_CONFIG | overrides, tiny_tokenizer_dir, objective="mlm")
    summary = export(src, tmp_path / "out")
    assert summary["target"] == "ours"
    note = (tmp_path / "out" / "EXPORT_NOTE.md").read_text()
    assert why in note and "cannot load" in note
    # the documented recipe reproduces the model
    config = ModelConfig.from_json(tmp_path / "out" / "config.json")
    assert config.to_dict() == ModelConfig.from_dict(TINY_CONFIG | overrides).to_dict()
    model = build_model(config, "pretrain", objective="mlm")
    model.load_state_dict(checkpoint.load_weights(tmp_path / "out" / "model.safetensors"), strict=True)
    ref = build_ours(load_source(src))
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    h1, l1 = ours_outputs(model.eval(), ids, (ids != 0).long())
    h2, l2 = ours_outputs(ref, ids, (ids != 0).long())
    assert torch.equal(h1, h2) and torch.equal(l1, l2)


@pytest.mark.parametrize("task,kwargs", [("pretrain", {"objective": "mlm"}), ("classify", {"num_labels": 3}),
                                         ("mrc", {}), ("ner", {"num_labels": 5, "slots": 32, "crf": True}),
                                         ("encoder", {})])
def test_our_format_note_builds_the_task_model(tmp_path, tiny_tokenizer_dir, task, kwargs):
    """The export note's recipe for a model transformers cannot load builds the model the weights
    belong to (a fine-tuned head included), loaded with strict=True."""
    src = _final_dir(tmp_path, TINY_CONFIG | {"n_experts": 2}, tiny_tokenizer_dir, task=task, **kwargs)
    export(src, tmp_path / "out")
    note = (tmp_path / "out" / "EXPORT_NOTE.md").read_text()
    line = next(ln for ln in note.splitlines() if ln.startswith("model = build_model("))
    config = ModelConfig.from_json(tmp_path / "out" / "config.json")
    model = eval(line.removeprefix("model = "), {"build_model": build_model, "config": config})
    assert type(model).__name__ == type(build_model(config, task, **kwargs)).__name__
    model.load_state_dict(checkpoint.load_weights(tmp_path / "out" / "model.safetensors"), strict=True)


def test_morpheme_tokenizer_is_explained(tmp_path, tiny_tokenizer_dir):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok_dir)
    (tok_dir / "pretokenizer.json").write_text(json.dumps({"morpheme": "mecab", "continuing_subword_prefix": "##"}))
    src = _final_dir(tmp_path, TINY_CONFIG, tiny_tokenizer_dir)
    export(src, tmp_path / "hf", tokenizer=tok_dir)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "morpheme-aware (mecab)" in readme
    assert json.loads((tmp_path / "hf" / "pretokenizer.json").read_text())["morpheme"] == "mecab"


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a step-N checkpoint"):
        export(tmp_path, tmp_path / "out")


def test_train_then_export_step_and_final(tmp_path, capsys, tiny_corpus, tiny_tokenizer_dir):
    """A real train.py run; the command line exports its step-N (DCP), export() its final/ folder."""
    cfg = write_config(tmp_path / "tiny.json", dropout_prob=0.1)
    launch("train.py", ["--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir),
                        "--max_seq_length", "64", "--train_batch_size", "4", "--num_steps", "4",
                        "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
                        "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "out"),
                        "--model", str(cfg), "--model_name", "e2e"])
    run = tmp_path / "out" / "e2e"
    assert export_main([str(run / "step-2"), str(tmp_path / "hf2"), "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "bert" and summary["source"]["step"] == 2
    assert max(summary["verify"].values()) < TOL
    diff = _compare(tmp_path / "hf2", run / "step-2", tiny_tokenizer_dir)
    assert diff["hidden"] < TOL and diff["logits"] < TOL, diff
    # step-4 (DCP) and final/ (safetensors) hold the same weights, so their exports are equal
    export(run / "step-4", tmp_path / "hf4")
    export(run / "final", tmp_path / "hf_final")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hf4" / "model.safetensors"), load_file(tmp_path / "hf_final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(tmp_path / "hf2" / "model.safetensors")
    assert not torch.equal(a["bert.embeddings.word_embeddings.weight"], c["bert.embeddings.word_embeddings.weight"])
    diff = _compare(tmp_path / "hf_final", run / "final", tiny_tokenizer_dir)
    assert diff["hidden"] < TOL and diff["logits"] < TOL, diff


def test_safetensors_files_are_reproducible(tmp_path):
    """The same tensors and metadata give the same bytes (safetensors itself writes the metadata in
    hash-map order), and the rewritten header still loads with safetensors."""
    import hashlib

    from safetensors.torch import load_file

    from trainer.checkpoint import read_safetensors, write_safetensors

    tensors = {"Zeta.weight": torch.arange(6.0).view(2, 3), "alpha": torch.ones(4, dtype=torch.int64),
               "_x": torch.zeros(1)}
    meta = {"format": "pt", "step": "7", "config": "{}", "aliases": "{}", "b": "1", "a": "2"}
    digests = set()
    for k in range(4):
        write_safetensors(tensors, tmp_path / f"w{k}.safetensors", meta)
        digests.add(hashlib.sha256((tmp_path / f"w{k}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_file(str(tmp_path / "w0.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert read_safetensors(tmp_path / "w0.safetensors")[1] == meta
