"""--engine deepspeed / fairscale, run for real (torchrun, 2 gloo processes on the CPU) against
the torch engine on the same data and seed: same losses, sharded optimizer state, exact resume."""
from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest

from tests.trainer_util import launch, losses, read_tsv, write_config

STEPS = 6
SAVE = 3
ENV = {"DS_ACCELERATOR": "cpu"}
SCRIPT = {0: "train.py", 1: "train_zero_one.py", 2: "train_zero_two.py", 3: "train_zero_two.py"}
pytest.importorskip("deepspeed")
pytest.importorskip("fairscale")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("engines")
    cfg = write_config(root / "tiny.json")
    base = ["--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_length", "64",
            "--train_batch_size", "4", "--num_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "2e-3",
            "--warmup_steps", "2", "--num_workers", "0", "--no_progress", "--output_dir", str(root / "out"),
            "--model", str(cfg)]
    return {"root": root, "base": base, "out": root / "out"}


def _run(setup, name: str, engine: str, stage: int, extra=(), nproc: int = 2, check: bool = True):
    args = setup["base"] + ["--model_name", name, "--engine", engine, *(["--zero3"] if stage == 3 else []), *extra]
    proc = launch(SCRIPT[stage], args, nproc=nproc, env=ENV, check=check)
    return setup["out"] / name, proc


RUNS = [("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3),
        ("fairscale", 1), ("fairscale", 2)]


@pytest.fixture(scope="module")
def runs(setup):
    """Every engine x stage that runs on the CPU, 2 processes, checkpoint at step SAVE."""
    return {(e, s): _run(setup, f"{e}{s}", e, s, ["--save_steps", str(SAVE)])[0] for e, s in RUNS}


@pytest.mark.parametrize("engine,stage", RUNS[1:])
def test_engine_follows_torch_ddp(runs, engine, stage):
    ref, other = losses(runs["torch", 0]), losses(runs[engine, stage])
    assert len(other) == STEPS
    assert max(abs(a - b) for a, b in zip(ref, other)) < 1e-4, (ref, other)
    ref_rows, rows = read_tsv(runs["torch", 0] / "loss.tsv"), read_tsv(runs[engine, stage] / "loss.tsv")
    for key in ("lr", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=1e-3), key
    assert (runs[engine, stage] / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("engine,stage", RUNS[1:])
def test_exported_weights_match_torch(runs, engine, stage):
    from trainer.checkpoint import load_weights

    ref = load_weights(runs["torch", 0] / "final" / "model.safetensors")
    other = load_weights(runs[engine, stage] / "final" / "model.safetensors")
    assert ref.keys() == other.keys()
    assert max(float((ref[k].float() - other[k].float()).abs().max()) for k in ref) < 1e-5


def test_optimizer_state_shrinks_with_the_stage(runs):
    def mb(key, column="optimizer_state_mb"):
        return read_tsv(runs[key] / "loss.tsv")[-1][column]

    full = mb(("torch", 0))
    assert mb(("deepspeed", 0)) == pytest.approx(full, rel=0.01)
    for stage in (1, 2, 3):  # DeepSpeed flattens and splits evenly: exactly half per rank
        assert mb(("deepspeed", stage)) == pytest.approx(full / 2, rel=0.02), stage
        assert mb(("deepspeed", stage), "optimizer_state_max_mb") == pytest.approx(full / 2, rel=0.02), stage
    for stage in (1, 2):  # OSS assigns whole parameters greedily: every rank holds less, not exactly half
        assert mb(("fairscale", stage), "optimizer_state_max_mb") < 0.8 * full, stage
        assert mb(("fairscale", stage)) < 0.8 * full, stage


@pytest.mark.parametrize("engine,stage", [("deepspeed", 3), ("fairscale", 2)])
def test_resume_matches_uninterrupted(setup, runs, engine, stage):
    ckpt = runs[engine, stage] / f"step-{SAVE}"
    assert (ckpt / ("ds" if engine == "deepspeed" else "fairscale")).is_dir()
    rd, proc = _run(setup, f"{engine}{stage}_resumed", engine, stage, ["--checkpoint", str(ckpt)])
    assert f"at step {SAVE}" in proc.stdout
    full, resumed = losses(runs[engine, stage])[SAVE:], losses(rd)
    assert len(resumed) == STEPS - SAVE
    assert max(abs(a - b) for a, b in zip(full, resumed)) < 1e-5, (full, resumed)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_resumes_on_another_process_count(setup, runs, stage):
    """Written by 2 processes (batch 4 each), resumed by 1 (batch 4 x accumulation 2: the same global
    batches and gradients): step-3/ds/ is converted to step-3/ds_universal/ (ds/ untouched, the
    conversion reused), and the losses, rates and gradient norms are the uninterrupted run's."""
    from tests.launch_util import tree_digest
    from trainer.engines.deepspeed import universal_checkpoint

    ckpt = runs["deepspeed", stage] / f"step-{SAVE}"
    before = tree_digest(ckpt / "ds")
    extra = ["--gradient_accumulation_steps", "2", "--checkpoint", str(ckpt)]
    rd, proc = _run(setup, f"ds{stage}_one", "deepspeed", stage, extra, nproc=1)
    assert f"holds ZeRO-{stage} partitions of 2 processes; this run is ZeRO-{stage} on 1" in proc.stdout
    assert f"converted {ckpt / 'ds'} to the universal checkpoint {ckpt / 'ds_universal'}" in proc.stdout
    assert f"at step {SAVE}" in proc.stdout
    assert tree_digest(ckpt / "ds") == before
    full, resumed = read_tsv(runs["deepspeed", stage] / "loss.tsv")[SAVE:], read_tsv(rd / "loss.tsv")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full], abs=1e-5), key
    said = []  # a second resume reads the cached conversion
    assert universal_checkpoint(ckpt, is_main=True, log=said.append) == ckpt / "ds_universal"
    assert said == [f"[deepspeed] using {ckpt / 'ds_universal'}, converted before"]


