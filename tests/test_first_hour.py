"""What a new user meets in the first hour: encode files with extra columns, the default pooling of
a pretrain-only checkpoint, re-running a finished run, progress lines, export load reports and the
demo's requirement check."""
from __future__ import annotations

import io
import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests.launch_util import train_args
from tests.trainer_util import REPO, TINY_CONFIG, write_config

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


# --- 9: --encode_file with more than id<TAB>text --------------------------------------------
@pytest.mark.parametrize("header", [True, False])
def test_encode_file_with_three_columns_is_refused_with_the_fix(tmp_path, header):
    from data.retrieval import read_text_file

    nsmc = tmp_path / "reviews.tsv"
    nsmc.write_text(("id\tdocument\tlabel\n" if header else "") + "9976970\t아 더빙.. 진짜 짜증나네요\t0\n",
                    encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_text_file(nsmc)
    message = str(e.value)
    assert "reviews.tsv:1: 3 tab-separated columns" in message and "'id<TAB>text'" in message
    assert f"cut -f1,2 {nsmc} > {tmp_path / 'reviews.id_text.tsv'}" in message
    # what the message says to run gives a file that is read as id -> text, without the label
    fixed = tmp_path / "reviews.id_text.tsv"
    fixed.write_text("".join("\t".join(ln.split("\t")[:2]) + "\n"
                             for ln in nsmc.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    assert read_text_file(fixed) == (["9976970"], ["아 더빙.. 진짜 짜증나네요"])


# --- 10: --pooling auto ------------------------------------------------------------------------
def _step_dir(run: Path, step: int, **trained) -> Path:
    d = run / f"step-{step}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "train_state": {}, "args": trained,
                                             "model_config": TINY_CONFIG}))
    return d


def _final_dir(run: Path, **trained) -> Path:
    from trainer import checkpoint

    d = run / "final"
    d.mkdir(parents=True)
    checkpoint.save_weights({"w": torch.zeros(1)}, d / checkpoint.WEIGHTS, {"step": "3"})
    (d / "args.json").write_text(json.dumps(trained))
    return d


def _pool(tmp_path, pooling: str, checkpoint, train_mode: str = "encoder") -> tuple[str, str]:
    from trainer.tasks.pooling import resolve_pooling

    args = Namespace(pooling=pooling, checkpoint=str(checkpoint) if checkpoint else None, train_mode=train_mode,
                     objective="sop")
    return resolve_pooling(args, tmp_path / "this_run")


def test_pooling_auto_is_mean_unless_the_checkpoint_was_retrieval_trained(tmp_path):
    pre_step = _step_dir(tmp_path / "pre", 10, train_mode="pretrain", objective="sop", pooling="cls")
    pre_final = _final_dir(tmp_path / "pre2", train_mode="pretrain", objective="mlm", pooling="cls")
    ict_cls = _final_dir(tmp_path / "ict", train_mode="ict", objective="sop", pooling="cls")
    ict_mean = _step_dir(tmp_path / "ict_mean", 4, train_mode="ict", objective="sop", pooling="mean")
    pre_ict = _step_dir(tmp_path / "pre_ict", 4, train_mode="pretrain", objective="ict", pooling="cls")

    pooling, why = _pool(tmp_path, "auto", pre_step)
    assert pooling == "mean" and f"--checkpoint {pre_step} is a pretrain (sop) checkpoint" in why
    assert _pool(tmp_path, "auto", pre_final)[0] == "mean"
    assert _pool(tmp_path, "auto", tmp_path / "pre")[0] == "mean"          # a run directory: its step-10
    assert _pool(tmp_path, "auto", None) == ("mean", "--pooling auto: mean (no --checkpoint: its [CLS] vector "
                                                     "was never trained to tell texts apart)")
    pooling, why = _pool(tmp_path, "auto", ict_cls)
    assert pooling == "cls" and "as --checkpoint" in why and str(ict_cls / "model.safetensors") in why
    assert _pool(tmp_path, "auto", ict_mean)[0] == "mean"
    assert _pool(tmp_path, "auto", pre_ict)[0] == "cls"
    # ict fine-tuning from a pretrain-only checkpoint also starts from mean
    assert _pool(tmp_path, "auto", pre_step, train_mode="ict")[0] == "mean"
    # an explicit choice is kept; cls on a checkpoint never retrieval-trained is warned about
    pooling, why = _pool(tmp_path, "cls", pre_step)
    assert pooling == "cls" and why.startswith("warning: --pooling cls") and "--pooling mean" in why
    assert _pool(tmp_path, "mean", pre_step) == ("mean", "")
    assert _pool(tmp_path, "cls", ict_cls) == ("cls", "")


