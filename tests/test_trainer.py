"""The launchers, run for real: torchrun with 2 gloo processes on the CPU, compared with each other."""
from __future__ import annotations

import json
import math

import pytest

from tests.trainer_util import launch, losses, read_tsv, write_config

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("trainer")
    cfg = write_config(root / "tiny.json")
    albert = write_config(root / "tiny_albert.json", layer_group=2)
    base = ["--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_length", "64",
            "--train_batch_size", "4", "--num_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "5e-3",
            "--scheduler_num_steps", "100", "--warmup_steps", "0", "--num_workers", "0", "--no_progress", "--output_dir", str(root / "out")]
    return {"root": root, "cfg": cfg, "albert": albert, "base": base, "out": root / "out"}


def _run(setup, name, script, nproc, extra=(), model=None):
    args = setup["base"] + ["--model", str(model or setup["cfg"]), "--model_name", name, *extra]
    proc = launch(script, args, nproc=nproc)
    return setup["out"] / name, proc


@pytest.fixture(scope="module")
def runs(setup):
    """DDP and ZeRO-1/2/3 on 2 processes, same data and seed; ZeRO-3 checkpoints at step 4."""
    out = {}
    out["ddp"], _ = _run(setup, "ddp", "train.py", 2)
    out["zero1"], _ = _run(setup, "zero1", "train_zero_one.py", 2)
    out["zero2"], _ = _run(setup, "zero2", "train_zero_two.py", 2)
    out["zero3"], _ = _run(setup, "zero3", "train_zero_two.py", 2, ["--zero3", "--save_steps", "4"])
    return out


def test_each_launcher_trains_and_loss_falls(runs):
    for name, rd in runs.items():
        ls = losses(rd)
        assert len(ls) == STEPS, name
        assert all(math.isfinite(x) for x in ls), name
        assert sum(ls[-3:]) / 3 < ls[0] - 0.05, f"{name}: loss did not fall: {ls}"
        assert (rd / "final" / "model.safetensors").is_file(), name


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_zero_stages_follow_ddp(runs, name):
    ddp, other = losses(runs["ddp"]), losses(runs[name])
    assert max(abs(a - b) for a, b in zip(ddp, other)) < 1e-4, (ddp, other)


def test_sharded_optimizer_state_is_half_of_ddp(runs):
    """FSDP shards every tensor: exactly half per rank. ZeRO-1 assigns whole tensors to ranks, so
    the tiny model's embedding (73% of its parameters) makes one rank hold more; no state is duplicated."""
    ddp = read_tsv(runs["ddp"] / "loss.tsv")[-1]
    assert ddp["optimizer_state_max_mb"] == pytest.approx(ddp["optimizer_state_mb"])
    for name in ("zero1", "zero2", "zero3"):
        row = read_tsv(runs[name] / "loss.tsv")[-1]
        assert row["optimizer_state_mb"] == pytest.approx(ddp["optimizer_state_mb"] / 2, rel=0.01), name
        limit = 0.76 if name == "zero1" else 0.51
        assert row["optimizer_state_max_mb"] < limit * ddp["optimizer_state_mb"], (name, row, ddp)


# Mix LM (with Switch experts) is slow: the suite stays under 10 minutes on 2 cores; ALBERT runs in CI
@pytest.mark.parametrize("kind", ["albert", pytest.param("mix_lm", marks=pytest.mark.slow)])
def test_auto_wrap_with_shared_layers_follows_ddp(setup, kind):
    """Per-layer FSDP units with a layer group shared by 2 layers (wrapped once), ZeRO-3 vs DDP."""
    model = setup["albert"] if kind == "albert" else write_config(
        setup["root"] / "tiny_mix_lm.json", model_type="mix_lm", n_experts=2, kernel_size=5, layer_group=2)
    ddp, _ = _run(setup, f"{kind}_ddp", "train.py", 2, ["--num_steps", "4"], model=model)
    z3, _ = _run(setup, f"{kind}_z3_wrap", "train_zero_two.py", 2, ["--num_steps", "4", "--zero3", "--auto_wrap"],
                 model=model)
    a, b = losses(ddp), losses(z3)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


@pytest.fixture(scope="module")
def dropout_run(setup):
    cfg = write_config(setup["root"] / "tiny_dropout.json", dropout_prob=0.1)
    full, _ = _run(setup, "full", "train.py", 1, ["--save_steps", "3"], model=cfg)
    return full, cfg