def test_torch_stages_resume_each_others_optimizer_state(setup, runs):
    """DDP's step-3 (name-keyed optimizer state in DCP) resumed by ZeRO-1 on 2 processes, which
    saves step-4 (its consolidated, index-keyed state), resumed by FSDP2 ZeRO-3 on 1 process
    (accumulation 2: the same global batches): every step is the uninterrupted DDP run's, so the
    AdamW moments came along both ways (a fresh optimizer gives other losses from the first step)."""
    extra = ["--checkpoint", str(runs["torch", 0] / f"step-{SAVE}"), "--save_steps", str(SAVE + 1)]
    zero1, proc = _run(setup, "torch0_to_zero1", "torch", 1, extra)
    assert f"at step {SAVE}" in proc.stdout and "start fresh" not in proc.stdout
    assert (zero1 / f"step-{SAVE + 1}" / "optimizer_zero1.pt").is_file()
    extra = ["--checkpoint", str(zero1 / f"step-{SAVE + 1}"), "--gradient_accumulation_steps", "2"]
    zero3, proc = _run(setup, "zero1_to_zero3", "torch", 3, extra, nproc=1)
    assert f"at step {SAVE + 1}" in proc.stdout
    full = read_tsv(runs["torch", 0] / "loss.tsv")
    resumed = read_tsv(zero1 / "loss.tsv")[:1] + read_tsv(zero3 / "loss.tsv")
    assert [r["step"] for r in resumed] == [r["step"] for r in full[SAVE:]]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[SAVE:]], abs=1e-5), key


@pytest.mark.parametrize("saved,stage,size", [(2, 3, 2), (3, 1, 1), (0, 2, 1), (2, 0, 2)])
def test_deepspeed_refuses_what_universal_checkpoints_cannot_convert(tmp_path, saved, stage, size):
    from types import SimpleNamespace

    from trainer.engines.deepspeed import DeepSpeedEngine

    (tmp_path / "meta.json").write_text(json.dumps({"world_size": 2, "stage": saved}))
    engine = SimpleNamespace(stage=stage, ctx=SimpleNamespace(world_size=size, is_main=True, log=print))
    with pytest.raises(SystemExit, match=f"ZeRO stage {saved} .2 processes., resumed with stage {stage}") as e:
        DeepSpeedEngine._resume_dir(engine, tmp_path)
    assert "exported weights" in str(e.value)
    assert not (tmp_path / "ds_universal").exists()