def test_pooling_auto_recorded_by_an_encoder_run(tmp_path, monkeypatch, capsys, tiny_corpus, tiny_tokenizer_dir):
    """The encoder run on a pretrain-only checkpoint says why it pools by the mean and records it;
    its vectors of different texts differ (the [CLS] ones of such a model hardly do)."""
    import numpy as np

    cfg = write_config(tmp_path / "tiny.json")
    out = tmp_path / "out"
    _main(train_args(tiny_corpus, tiny_tokenizer_dir, cfg, out, "pre", "--num_steps", "2"), monkeypatch)
    texts = tmp_path / "texts.txt"
    texts.write_text("영화가 정말 재미있다\n배우 연기가 별로였다\n시간 아까운 영화\n", encoding="utf-8")
    capsys.readouterr()
    _main(["--model", str(cfg), "--model_name", "enc", "--output_dir", str(out), "--train_mode", "encoder",
           "--checkpoint", str(out / "pre" / "final"), "--encode_file", str(texts), "--max_seq_length", "32",
           "--no_progress", "--num_workers", "0"], monkeypatch)
    stdout = capsys.readouterr().out
    assert "[encoder] --pooling auto: mean (--checkpoint" in stdout and "pretrain (sop) checkpoint" in stdout
    assert json.loads((out / "enc" / "encoder.json").read_text())["pooling"] == "mean"
    vectors = np.load(out / "enc" / "vectors.npy")
    cosine = vectors @ vectors.T
    assert cosine[~np.eye(3, dtype=bool)].max() < 0.999, cosine


# --- 11: re-running a finished run --------------------------------------------------------
def _main(argv: list[str], monkeypatch) -> None:
    """trainer.loop.main in this process (no process group left behind)."""
    from trainer.loop import main

    for name in DIST_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    main(0, argv)
    assert not torch.distributed.is_initialized()


def test_rerun_at_num_steps_trains_and_exports_nothing(tmp_path, monkeypatch, capsys, tiny_corpus,
                                                       tiny_tokenizer_dir):
    cfg = write_config(tmp_path / "tiny.json")
    argv = train_args(tiny_corpus, tiny_tokenizer_dir, cfg, tmp_path / "out", "demo", "--num_steps", "2",
                      "--checkpoint", "auto")
    _main(argv, monkeypatch)
    run = tmp_path / "out" / "demo"
    first = capsys.readouterr().out
    assert "[export]" in first and "nothing to train" not in first
    final = run / "final" / "model.safetensors"
    before = (final.stat().st_mtime_ns, final.read_bytes(), (run / "loss.tsv").read_text())

    _main(argv, monkeypatch)
    again = capsys.readouterr().out
    assert (f"[train] already at --num_steps 2 ({run / 'step-2'} is step 2); nothing to train. Raise "
            f"--num_steps to train on, or start fresh under another --model_name or --output_dir") in again
    assert f"[export] {run / 'final'} already holds step 2; kept" in again
    assert (final.stat().st_mtime_ns, final.read_bytes(), (run / "loss.tsv").read_text()) == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-2"]


def test_demo_checks_every_requirement(tmp_path):
    sys.path.insert(0, str(REPO / "demo"))
    try:
        from check_requirements import unmet
    finally:
        sys.path.remove(str(REPO / "demo"))
    assert unmet(REPO / "requirements.txt") == []          # this environment has them all
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\ntorch>=2.4\nnumpy<1.0  # too new here\nno-such-package-xyz>=1\n"
                    "tqdm; python_version < '3'\n")
    import numpy

    assert unmet(reqs) == [f"numpy<1.0 (installed: {numpy.__version__})", "no-such-package-xyz>=1 (not installed)"]
    demo = (REPO / "demo" / "run.sh").read_text()
    assert "python demo/check_requirements.py requirements.txt" in demo


# --- 12: progress output ------------------------------------------------------------------
def test_log_lines_do_not_land_in_the_progress_bar(capsys):
    from tqdm import tqdm

    from trainer.dist import DistContext

    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    bar = tqdm(total=4, desc="train", file=sys.stdout, mininterval=0)
    bar.update(2)
    ctx.log("[export] output/demo/final")
    bar.close()
    out = capsys.readouterr().out
    line = next(ln for ln in out.split("\n") if "[export]" in ln)
    assert line.split("\r")[-1] == "[export] output/demo/final", repr(line)


def test_train_bar_closes_at_the_last_step(tmp_path, monkeypatch):
    """Its final it/s covers training only: evaluation and export come after it is closed."""
    from trainer.metrics import Logger

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logger = Logger(tmp_path / "run", True, total_steps=2, start_step=0, run_info={}, progress=True)
    for step in (1, 2):
        logger.advance()
        logger.log(step, {"train/loss": 1.0})
        assert logger.bar.disable == (step == 2)
    logger.close()


# --- 13: exports load without a report of unexpected or missing keys -----------------------
@pytest.mark.parametrize("overrides,objective,arch", [
    ({}, "sop", "BertForPreTraining"),
    ({"layer_group": 2, "embedding_size": 16}, "sop", "AlbertForPreTraining"),
    ({"ln_pos": 0}, "sop", "RobertaPreLayerNormForMaskedLM"),    # the SOP pooler has no place there
])
def test_export_loads_with_no_unexpected_or_missing_keys(tmp_path, tiny_tokenizer_dir, overrides, objective, arch):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from tests.test_export import TOL, _final_dir as trained_final_dir
    from trainer.export import export

    src = trained_final_dir(tmp_path, TINY_CONFIG | overrides, tiny_tokenizer_dir, objective=objective)
    summary = export(src, tmp_path / "hf", do_verify=True)
    assert summary["architectures"] == [arch] and max(summary["verify"].values()) < TOL
    _, info = getattr(transformers, arch).from_pretrained(tmp_path / "hf", local_files_only=True,
                                                          output_loading_info=True)
    assert not any(info.values()), info
    if arch.startswith("RobertaPreLayerNorm"):
        assert "sop_head.pooler.dense.weight" in summary["not_exported"]
