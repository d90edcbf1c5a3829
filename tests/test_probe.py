"""--probe_steps: downstream probes during pretraining (trainer/probe.py).

A tiny pretrain with probes logs real task metrics at the probe steps, computed from the weights
of that step (trainer.evaluate on the step-N checkpoint, with the recipe the run prints, gives the
same numbers), and trains exactly as the same run without probes (losses, weights). Bad probe
flags stop the run before any work. Slow: 2 processes (DDP and FSDP2), and SIGTERM during a probe.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from argparse import Namespace

import pytest

from tests.pretrain_util import COMMON, KLUE, SHARED
from tests.trainer_util import REPO, launch, write_config

pytestmark = pytest.mark.skipif(not (KLUE / "sts_train.json").exists() or not (SHARED / "nsmc").is_dir(),
                                reason="../shared/data (klue, nsmc) not available")
# tiny probes: 4 fine-tuning steps on 64 rows, scored on 64
PROBE = ["--probe_steps", "2", "--probe_tasks", "nsmc,sts", "--probe_set", "all.max_seq_length=64",
         "--probe_set", "all.max_train_examples=64", "--probe_set", "all.max_eval_examples=64",
         "--probe_set", "all.train_batch_size=16", "--probe_set", "all.learning_rate=1e-3"]
TRAIN_COLUMNS = ("loss", "mlm_loss", "mlm_acc", "sop_loss", "sop_acc", "lr", "grad_norm")


def pretrain_argv(root, corpus, tokenizer, name: str, *extra: str) -> list[str]:
    # dropout on: the probe must give the training's random stream back untouched
    cfg = write_config(root / "tiny_dropout.json", dropout_prob=0.1)
    return ["--model_name", name, "--model", str(cfg), "--output_dir", str(root / "out"), "--corpus_path",
            str(corpus), "--tokenizer", str(tokenizer), "--train_batch_size", "8", "--num_steps", "4", *COMMON,
            "--save_steps", "2", *extra]


def tsv_columns(path) -> dict[str, list[str]]:
    lines = [ln.split("\t") for ln in path.read_text().splitlines()]
    return {c: [row[i] for row in lines[1:]] for i, c in enumerate(lines[0])}


def weights(path) -> dict:
    from trainer.checkpoint import load_weights

    return load_weights(path / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("probe")
    probed = launch("train.py", pretrain_argv(root, tiny_corpus, tiny_tokenizer_dir, "probed", *PROBE))
    launch("train.py", pretrain_argv(root, tiny_corpus, tiny_tokenizer_dir, "plain"))
    return Namespace(root=root, probed=root / "out" / "probed", plain=root / "out" / "plain", stdout=probed.stdout)


def test_probes_log_task_metrics_and_leave_training_alone(runs):
    import torch

    from trainer.plot import read_scalars

    # training: the same losses and the same final weights as without probes
    probed, plain = tsv_columns(runs.probed / "loss.tsv"), tsv_columns(runs.plain / "loss.tsv")
    assert probed["step"] == plain["step"] == ["1", "2", "3", "4"]
    for col in TRAIN_COLUMNS:
        assert probed[col] == plain[col], col
    a, b = weights(runs.probed), weights(runs.plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # probe values at steps 2 and 4: an accuracy, a Pearson r that moves with the weights
    scalars = read_scalars(runs.probed)
    (acc_steps, acc), (r_steps, pearson) = scalars["probe/nsmc/accuracy"], scalars["probe/sts/pearson"]
    assert list(acc_steps) == list(r_steps) == [2, 4]
    assert all(0 <= v <= 1 for v in acc) and all(-1 <= v <= 1 for v in pearson)
    assert pearson[0] != pearson[1]
    assert "probe/sts/f1" in scalars and list(scalars["probe/time_s"][0]) == [2, 4]
    # loss.tsv: the headline metrics and the seconds, in the rows of the probe steps
    assert probed["probe_nsmc_accuracy"][::2] == ["", ""] and probed["probe_sts_pearson"][1::2][0] != ""
    assert float(probed["probe_sts_pearson"][1]) == pytest.approx(pearson[0], abs=1e-5)
    # cost printed per probe; the scratch copies are gone
    for step in (2, 4):
        assert re.search(rf"\[probe\] step {step}: nsmc/accuracy=[\d.]+, sts/pearson=-?[\d.]+ \([\d.]+ s; "
                         rf"{step // 2} probe\(s\) [\d.]+ s = [\d.]+% of the training time so far\)", runs.stdout)
    assert not (runs.probed / "probe").exists()


@pytest.mark.slow
def test_probe_equals_trainer_evaluate_on_the_same_weights(runs):
    """The recipe the run prints, given to trainer.evaluate with the step-2 checkpoint: the same numbers."""
    import json

    from trainer.plot import read_scalars

    line = next(ln for ln in runs.stdout.splitlines() if ln.startswith("[probe] nsmc, sts every 2 steps"))
    sets = re.findall(r"--set (\S+?)(?=[ `])", line)
    assert "nsmc.num_steps=4" in sets and "sts.learning_rate=1e-3" in sets
    out = runs.root / "evaluation"
    cmd = [sys.executable, "-m", "trainer.evaluate", str(runs.probed / "step-2"), "--tasks", "nsmc,sts",
           "--output_dir", str(out), "--no_progress", *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs_json = json.loads((out / "results.json").read_text())["runs"]
    scalars = read_scalars(runs.probed)
    assert runs_json["probed/step-2|nsmc|42"]["metrics"]["accuracy"] == pytest.approx(
        scalars["probe/nsmc/accuracy"][1][0], abs=1e-6)
    assert runs_json["probed/step-2|sts|42"]["metrics"]["pearson"] == pytest.approx(
        scalars["probe/sts/pearson"][1][0], abs=1e-6)


def _parse(argv: list[str]):
    from trainer.args import parse_args

    return parse_args(0, argv)


@pytest.fixture
def base(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    return pretrain_argv(tmp_path, tiny_corpus, tiny_tokenizer_dir, "bad")


@pytest.mark.parametrize("extra, message", [
    (["--probe_steps", "2", "--probe_tasks", "nsmc,klue_re"],
     "--probe_tasks 'nsmc,klue_re': unknown task(s) klue_re; valid: nsmc, korquad, ner, nli, sts, ict"),
    (["--probe_steps", "-1"], "--probe_steps must be >= 0"),
    (["--probe_steps", "2", "--probe_set", "nsmc:max_seq_length=64"], "expected TASK.FLAG=VALUE"),
    # the evaluate recipe's 128 tokens exceed the tiny model's 64 positions: the launcher's message, then the fix
    (["--probe_steps", "2"], "--max_seq_length 128 exceeds the model's max_position_embedding 64"),
    (["--probe_steps", "2"], "--probe_tasks nsmc: its probe recipe is not valid for this run (see the message "
                             "above); fix it with --probe_set nsmc.FLAG=VALUE"),
    (["--probe_steps", "2", "--probe_set", "all.max_seq_length=64", "--probe_data_dir", "/nonexistent"],
     "--train_file /nonexistent/nsmc/sentiment_train.tsv: no such file"),
], ids=["unknown_task", "negative_steps", "bad_set", "recipe_too_long", "recipe_fix", "no_data"])
def test_bad_probe_flags_stop_before_any_work(base, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(base + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(base[base.index("--output_dir") + 1], "bad"))  # nothing written


def test_probe_refusals(base, tmp_path, capsys, monkeypatch):
    ok = ["--probe_steps", "2", "--probe_set", "all.max_seq_length=64"]
    assert _parse(base + ok).probe_steps == 2  # valid as given
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        _parse(base + ok)
    assert "train_batch_size 32 (the global batch) is not divisible by the 3 processes" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        i = base.index("--corpus_path")  # pretraining's text: a classify run has none
        _parse(base[:i] + base[i + 2:] + ok + ["--train_mode", "classify", "--train_file",
                                                str(SHARED / "nsmc" / "sentiment_test.tsv")])
    assert "--probe_steps probes a pretraining run" in capsys.readouterr().err
    (tmp_path / "out" / "bad" / "probe").mkdir(parents=True)
    (tmp_path / "out" / "bad" / "probe" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        _parse(base + ok)
    assert "probe exists and was not written by the probe" in capsys.readouterr().err
    assert (tmp_path / "out" / "bad" / "probe" / "notes.txt").read_text() == "mine"


def test_probe_recipe_overrides():
    """The slice sets num_steps (one pass) unless given; a task's own --probe_set beats all.X."""
    from trainer.probe import evaluate_sets

    def sets(*probe_set):
        args = Namespace(probe_tasks="nsmc,sts", probe_set=list(probe_set), probe_data_dir="/d")
        return evaluate_sets(args, parser=None)

    assert sets() == {"nsmc": ["nsmc.max_train_examples=1024", "nsmc.max_eval_examples=512", "nsmc.num_steps=32",
                               "nsmc.warmup_steps=3"],
                      "sts": ["sts.max_train_examples=1024", "sts.max_eval_examples=512", "sts.num_steps=64",
                              "sts.warmup_steps=6"]}
    got = sets("sts.learning_rate=1e-4", "all.learning_rate=1e-3", "all.max_train_examples=100", "nsmc.num_steps=7")
    assert got["nsmc"] == ["nsmc.max_train_examples=100", "nsmc.max_eval_examples=512", "nsmc.warmup_steps=0",
                           "nsmc.learning_rate=1e-3", "nsmc.num_steps=7"]
    assert got["sts"] == ["sts.max_train_examples=100", "sts.max_eval_examples=512", "sts.num_steps=7",
                          "sts.warmup_steps=0", "sts.learning_rate=1e-4"]


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp2(runs, tiny_corpus, tiny_tokenizer_dir):
    """2 processes, DDP and FSDP2 with sharded parameters (gathered for the probe's copy; the
    fine-tunes run on FSDP2 too): each trains exactly as without probes; FSDP2's probe values are
    DDP's. A 60 s collective timeout: no rank waits long for another during a probe."""
    import torch

    from trainer.plot import read_scalars

    out = {}
    for launcher, extra in (("train.py", []), ("train_zero_two.py", ["--zero3"])):
        for probed in (True, False):
            name = f"two-{launcher.split('.')[0]}-{'probed' if probed else 'plain'}"
            argv = pretrain_argv(runs.root, tiny_corpus, tiny_tokenizer_dir, name, *extra, *(PROBE if probed else []))
            argv[argv.index("--train_batch_size") + 1] = "4"
            launch(launcher, argv, nproc=2, env={"TRAINER_PG_TIMEOUT_S": "60"})
            out[launcher, probed] = runs.root / "out" / name
    for launcher in ("train.py", "train_zero_two.py"):
        probed, plain = tsv_columns(out[launcher, True] / "loss.tsv"), tsv_columns(out[launcher, False] / "loss.tsv")
        for col in TRAIN_COLUMNS:
            assert probed[col] == plain[col], (launcher, col)
        a, b = weights(out[launcher, True]), weights(out[launcher, False])
        assert all(torch.equal(a[k], b[k]) for k in a), launcher
    ddp, fsdp = read_scalars(out["train.py", True]), read_scalars(out["train_zero_two.py", True])
    for tag in ("probe/nsmc/accuracy", "probe/sts/pearson"):
        assert list(ddp[tag][0]) == list(fsdp[tag][0]) == [2, 4]
        assert list(fsdp[tag][1]) == pytest.approx(list(ddp[tag][1]), abs=1e-3), tag
    assert not (out["train_zero_two.py", True] / "probe").exists()


@pytest.mark.slow
def test_sigterm_during_a_probe_stops_the_pretraining_at_its_next_step(runs, tiny_corpus, tiny_tokenizer_dir):
    """SIGTERM reaching the fine-tune of the step-2 probe (its 3rd step): the probe ends, the
    pretraining saves at step 3 and exits 143 (as for SIGTERM between steps); resuming finishes."""
    argv = pretrain_argv(runs.root, tiny_corpus, tiny_tokenizer_dir, "term", *PROBE)
    proc = launch("train.py", argv, check=False, env={"TRAINER_TEST_FAULT": "sigterm:3:0"})
    rd = runs.root / "out" / "term"
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "[probe] step 2: SIGTERM during the probe; it ends here" in proc.stdout
    assert "SIGTERM at step 3: saved checkpoint" in proc.stderr
    assert (rd / "step-3").is_dir() and not (rd / "probe").exists()
    launch("train.py", argv + ["--checkpoint", "auto"])
    resumed, plain = tsv_columns(rd / "loss.tsv"), tsv_columns(runs.plain / "loss.tsv")
    assert resumed["loss"] == plain["loss"]