def test_fairscale_zero3_on_cpu_names_the_alternatives(setup):
    _, proc = _run(setup, "fs3", "fairscale", 3, check=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "needs CUDA" in err and "--engine deepspeed" in err and "--engine torch" in err, err[-2000:]


def test_fairscale_zero3_first_backward_and_step_name_the_alternatives():
    """fairscale FSDP (CUDA only) failed on an H100 with torch 2.11 in its first backward, then, with
    the sub-loss outputs detached, in its first optimizer step (gradients left in fp16): each first
    call turns a failure into one line naming --engine torch / deepspeed; later calls are not wrapped."""
    import torch

    from trainer.engines.fairscale import FairscaleEngine, _grad_only_through_loss

    engine = FairscaleEngine.__new__(FairscaleEngine)
    engine.stage, engine._checked = 3, set()

    def fails():
        raise RuntimeError("expected dtype float for `end` but got dtype c10::Half")
    with pytest.raises(SystemExit) as e:
        engine._first("optimizer step", fails)
    assert "first optimizer step" in str(e.value) and "c10::Half" in str(e.value)
    assert "--engine torch" in str(e.value) and "--engine deepspeed" in str(e.value)
    assert engine._first("backward", lambda: 7) == 7 and engine._checked == {"backward"}
    with pytest.raises(RuntimeError):      # checked once: a later failure is the library's own
        engine._first("backward", fails)
    # the first forward goes through the same guard (the module around fairscale FSDP)
    from trainer.engines.fairscale import _FirstStepGuard

    guard = _FirstStepGuard(torch.nn.Identity(), engine._first)
    with pytest.raises(SystemExit) as e:
        guard("not a tensor", extra=1)  # Identity takes no keyword: TypeError
    assert "first forward" in str(e.value) and "--engine torch" in str(e.value)
    assert torch.equal(guard(torch.ones(2)), torch.ones(2)) and "forward" in engine._checked
    # inside FSDP only "loss" keeps its graph (FSDP hooks every output that requires grad)
    x = torch.ones(2, requires_grad=True)
    out = _grad_only_through_loss(None, (), {"loss": (x * 2).sum(), "mlm_loss": (x * 3).sum(), "n": 4})
    assert out["loss"].requires_grad and not out["mlm_loss"].requires_grad and out["n"] == 4
    assert out["mlm_loss"].item() == 6.0


def test_deepspeed_config_conflict_fails_before_training(setup):
    user = setup["root"] / "user.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    rd, proc = _run(setup, "ds_conflict", "deepspeed", 1, ["--deepspeed_config", str(user)], nproc=1, check=False)
    err = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "train_micro_batch_size_per_gpu = 8" in err and "--train_batch_size gives 4" in err, err[-2000:]
    assert "zero_optimization.stage = 2" in err and "train_zero_one.py = 1" in err
    assert not (rd / "loss.tsv").exists()


# -- the config builder, without processes ------------------------------------------------
def _args(**kw) -> Namespace:
    base = dict(train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0, fp16=False, bf16=False,
                cpu_offload=False, learning_rate=2e-4, adam_betas=(0.9, 0.999), adam_epsilon=1e-6,
                weight_decay=0.01, warmup_steps=10, scheduler_num_steps=0, num_steps=100,
                deepspeed_config="user.json")
    return Namespace(**(base | kw))


def test_config_from_flags():
    from trainer.engines.deepspeed import build_config

    cfg = build_config(_args(bf16=True, cpu_offload=True), stage=3, world_size=4)
    assert cfg["train_batch_size"] == 4 * 2 * 4 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_user_config_auto_and_extra_keys_merge():
    from trainer.engines.deepspeed import build_config

    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
            "zero_optimization": {"stage": "auto", "allgather_bucket_size": 1000}, "optimizer": {
                "type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.01}}}
    cfg = build_config(_args(), stage=2, world_size=2, user=user)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 1000 and cfg["optimizer"]["params"]["lr"] == 2e-4


@pytest.mark.parametrize("user,message", [
    ({"gradient_accumulation_steps": 4}, "--gradient_accumulation_steps gives 2"),
    ({"bf16": {"enabled": True}}, "--bf16 gives False"),
    ({"train_batch_size": 64}, "train_batch_size = 64"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type = 'Lamb'"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "--learning_rate gives 0.0002"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "--cpu_offload is not given"),
])
def test_user_config_conflicts_are_named(user, message):
    from trainer.engines.deepspeed import build_config

    with pytest.raises(SystemExit) as e:
        build_config(_args(), stage=2, world_size=2, user=user)
    assert message in str(e.value) and "user.json" in str(e.value)


@pytest.mark.slow
def test_deepspeed_accumulation_follows_torch(setup):
    extra = ["--gradient_accumulation_steps", "2", "--num_steps", "3"]
    ref, _ = _run(setup, "torch_accum", "torch", 0, extra)
    ds, _ = _run(setup, "ds_accum", "deepspeed", 2, extra)
    a, b = losses(ref), losses(ds)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


@pytest.mark.slow
def test_deepspeed_bf16_trains(setup):
    rd, _ = _run(setup, "ds_bf16", "deepspeed", 2, ["--bf16", "--num_steps", "3"])
    assert all(math.isfinite(x) for x in losses(rd))


def test_fsdp2_fp16_follows_ddp_fp16(setup):
    """--fp16 with FSDP2 (ShardedGradScaler): torch's fused AdamW cannot take that scaler's found_inf
    (shape [1]; it failed on the first step on CPU and CUDA), so the engine steps with the foreach
    AdamW there; same losses as DDP's fp16 run."""
    extra = ["--fp16", "--num_steps", "3"]
    ddp, _ = _run(setup, "ddp_fp16", "torch", 0, extra)
    fsdp, _ = _run(setup, "fsdp2_fp16", "torch", 2, extra)
    a, b = losses(ddp), losses(fsdp)
    assert len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