def test_resume_matches_uninterrupted(setup, dropout_run):
    """Dropout on: exact resume needs the data position and the RNG states."""
    full, cfg = dropout_run
    resumed, proc = _run(setup, "resumed", "train.py", 1, ["--checkpoint", str(full / "step-3")], model=cfg)
    assert "resumed" in proc.stdout and "step 3" in proc.stdout
    a, b = losses(full)[3:], losses(resumed)
    assert len(b) == STEPS - 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)


def test_resume_applies_a_changed_learning_rate(setup, dropout_run):
    """The scheduler state must not bring back the old run's peak rate."""
    full, cfg = dropout_run
    rd, proc = _run(setup, "new_lr", "train.py", 1,
                    ["--checkpoint", str(full / "step-3"), "--learning_rate", "1e-3", "--num_steps", "4"], model=cfg)
    (row,) = read_tsv(rd / "loss.tsv")
    assert row["lr"] == pytest.approx(1e-3 * (100 - 3) / 100)  # linear decay over --scheduler_num_steps 100
    assert ("[checkpoint] the learning-rate schedule differs from the checkpoint's run (learning_rate 0.005 -> "
            "0.001): step 4 trains at lr 0.00097 (under the original schedule: 0.00485)") in proc.stdout, proc.stdout


def test_resume_auto_continues_the_same_run(setup):
    rd, _ = _run(setup, "auto", "train.py", 1, ["--num_steps", "4", "--save_steps", "2", "--checkpoint", "auto"])
    assert losses(rd) and (rd / "step-4").is_dir()
    rd, proc = _run(setup, "auto", "train.py", 1, ["--num_steps", "6", "--checkpoint", "auto"])
    assert "at step 4" in proc.stdout
    assert [int(r["step"]) for r in read_tsv(rd / "loss.tsv")] == [1, 2, 3, 4, 5, 6]
    assert "schedule differs" not in proc.stdout  # --scheduler_num_steps 100 both times: the same schedule
    # raised past the end of its own schedule (--num_steps as its length): the linear decay is stretched
    rd, proc = _run(setup, "auto", "train.py", 1, ["--num_steps", "8", "--scheduler_num_steps", "0",
                                                   "--checkpoint", "auto"])
    assert ("the learning-rate schedule differs from the checkpoint's run (schedule length 100 -> 8): step 7 trains "
            "at lr 0.00125 (under the original schedule: 0.0047)") in proc.stdout, proc.stdout


def test_auto_batch_size_on_a_resume_keeps_the_checkpoints(setup, runs):
    """--train_batch_size 0 resuming a 2-process ZeRO-3 run on 2 processes takes its batch (4), so the
    losses continue the original run's; on 1 process it searches again and says so."""
    rd, proc = _run(setup, "z3_auto", "train_zero_two.py", 2,
                    ["--zero3", "--train_batch_size", "0", "--checkpoint", str(runs["zero3"] / "step-4")])
    assert "[batch size] --train_batch_size 0 on a resume: the checkpoint's 4 per process (2 process(es))" in proc.stdout
    two, resumed = losses(runs["zero3"])[4:], losses(rd)
    assert max(abs(x - y) for x, y in zip(two, resumed)) < 1e-5, (two, resumed)
    _, proc = _run(setup, "z3_auto1", "train_zero_two.py", 1,
                   ["--zero3", "--train_batch_size", "0", "--max_memory_mb", "64", "--num_steps", "5",
                    "--checkpoint", str(runs["zero3"] / "step-4")])
    assert "on a resume at another process count or accumulation (checkpoint: 4 per process x 2" in proc.stdout
    assert "[batch size] activations" in proc.stdout


def test_zero3_checkpoint_resumes_on_one_process(setup, runs):
    """Written by 2 processes (batch 4 each), resumed by 1 (batch 8): the same global batches."""
    rd, proc = _run(setup, "z3_one", "train_zero_two.py", 1,
                    ["--zero3", "--train_batch_size", "8", "--checkpoint", str(runs["zero3"] / "step-4")])
    assert "at step 4" in proc.stdout
    two, one = losses(runs["zero3"])[4:], losses(rd)
    assert len(one) == STEPS - 4
    # per-rank means of MLM loss vs one global mean: close, not bitwise
    assert max(abs(x - y) / y for x, y in zip(two, one)) < 0.03, (two, one)


def test_tensorboard_scalars_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["ddp"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/mlm_loss", "train/mlm_acc", "train/sop_loss", "train/sop_acc", "train/lr",
                "train/grad_norm", "train/loss_scale", "perf/tokens_per_s", "perf/rss_mb"):
        assert tag in tags, (tag, sorted(tags))
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    tsv = losses(runs["ddp"])
    assert [e.value for e in events] == pytest.approx(tsv, rel=1e-5)
    assert "args/text_summary" in acc.Tags()["tensors"]


