"""Export, import, evaluate and plot with inputs users bring: a tokenizer of another size or given as
its tokenizer.json, a step-N recorded with a relative --tokenizer, a transformers folder inside the
evaluation's own folder or changed after a first evaluation, NaN losses and clashing run names."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer_util import REPO, TINY_CONFIG, launch, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")


def _final(tmp: Path, tokenizer_dir: Path) -> Path:
    """A final/ folder of a tiny BERT (vocab 2000, the tiny tokenizer's size) with its tokenizer."""
    from models import ModelConfig, build_model
    from trainer import checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    out = tmp / "final"
    out.mkdir(parents=True)
    checkpoint.save_weights(build_model(cfg, "pretrain", objective="mlm").state_dict(), out / checkpoint.WEIGHTS,
                            {"step": "3"})
    cfg.to_json(out / "config.json")
    for name in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


def _hf_bert(folder: Path, tokenizer_dir: Path | None, seed: int = 0, binary: bool = False) -> None:
    """A transformers BertForMaskedLM folder (vocab 2000), with our tiny tokenizer's files if given;
    `binary`: only pytorch_model.bin, as older uploads have."""
    torch.manual_seed(seed)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    hf.save_pretrained(folder)
    if binary:
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    for name in ("tokenizer.json", "vocab.txt"):
        if tokenizer_dir is not None:
            shutil.copy2(tokenizer_dir / name, folder / name)


@pytest.fixture(scope="module")
def tok1000(tmp_path_factory, tiny_corpus) -> Path:
    from data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok1000")
    train_tokenizer([tiny_corpus], vocab_size=1000, out_dir=out)
    return out


# --- trainer.export ------------------------------------------------------------------------------
def test_export_takes_the_tokenizer_json_path(tmp_path, tiny_tokenizer_dir):
    """--tokenizer DIR/tokenizer.json (what KoTokenizer.load and the launchers take) is that folder's
    tokenizer, not a traceback ("Not a directory")."""
    from data.tokenizer import KoTokenizer
    from trainer.export import export

    src = _final(tmp_path, tiny_tokenizer_dir)
    export(src, tmp_path / "hf", tokenizer=tiny_tokenizer_dir / "tokenizer.json")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "이 영화 정말 재밌었어요"
    assert tok(text)["input_ids"] == [2, *KoTokenizer.load(tiny_tokenizer_dir).encode(text), 3]


def test_export_refuses_a_tokenizer_of_another_size(tmp_path, tiny_tokenizer_dir, tok1000, capsys):
    """A tokenizer whose vocabulary is not the model's gives ids its embeddings never saw (or beyond
    them): refused by name before anything is written, not exported."""
    from trainer.export import export
    from trainer.export import main as export_main

    src = _final(tmp_path, tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="tokenizer has 1000 tokens but the model config has vocab_size=2000; "
                                         "pass --tokenizer with the tokenizer the model was trained with"):
        export(src, tmp_path / "hf", tokenizer=tok1000)
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()
    with pytest.raises(SystemExit) as exc:
        export_main([str(src), str(tmp_path / "hf"), "--tokenizer", str(tok1000)])
    assert exc.value.code == 1 and "does not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_step_export_finds_a_relative_tokenizer_from_another_directory(tmp_path, tiny_corpus, tiny_tokenizer_dir,
                                                                       monkeypatch, capsys):
    """A run started with a relative --tokenizer records it so; exporting its step-N from another
    working directory finds it (as trainer.evaluate does, by the run's cwd) instead of silently
    writing an export without a tokenizer."""
    from trainer.export import export

    cfg = write_config(tmp_path / "tiny.json")
    launch("train.py", ["--corpus_path", str(tiny_corpus), "--tokenizer", os.path.relpath(tiny_tokenizer_dir, REPO),
                        "--max_seq_length", "64", "--train_batch_size", "4", "--num_steps", "1", "--save_steps", "1",
                        "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "out"),
                        "--model", str(cfg), "--model_name", "rel"])
    meta = json.loads((tmp_path / "out" / "rel" / "step-1" / "meta.json").read_text())
    assert not Path(meta["args"]["tokenizer"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    export(tmp_path / "out" / "rel" / "step-1", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "vocab.txt").is_file()
    assert "no tokenizer found" not in capsys.readouterr().err
    # a checkpoint without any tokenizer: exported, with a warning naming --tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy2(tmp_path / "out" / "rel" / "final" / name, bare / name)
    export(bare, tmp_path / "hf_bare")
    assert "no tokenizer found for" in capsys.readouterr().err and not (tmp_path / "hf_bare" / "tokenizer.json").exists()


# --- trainer.evaluate ----------------------------------------------------------------------------
def test_evaluate_never_replaces_a_folder_in_its_checkpoints_slot(tmp_path, tiny_tokenizer_dir):
    """A transformers folder is converted into OUTPUT_DIR/checkpoints/<label>. When the folder itself
    is there (models kept in work/checkpoints/, --output_dir work), or a user's folder is, the command
    stops naming it; before, the folder (its pytorch_model.bin, the user's notes) was deleted."""
    from trainer.evaluate import prepare

    work = tmp_path / "work"
    model = work / "checkpoints" / "bert"
    _hf_bert(model, tiny_tokenizer_dir, binary=True)
    (model / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(SystemExit, match="holds the source"):
        prepare(str(model), work, "bert", is_main=True)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    # another transformers folder whose label takes the user's folder's place
    other = tmp_path / "elsewhere" / "bert"
    _hf_bert(other, tiny_tokenizer_dir)
    with pytest.raises(SystemExit, match=r"not written by us \(.*NOTES.md.*use another --output_dir"):
        prepare(str(other), work, "bert", is_main=True)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_evaluate_converts_a_changed_transformers_folder_again(tmp_path, tiny_tokenizer_dir, tok1000):
    """A folder refused for its tokenizer writes nothing; once the user puts the right tokenizer there
    (as the message says), it is taken, not the stale copy of a first conversion. An unchanged folder
    is converted once; changed weights are converted again (not scored from the old ones)."""
    from trainer import checkpoint
    from trainer.evaluate import prepare

    folder, work = tmp_path / "hf", tmp_path / "ev"
    _hf_bert(folder, tok1000)
    with pytest.raises(SystemExit, match="mismatched tokenizer: tokenizer has 1000 tokens"):
        prepare(str(folder), work, "hf", is_main=True)
    assert not work.exists()  # nothing converted for a checkpoint that is refused
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy2(tiny_tokenizer_dir / name, folder / name)
    resolved = prepare(str(folder), work, "hf", is_main=True)
    slot = Path(resolved["tokenizer"])
    assert (slot / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()
    weights = slot / checkpoint.WEIGHTS
    first = weights.stat().st_mtime_ns
    prepare(str(folder), work, "hf", is_main=True)
    assert weights.stat().st_mtime_ns == first  # unchanged: the conversion is reused
    _hf_bert(folder, tiny_tokenizer_dir, seed=1)  # the user saves other weights into the same folder
    later = (folder / "model.safetensors").stat().st_mtime_ns + 10**9   # later, on a coarse-clock file system too
    os.utime(folder / "model.safetensors", ns=(later, later))
    prepare(str(folder), work, "hf", is_main=True)
    from safetensors.torch import load_file

    new = load_file(folder / "model.safetensors")["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(checkpoint.load_weights(weights)["encoder.embeddings.word_embeddings.weight"], new)


def test_evaluate_tasks_empty_or_repeated():
    """--tasks "" (an empty shell variable) is refused instead of running the whole suite; a task
    named twice runs once (it ran twice and its row appeared twice in the table)."""
    from trainer.evaluate import parse

    assert parse(["ckpt", "--tasks", "sts,nli,sts"]).tasks == ["sts", "nli"]
    with pytest.raises(SystemExit) as exc:
        parse(["ckpt", "--tasks", ""])
    assert exc.value.code == 2


def test_evaluate_set_takes_full_flag_names_only(capsys):
    """The launcher's parser takes abbreviations, so --set sts.num_step=100 (a typo) acted as
    --num_steps 100 beside the recipe's warm-up, and sts.learning=1e-3 as --learning_rate: a misspelt
    flag is refused by name with the flag meant, before anything runs."""
    from trainer.evaluate import parse

    for item, message in (("sts.num_step=100", "num_step is not a flag of the launchers (train.py --help lists "
                                               "them); did you mean num_steps?"),
                          ("all.learning=1e-3", "learning is not a flag of the launchers"),
                          ("all.zzz=1", "zzz is not a flag of the launchers")):
        with pytest.raises(SystemExit) as exc:
            parse(["ckpt", "--tasks", "sts", "--set", item])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert parse(["ckpt", "--tasks", "sts", "--set", "sts.num_steps=100"]).recipes["sts"]["num_steps"] == "100"


# --- trainer.plot --------------------------------------------------------------------------------
@pytest.fixture
def nan_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "nan_run"
    w = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step, v in enumerate([5.0, 4.0, float("nan"), 3.0, float("inf"), 2.0], start=1):
        w.add_scalar("train/loss", v, step)
    w.close()
    return run


def test_plot_smoothing_goes_on_after_a_nan_loss(nan_run, tmp_path, caplog):
    """A NaN (or inf) loss is left out of the moving average, as in TensorBoard: the smoothed curve
    goes on after it (it was NaN from there to the end, so nothing was drawn), and the plot names it."""
    from trainer.plot import plot_runs, smooth

    out = smooth(np.array([5.0, 4.0, np.nan, 3.0, np.inf, 2.0]), 0.6)
    assert np.isnan(out[2]) and np.isinf(out[4]) and np.isfinite(out[[0, 1, 3, 5]]).all()
    np.testing.assert_allclose(out[[0, 1, 3, 5]], smooth(np.array([5.0, 4.0, 3.0, 2.0]), 0.6))
    with caplog.at_level("WARNING", logger="trainer.plot"):
        plotted = plot_runs([nan_run], tmp_path / "png", smoothing=0.6)
    steps, values = plotted["loss"]["train/loss"]["nan_run"]
    assert steps.tolist() == [1, 2, 3, 4, 5, 6] and np.isfinite(values[[3, 5]]).all()
    assert "train/loss has 2 non-finite value(s) (NaN/inf, first at step 3)" in caplog.text


def test_plot_runs_of_the_same_name_are_all_drawn(nan_run, tmp_path):
    """Runs are keyed by their legend name: --names a a dropped one run without a word (refused now),
    and default names of a run given twice, or of a/x/run and b/x/run, are numbered."""
    from trainer.plot import main, plot_runs, run_names

    with pytest.raises(SystemExit) as exc:
        main([str(nan_run), str(nan_run), "--names", "a", "a", "--out", str(tmp_path / "o")])
    assert exc.value.code == 1 and not (tmp_path / "o").exists()
    assert run_names([Path("out/bert"), Path("out/bert/tensorboard"), Path("a/x/run"), Path("b/x/run")]) == \
        ["out/bert", "out/bert~2", "x/run", "x/run~2"]
    plotted = plot_runs([nan_run, nan_run / "tensorboard"], tmp_path / "png")
    assert len(plotted["loss"]["train/loss"]) == 2


def test_evaluate_reads_whole_classify_files_before_any_run(tmp_path):
    """A bad row far down a classify file (a tab inside its text) stops trainer.evaluate before its first run,
    as a bad row near the top does (only the first 10 rows were read: it stopped after earlier tasks ran)."""
    from trainer.evaluate import _check_data

    rows = ["id\tdocument\tlabel"] + [f"{i}\t리뷰 {i}\t{i % 2}" for i in range(200)] + ["999\t탭이\t들어간 리뷰\t1"]
    path = tmp_path / "late_bad_row.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"task nsmc: --train_file .*late_bad_row.tsv:202: 4 tab-separated field"):
        _check_data("nsmc", ["--train_mode", "classify", "--train_file", str(path)])


def test_pre_ln_export_with_a_roberta_order_tokenizer_numbers_positions_right(tmp_path, tiny_corpus):
    """A pre-LN model trained with a foreign tokenizer whose <s> is 0 and <pad> 1 (RoBERTa's order)
    kept our config's pad_token_id 0 (our models never read it), and the RoBERTa-PreLayerNorm export
    numbered positions by `input_ids != 0`: every <s> was padding to transformers, every position
    after it one off (hidden states differed by up to 4 on real tokens; --verify, fed ids >= 6, passed).
    The export takes the pad id from the tokenizer, and --verify feeds special ids too."""
    from models import ModelConfig, build_model
    from tests.test_foreign_tokenizer import _wordpiece
    from trainer import checkpoint
    from trainer.export import build_ours, export, load_source, ours_outputs

    tok_dir = tmp_path / "roberta_tok"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=_wordpiece(tiny_corpus, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]), bos_token="<s>",
        cls_token="<s>", pad_token="<pad>", sep_token="</s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>").save_pretrained(tok_dir)
    from data.tokenizer import KoTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(TINY_CONFIG | {"ln_pos": 0, "vocab_size": KoTokenizer.load(tok_dir).vocab_size})
    assert cfg.pad_token_id == 0
    model = build_model(cfg, "pretrain", objective="mlm")
    with torch.no_grad():
        model.encoder.embeddings.position_embeddings.weight.normal_(0.0, 1.0)  # positions matter
    src = tmp_path / "final"
    src.mkdir()
    checkpoint.save_weights(model.state_dict(), src / checkpoint.WEIGHTS, {"step": "3"})
    cfg.to_json(src / "config.json")
    summary = export(src, tmp_path / "hf", tokenizer=tok_dir, do_verify=True)
    assert summary["target"] == "roberta-prelayernorm"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == 1
    assert max(summary["verify"].values()) < 1e-5, summary["verify"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    batch = tok(["이 영화 정말 재밌었어요!", "별로"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == 0 and (batch["input_ids"] == 1).any()  # <s> first, <pad> after the short one
    real = batch["attention_mask"].bool()
    h_ours, _ = ours_outputs(build_ours(load_source(src)), batch["input_ids"], batch["attention_mask"],
                            torch.zeros_like(batch["input_ids"]))
    with torch.no_grad():
        h_hf = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (h_hf - h_ours)[real].abs().max() < 1e-5


def test_an_export_starts_a_run_with_the_tokenizer_it_was_trained_with(tmp_path, tiny_corpus, tiny_tokenizer_dir,
                                                                        monkeypatch, capsys):
    """`--checkpoint EXPORT --tokenizer ORIGINAL` was refused as "not the tokenizer the checkpoint was
    trained with": the export's tokenizer.json carries the [CLS] A [SEP] template, so its serialised
    fingerprint differs although every id is the same. What decides the ids is compared now; a tokenizer
    that encodes otherwise (same vocabulary, lowercasing) is still refused."""
    from tests.test_safety import _main
    from trainer.export import export

    export(_final(tmp_path, tiny_tokenizer_dir), tmp_path / "hf")
    args = ["--corpus_path", str(tiny_corpus), "--max_seq_length", "64", "--train_batch_size", "4", "--num_steps",
            "1", "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "out"), "--checkpoint",
            str(tmp_path / "hf"), "--model", str(tmp_path / "hf" / "config.json")]
    code, out = _main(args + ["--model_name", "same", "--tokenizer", str(tiny_tokenizer_dir)], monkeypatch, capsys)
    assert code == 0 and "initialised matching weights" in out, out
    lower = tmp_path / "lower"
    shutil.copytree(tiny_tokenizer_dir, lower)
    spec = json.loads((lower / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Lowercase"}
    (lower / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    code, out = _main(args + ["--model_name", "other", "--tokenizer", str(lower)], monkeypatch, capsys)
    assert code != 0 and f"--tokenizer {lower} (vocab 2000" in out and "is not the tokenizer" in out, out
