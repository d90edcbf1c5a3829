"""Run operations the way users do them: a tokenizer named by its file, a tokenizer folder trained
again under a run, a run directory moved or copied elsewhere (MLflow store included), a folder of the
user's named like a checkpoint, over-long names, bad launch-script settings. Each case runs the real
entry point (`trainer.loop.main` in this process, or the launch script) and checks what the user sees
and that nothing of theirs changed (docs/operations.md)."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NSMC_CORPUS
from tests.launch_util import env, train_args, tree_digest
from tests.test_safety import _main
from tests.trainer_util import REPO, write_config


@pytest.fixture()
def area(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    """A config, and a copy of the tokenizer the test may replace."""
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    return {"root": tmp_path, "cfg": write_config(tmp_path / "tiny.json"), "corpus": tiny_corpus, "tok": tok}


def _args(area, name: str, *extra: str, tokenizer: Path | None = None, out: Path | None = None) -> list[str]:
    return train_args(area["corpus"], tokenizer or area["tok"], area["cfg"], out or area["root"] / "out", name,
                      "--num_steps", "2", "--save_steps", "1", *extra)


def test_tokenizer_given_as_its_tokenizer_json_trains_exports_and_resumes(area, monkeypatch, capsys):
    """--tokenizer DIR/tokenizer.json (as KoTokenizer.load and `data.corpus build` take it) was refused with
    "no tokenizer.json there"; it is the folder: recorded as such, copied into final/, resumable."""
    import json

    file = area["tok"] / "tokenizer.json"
    code, out = _main(_args(area, "run", tokenizer=file), monkeypatch, capsys)
    assert code == 0, out
    run = area["root"] / "out" / "run"
    meta = json.loads((run / "step-2" / "meta.json").read_text())
    assert meta["tokenizer"] == str(area["tok"]) and meta["args"]["tokenizer"] == str(area["tok"])
    for name in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):  # the export is self-contained
        assert (run / "final" / name).read_bytes() == (area["tok"] / name).read_bytes()
    code, out = _main(_args(area, "run", "--checkpoint", "auto", "--num_steps", "3", tokenizer=file),
                      monkeypatch, capsys)
    assert code == 0 and "resumed" in out and (run / "step-3" / "meta.json").is_file(), out


def test_a_tokenizer_file_of_another_name_names_the_folder_fix(area, monkeypatch, capsys):
    other = area["root"] / "mine"
    other.mkdir()
    shutil.copy2(area["tok"] / "tokenizer.json", other / "my_tokenizer.json")
    code, out = _main(_args(area, "run", tokenizer=other / "my_tokenizer.json"), monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out
    assert "a tokenizer file is read as tokenizer.json in its folder" in out and "--tokenizer DIR" in out
    assert not (area["root"] / "out").exists()


def test_resume_refuses_a_tokenizer_trained_again_into_the_same_folder(area, monkeypatch, capsys):
    """The checkpoint names its tokenizer folder only; a tokenizer trained again there (same vocab size)
    was used silently, with other token ids under the trained embeddings."""
    from data.tokenizer import train_tokenizer

    code, out = _main(_args(area, "run"), monkeypatch, capsys)
    assert code == 0, out
    run = area["root"] / "out" / "run"
    other = area["root"] / "other.dat"
    with open(NSMC_CORPUS, "rb") as src:  # other text than the run's tokenizer was trained on
        other.write_bytes(b"".join(itertools.islice(src, 3000, 6000)))
    shutil.rmtree(area["tok"])
    train_tokenizer([other], vocab_size=2000, out_dir=area["tok"])  # the same folder, another vocabulary
    before = tree_digest(run)
    for extra in ([], ["--tokenizer", str(area["tok"])]):
        argv = _args(area, "run", "--checkpoint", "auto", "--num_steps", "4")
        if not extra:  # the checkpoint's tokenizer: the folder its meta.json names
            i = argv.index("--tokenizer")
            del argv[i:i + 2]
        code, out = _main(argv + extra, monkeypatch, capsys)
        assert code == 1 and "was trained with another tokenizer than" in out, out
        assert "token ids would not match the trained embeddings" in out
        assert "Put that tokenizer back into" in out
    assert tree_digest(run) == before
    # put back (final/ holds a copy), it resumes
    for name in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):
        shutil.copy2(run / "final" / name, area["tok"] / name)
    code, out = _main(_args(area, "run", "--checkpoint", "auto", "--num_steps", "3"), monkeypatch, capsys)
    assert code == 0 and (run / "step-3").is_dir(), out


def test_a_users_step_folder_in_the_run_directory_is_never_replaced(area, monkeypatch, capsys):
    """step-1/ without meta.json (not a checkpoint) was replaced by the step-1 save, then rotated out."""
    run = area["root"] / "out" / "run"
    (run / "step-1").mkdir(parents=True)
    (run / "step-1" / "notes.txt").write_text("mine")
    before = tree_digest(run)
    code, out = _main(_args(area, "run", "--keep_checkpoints", "1"), monkeypatch, capsys)
    assert code == 1 and "holds step-1, which is not a checkpoint of this trainer (no meta.json)" in out, out
    assert tree_digest(run) == before


@pytest.mark.parametrize("where", ["model_name", "output_dir"])
def test_a_name_longer_than_the_file_system_allows_is_a_flag_error(area, monkeypatch, capsys, where):
    """A 300-character --model_name (or --output_dir part) ended in an OSError traceback (ENAMETOOLONG)."""
    long = "한" * 100  # 300 bytes in UTF-8
    (area["root"] / "out").mkdir()  # an existing --output_dir: its listing raised ENAMETOOLONG
    if where == "model_name":
        argv = _args(area, long)
    else:
        argv = _args(area, "run", out=area["root"] / "out" / long)
    code, out = _main(argv, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out, out
    assert f"--{where}: {long[:40]}... is 300 bytes long; a file or folder name may have at most 255 bytes" in out
    assert list((area["root"] / "out").iterdir()) == []


def test_mlflow_run_of_a_moved_run_directory_continues_and_writes_nothing_outside_it(
        area, monkeypatch, capsys, tmp_path):
    """The run directory's own MLflow store moves with it; its experiment keeps the artifact location of
    where it was made. A resumed run started a new MLflow run and logged its artifacts into the old
    location (re-creating a moved run's directory, or writing into the original of a copy)."""
    pytest.importorskip("mlflow")
    import sqlite3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "my run 한"  # quoted in the store's artifact URIs
    first = area["root"] / "first"
    code, out = _main(_args(area, name, "--report_to", "mlflow", out=first), monkeypatch, capsys)
    assert code == 0, out
    moved = area["root"] / "moved"
    shutil.copytree(first, moved)  # a copy: the original stays, and must stay as it is
    before = tree_digest(first)
    code, out = _main(_args(area, name, "--report_to", "mlflow", "--checkpoint", "auto", "--num_steps", "3",
                            out=moved), monkeypatch, capsys)
    assert code == 0, out
    assert tree_digest(first) == before
    assert "MLflow: continuing run" in out and "outside this run directory" in out, out
    with sqlite3.connect(moved / name / "mlruns" / "mlflow.db") as db:
        runs = db.execute("select run_uuid from runs").fetchall()
        steps = db.execute("select max(step) from metrics").fetchone()[0]
    assert len(runs) == 1 and steps == 3


@pytest.mark.parametrize("settings, message", [
    ({"NPROC_PER_NODE": "abc"}, "NPROC_PER_NODE must be a number of processes >= 1 (or auto, cpu, gpu), got 'abc'"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a number of processes >= 1 (or auto, cpu, gpu), got '0'"),
    ({"NPROC_PER_NODE": "1", "MAX_RESTARTS": "x"}, "MAX_RESTARTS must be a number >= 0, got 'x'"),
    ({"PYTHON": "no-such-python"}, "PYTHON=no-such-python: no such command"),
])
def test_launch_script_settings_are_checked_before_torchrun(settings, message):
    """torchrun answered them with a traceback (ValueError, AssertionError for 0)."""
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--model_name", "x"], cwd=REPO,
                          env=env(**settings), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("env_vars,said", [
    ({"RANK": "0"}, "WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='x' is not a number"),
])
def test_a_rank_exported_by_hand_names_what_torchrun_would_set(env_vars, said):
    """RANK set without the rest of torchrun's environment (a job script exporting it): one line naming what is
    missing and torchrun, not torch's KeyError / ValueError traceback."""
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", "from trainer import dist; dist.init()"], cwd=REPO, text=True,
                          capture_output=True, env=clean | env_vars | {"PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 1 and said in proc.stderr and "torchrun" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_model_a_run_takes_the_checkpoints_config(area, monkeypatch, capsys):
    """--model defaulted to `small` whatever --checkpoint held: fine-tuning from a final/ folder, or
    resuming with --checkpoint auto, without repeating --model stopped with "trained with another model
    config". Without --model the checkpoint's config is used (a step-N's meta.json, final/config.json);
    a --model that differs is still refused, the message naming both fixes."""
    out_dir = area["root"] / "out"
    base = ["--corpus_path", str(area["corpus"]), "--max_seq_length", "64", "--train_batch_size", "4",
            "--num_workers", "0", "--no_progress", "--output_dir", str(out_dir)]
    code, out = _main(base + ["--model", str(area["cfg"]), "--tokenizer", str(area["tok"]), "--model_name", "pre",
                              "--num_steps", "2", "--save_steps", "1"], monkeypatch, capsys)
    assert code == 0, out
    code, out = _main(base + ["--model_name", "pre", "--num_steps", "3", "--checkpoint", "auto"], monkeypatch, capsys)
    assert code == 0 and "resumed" in out and "at step 2" in out, out
    run = out_dir / "pre"
    assert json.loads((run / "step-3" / "meta.json").read_text())["model_config"]["hidden_size"] == 32
    code, out = _main(base + ["--model_name", "next", "--num_steps", "1", "--checkpoint", str(run / "final")],
                      monkeypatch, capsys)
    assert code == 0 and "initialised matching weights" in out, out
    code, out = _main(base + ["--model_name", "other", "--num_steps", "1", "--checkpoint", str(run / "final"),
                              "--model", "small"], monkeypatch, capsys)
    assert code != 0 and "leave out --model (the checkpoint's config is the default)" in out, out