def test_checkpoint_layout_and_meta(runs):
    ckpt = runs["zero3"] / "step-4"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["stage"] == 3
    assert meta["model_config"]["hidden_size"] == 32 and meta["args"]["zero3"] is True
    assert {p.name for p in (ckpt / "rng").iterdir()} == {"rank0.pt", "rank1.pt"}
    assert not list(runs["zero3"].glob(".step-*"))


def test_mixed_precision_runs(setup):
    for flag in ("--bf16", "--fp16"):
        rd, _ = _run(setup, f"amp{flag}", "train.py", 1, [flag, "--num_steps", "3"])
        rows = read_tsv(rd / "loss.tsv")
        assert all(math.isfinite(r["loss"]) for r in rows), flag
        if flag == "--fp16":
            assert rows[0]["loss_scale"] > 1


def test_every_split_of_the_global_batch_trains_alike(setup, runs):
    """The global batch of 8 as 2 processes x 4 (DDP), 1 process x 8, and ZeRO-1 on 2 processes x 2 x
    accumulation 2: the MLM loss of a step is the mean over all its masked tokens (each micro-batch's
    weighted by its share, trainer.loop.token_weights), so the three follow one trajectory: losses and
    gradient norms equal to 1e-5 relative over 4 steps. Before, each micro-batch's loss was a mean over
    its own tokens and the runs differed from the first step on (3e-3 on the loss, 2e-2 by step 8)."""
    steps = ["--num_steps", "4"]
    one, _ = _run(setup, "one_by_8", "train.py", 1, ["--train_batch_size", "8", *steps])
    accum, proc = _run(setup, "accum", "train_zero_one.py", 2, ["--train_batch_size", "2",
                                                                 "--gradient_accumulation_steps", "2", *steps])
    assert "batch=2x2x2" in proc.stdout
    ddp = read_tsv(runs["ddp"] / "loss.tsv")[:4]
    for other in (read_tsv(one / "loss.tsv"), read_tsv(accum / "loss.tsv")):
        assert [r["step"] for r in other] == [r["step"] for r in ddp]
        for key in ("loss", "mlm_loss", "mlm_acc", "grad_norm"):
            assert [r[key] for r in other] == pytest.approx([r[key] for r in ddp], rel=1e-5, abs=1e-6), key


def test_auto_batch_size_prints_its_decision(setup):
    rd, proc = _run(setup, "auto_bs", "train_zero_two.py", 2,
                    ["--train_batch_size", "0", "--max_memory_mb", "50", "--num_steps", "1"])
    assert "[batch size]" in proc.stdout and "saved-tensor hooks" in proc.stdout
    chosen = int(proc.stdout.split("--train_batch_size ")[-1].split()[0])
    assert 16 <= chosen < 1289 // 2  # the 50 MB budget binds, not the data size
    assert f"batch={chosen}x1x2" in proc.stdout


@pytest.mark.parametrize("stage,extra,message", [
    (0, ["--zero3"], "--zero3 only works with train_zero_two.py"),
    (0, ["--max_seq_length", "65"], "exceeds the model's max_position_embedding"),
    (0, ["--train_batch_size", "-1"], "--train_batch_size must be >= 0"),
    (0, ["--train_batch_size", "0"], "is for the ZeRO launchers"),
    (0, ["--fp16", "--bf16"], "exclusive"),
    (0, ["--corpus_path", "/nonexistent.dat"], "no such file"),
    (1, ["--auto_wrap"], "use it with train_zero_two.py"),
    (0, ["--scheduler_num_steps", "3"], "must be >= --num_steps"),
    (0, ["--model", "no_such_model"], "no model config named"),
])
def test_bad_arguments_fail_in_validation(setup, capsys, stage, extra, message):
    from trainer.args import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(stage, setup["base"] + ["--model", str(setup["cfg"]), "--model_name", "bad"] + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_fails_before_work_in_a_real_launch(setup):
    """A check that needs the data (epoch size vs batch) still stops before any step or checkpoint."""
    args = setup["base"] + ["--model", str(setup["cfg"]), "--model_name", "bad", "--max_steps_per_epoch", "100000"]
    proc = launch("train.py", args, check=False)
    assert proc.returncode != 0
    assert "exceeds the" in proc.stderr and "lower --max_steps_per_epoch" in proc.stderr, proc.stderr[-2000:]
    assert not (setup["out"] / "bad").exists() or not list((setup["out"] / "bad").glob("step-*"))
