"""Checkpoints: `output_dir/<model_name>/step-N/`, written atomically; the final export.

A checkpoint holds the engine's model/optimizer/scheduler/scaler state (engine.save), every
rank's RNG states, the data position and step (`meta.json`, with the run arguments and the
model config). It is written under `.step-N.tmp` and renamed when complete, so a crash while
writing leaves the previous checkpoints intact; `meta.json` is written last, and only
directories named `step-N` that hold one count as checkpoints. Leftover `.step-N.tmp` (and
`.step-N.old`) directories of a crashed save are ignored, refused as --checkpoint, and deleted
by the next save. Problems with a --checkpoint raise `CheckpointError` with the fix.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trainer import dist, faults
from trainer.sampler import TrainState

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^\.step-(\d+)\.(tmp|old)$")  # left behind by a crash during a save
META = "meta.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """--checkpoint points at something that cannot be resumed from; the message names the fix."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step-N checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def resolve(spec: str | None, run_dir: Path) -> tuple[Path | None, str]:
    """What --checkpoint points at: (path, "step") for a resumable checkpoint, (path, "weights")
    for an exported model, (None, "") for nothing."""
    if not spec:
        return None, ""
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return (found[-1], "step") if found else (None, "")
    path = Path(spec)
    partial = next((p for p in (path, path.parent) if PARTIAL_DIR.match(p.name)), None)
    if partial is not None:
        done = list_checkpoints(partial.parent)
        raise CheckpointError(
            f"--checkpoint {spec}: {partial.name} is an incomplete checkpoint left by a crash during a save; "
            f"use a complete one ({', '.join(p.name for p in done) or 'none in ' + str(partial.parent)}) "
            f"or --checkpoint auto")
    if path.is_file():
        if path.suffix == ".safetensors":
            return path, "weights"
        path = path.parent
    if (path / META).is_file():
        return path, "step"
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS, "weights"
    found = list_checkpoints(path)
    if found:
        return found[-1], "step"
    raise CheckpointError(
        f"--checkpoint {spec}: not a checkpoint (no {META}), not a run directory with step-N checkpoints "
        f"and not an exported model ({WEIGHTS}); point it at output_dir/model_name/step-N or use --checkpoint auto")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, state: TrainState, run_dir: Path, meta: dict, keep: int = 0) -> Path:
    """Write step-N for the current state (collective: every rank calls it)."""
    final = run_dir / f"step-{state.step}"
    tmp = run_dir / f".step-{state.step}.tmp"
    if dist.world_size() == 1 or engine.ctx.is_main:
        # leftovers of saves that crashed (any step): never read, removed here
        for stale in run_dir.glob(".step-*"):
            if PARTIAL_DIR.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save(tmp)
    torch.save(_rng_state(), tmp / "rng" / f"rank{engine.ctx.rank}.pt")
    dist.barrier()
    if engine.ctx.is_main:
        body = dict(meta, step=state.step, train_state=asdict(state), world_size=engine.ctx.world_size,
                    engine=engine.name, stage=engine.stage)
        with open(tmp / META, "w") as f:
            json.dump(body, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        faults.inject("in_save", state.step, engine.ctx.rank)  # test hook: die before the rename
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            old = run_dir / f".step-{state.step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def matching_weights(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                     source) -> dict[str, torch.Tensor]:
    """The weights a model of another task can take (same name and shape); at least the encoder's."""
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("encoder.") for k in matched):
        raise SystemExit(f"--checkpoint {source}: no encoder weights match this model")
    return matched


def config_mismatch(saved: dict, current: dict) -> str:
    """The model-config fields where a checkpoint differs from --model ("" when none)."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    return ", ".join(f"{k}: checkpoint {a!r} vs --model {b!r}" for k, (a, b) in sorted(diff.items()))


def read_meta(ckpt: Path) -> dict:
    try:
        with open(ckpt / META) as f:
            meta = json.load(f)
        for key in ("step", "train_state", "args", "model_config"):
            meta[key]
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"--checkpoint {ckpt}: {META} is unreadable or incomplete ({what}); "
                              f"the checkpoint is damaged, resume from another step-N in {ckpt.parent}") from None


def load(engine, ckpt: Path) -> TrainState:
    """Resume everything from step-N: engine state, this rank's RNG, data position."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    meta = read_meta(ckpt)
    try:
        engine.load(ckpt)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, CheckpointException) as e:
        # e.g. a deleted or truncated shard; DCP wraps per-rank failures in a CheckpointException
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--checkpoint {ckpt}: cannot load its model/optimizer state ({type(e).__name__}: "
                              f"{first[:300]}); the checkpoint is damaged, resume from another step-N in "
                              f"{ckpt.parent}") from e
    rng = ckpt / "rng" / f"rank{engine.ctx.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    elif engine.ctx.is_main:
        print(f"[checkpoint] {ckpt} was written by {meta['world_size']} processes; ranks without a saved "
              f"RNG state keep their seeded state (dropout masks differ from the original run)", flush=True)
    return TrainState(**meta["train_state"])


def export(engine, run_dir: Path, meta: dict, config_dict: dict, tokenizer_dir: Path | None) -> Path | None:
    """run_dir/final/: one consolidated model.safetensors + config.json + tokenizer + args.json."""
    weights = engine.full_state_dict()  # collective
    out = run_dir / "final"
    if engine.ctx.is_main:
        tmp = run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(weights, tmp / WEIGHTS, {"train_mode": meta.get("train_mode", ""), "step": str(meta.get("step", ""))})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2))
        (tmp / "args.json").write_text(json.dumps(meta.get("args", {}), indent=2, default=str))
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "vocab.txt", "pretokenizer.json"):
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): store each once and
    record the aliases in the metadata."""
    from safetensors.torch import save_file

    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else (name,)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata=dict(metadata, aliases=json.dumps(aliases)))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read an exported model.safetensors, restoring tied aliases."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors
