"""Checkpoints: `output_dir/<model_name>/step-N/`, written atomically; the final export.

A checkpoint holds the engine's model/optimizer/scheduler/scaler state (engine.save), every
rank's RNG states, the data position and step (`meta.json`, with the run arguments and the
model config). It is written under `.step-N.tmp` and renamed when complete, so a crash while
writing leaves the previous checkpoints intact; `meta.json` is written last, and only
directories named `step-N` that hold one count as checkpoints. Leftover `.step-N.tmp` (and
`.step-N.old`) directories of a crashed save are ignored, refused as --checkpoint, and deleted
by the next save. Problems with a --checkpoint raise `CheckpointError` with the fix. A save that
fails on any rank (a full disk, permissions) removes its `.step-N.tmp` and raises `SaveError` on
every rank, naming the free and the needed space; the earlier checkpoints stay as they were.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import TOKENIZER_FILES
from trainer import dist, faults, safety
from trainer.sampler import TrainState

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^\.step-(\d+)\.(tmp|old)$")  # left behind by a crash during a save
META = "meta.json"
WEIGHTS = "model.safetensors"
HF_BIN = "pytorch_model.bin"  # the weights of transformers folders saved before safetensors
# the shard indexes of transformers folders saved with save_pretrained(max_shard_size=...) (trainer.export reads them)
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """--checkpoint points at something that cannot be resumed from; the message names the fix."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; its partial copy is removed, the message names the fix."""


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
        if path.suffix == ".safetensors" or path.name in (HF_BIN, *HF_INDEXES):
            return path, "weights"
        path = path.parent
        # a file deeper inside a step-N (step-N/dcp/__0_0.distcp, step-N/rng/rank0.pt, ...): that step-N
        step = next((p for p in path.parents if STEP_DIR.match(p.name) and (p / META).is_file()), None)
        if not (path / META).is_file() and step is not None:
            path = step
    if (path / META).is_file():
        return path, "step"
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS, "weights"
    for name in (HF_BIN, *HF_INDEXES):  # a transformers folder (older format, or sharded weights)
        if (path / name).is_file() and (path / "config.json").is_file():
            return path / name, "weights"
    found = list_checkpoints(path)
    if found:
        return found[-1], "step"
    raise CheckpointError(
        f"--checkpoint {spec}: not a checkpoint (no {META}), not a run directory with step-N checkpoints "
        f"and not an exported model ({WEIGHTS}); point it at output_dir/model_name/step-N or use --checkpoint auto")


@dataclasses.dataclass
class Start:
    """What --checkpoint points at, resolved and read once by the loop and handed to the task."""
    path: Path | None = None
    kind: str = ""               # "step" (a step-N with meta.json), "weights" (an exported model) or ""
    meta: dict | None = None     # a step-N checkpoint's meta.json

    def trained_args(self) -> dict | None:
        """The run arguments it was trained with: meta.json's, or args.json beside an exported
        model; None without --checkpoint or without a readable record."""
        if self.meta is not None:
            return self.meta["args"]
        if self.path is None:
            return None
        try:
            return json.loads((self.path.parent / "args.json").read_text())
        except (OSError, ValueError):
            return None

    def tokenizer(self) -> Path | None:
        """Its tokenizer folder: the one meta.json records (relative to that run's cwd), or the
        folder of an exported model when it holds tokenizer.json."""
        if self.meta is not None:
            recorded = self.meta.get("tokenizer")
            if not recorded:
                return None
            tok = Path(recorded)
            if not tok.is_absolute() and not (tok / "tokenizer.json").is_file():
                tok = Path(self.meta.get("args", {}).get("cwd", ".")) / tok
            return tok
        if self.path is not None and (self.path.parent / "tokenizer.json").is_file():
            return self.path.parent
        return None

    def train_mode(self) -> str | None:
        """The train_mode it was trained with: meta.json's, or an exported model's metadata; None
        without --checkpoint or for a transformers folder."""
        if self.meta is not None:
            return self.meta.get("train_mode") or self.meta["args"].get("train_mode")
        if self.path is None or self.path.suffix != ".safetensors":
            return None
        try:
            return read_safetensors(self.path, metadata_only=True)[1].get("train_mode") or None
        except CheckpointError:
            return None

    def label_names(self) -> list[str] | None:
        """The names of the classes of the classifier it holds: those a classify run numbered its label
        names by, or the tags of a NER run (meta.json, or the exported model.safetensors' metadata), or a transformers config's
        id2label where it names them (not transformers' default LABEL_i); else None."""
        if self.meta is not None:
            return self.meta.get("label_names")
        if self.path is None:
            return None
        if self.path.suffix == ".safetensors":
            names = read_label_names(self.path)
            if names:
                return names
        try:
            id2label = json.loads((self.path.parent / "config.json").read_text()).get("id2label") or {}
            names = [str(id2label[str(i)]) for i in range(len(id2label))]
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return None if names == [f"LABEL_{i}" for i in range(len(names))] else names or None

    def check_config(self, config: dict) -> None:
        """SystemExit unless the checkpoint was trained with this model config (`config_mismatch`)."""
        if self.meta is not None:
            shown = config_mismatch(self.meta["model_config"], config)
            if shown:
                raise SystemExit(f"--checkpoint {self.path} was trained with another model config ({shown}); "
                                 f"leave out --model (the checkpoint's config is the default) or pass --model "
                                 f"{self.path}")
        elif self.path is not None and (self.path.parent / "config.json").is_file():
            from models import load_config  # ours or a transformers BERT / ModernBERT config.json

            folder = self.path.parent
            try:
                saved = load_config(folder / "config.json")
            except ValueError as e:  # a transformers config we cannot compute, a damaged config.json
                raise SystemExit(f"--checkpoint {self.path}: {e}") from None
            shown = config_mismatch(saved.to_dict(), config)
            if shown:
                raise SystemExit(f"--checkpoint {self.path} was trained with another model config ({shown}); "
                                 f"leave out --model (the checkpoint's config is the default) or pass --model "
                                 f"{folder / 'config.json'}")


# the engine state folders of a step-N, and which engines (at which ZeRO stage) read them
ENGINE_STATE = {"dcp": "torch", "fairscale": "fairscale", "ds": "deepspeed"}


def _reads(engine: str, stage: int) -> str:
    """The state folder `engine` resumes at `stage` (fairscale's stage 0 is torch DDP: dcp/)."""
    return {"torch": "dcp", "deepspeed": "ds"}.get(engine) or ("dcp" if stage == 0 else "fairscale")


def check_engine(start: Start, engine: str, stage: int, model_name: str) -> None:
    """SystemExit before any work when a step-N's optimizer state was written by an engine that
    `engine` at ZeRO `stage` cannot read (each engine reads its own: the torch engine reads every
    torch stage's). A step-N without any state folder is left to the load's damage message."""
    if start.meta is None or start.path is None:
        return
    held = [sub for sub in ENGINE_STATE if (start.path / sub).is_dir()]
    if not held or _reads(engine, stage) in held:
        return
    meta, args = start.meta, start.meta["args"]
    by = meta.get("engine") or ENGINE_STATE[held[0]]
    how = f"{args.get('launcher') or 'its launcher'}{' --zero3' if args.get('zero3') else ''}"
    same = {"dcp": "--engine torch (any launcher) or --engine fairscale with train.py",
            "fairscale": "--engine fairscale with train_zero_one.py or train_zero_two.py",
            "ds": "--engine deepspeed"}[held[0]]
    raise SystemExit(
        f"--checkpoint {start.path} was written by --engine {by} ({how}, ZeRO stage {meta.get('stage', '?')}), "
        f"whose model and optimizer state --engine {engine} at ZeRO stage {stage} cannot read; resume it with "
        f"{same}. A run does not change engines part-way (each keeps its optimizer state in its own format); "
        f"the model a run exports (its final/ folder) starts a new run under any engine: --checkpoint RUN/final "
        f"with another --model_name than {model_name} (weights only: AdamW's moments and the data position "
        f"start afresh)")


def resolve_start(spec: str | None, run_dir: Path) -> Start:
    """`resolve` with a step-N's meta.json read; CheckpointError when either is unusable."""
    path, kind = resolve(spec, run_dir)
    return Start(path, kind, read_meta(path) if kind == "step" else None)


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
    """Write step-N for the current state (collective: every rank calls it). Each phase ends
    with every rank learning whether any rank failed (instead of a barrier), so one rank's full
    disk stops all of them with SaveError instead of leaving the others waiting."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    final = run_dir / f"step-{state.step}"
    tmp = run_dir / f".step-{state.step}.tmp"
    error = None
    if engine.ctx.is_main:
        try:
            # leftovers of saves that crashed (any step): never read, removed here
            for stale in run_dir.glob(".step-*"):
                if PARTIAL_DIR.match(stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            error = e
    _all_saved(error, engine, run_dir, tmp)
    try:
        engine.save(tmp)
        faults.inject("disk_full", state.step, engine.ctx.rank)  # test hook: raise ENOSPC mid-save
        torch.save(_rng_state(), tmp / "rng" / f"rank{engine.ctx.rank}.pt")
    except (OSError, CheckpointException) as e:  # DCP wraps a rank's OSError in a CheckpointException
        error = e
    _all_saved(error, engine, run_dir, tmp)
    if engine.ctx.is_main:
        try:
            body = dict(meta, step=state.step, train_state=asdict(state), world_size=engine.ctx.world_size,
                        engine=engine.name, stage=engine.stage)
            with open(tmp / META, "w") as f:
                json.dump(body, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
            faults.inject("in_save", state.step, engine.ctx.rank)  # test hook: die before the rename
            # the same step saved again (e.g. a final save right after a periodic one) is swapped
            safety.replace_dir(tmp, final)
            if keep:
                for old in list_checkpoints(run_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = e
    _all_saved(error, engine, run_dir, tmp)
    return final


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: itself, a rank's failure inside a DCP CheckpointException, a cause."""
    for _ in range(10):
        if e is None or isinstance(e, OSError):
            return e
        for exc, *_ in (getattr(e, "failures", None) or {}).values():
            if isinstance(exc, OSError):
                return exc
        e = e.__cause__ or e.__context__
    return None


def _all_saved(error: BaseException | None, engine, run_dir: Path, tmp: Path) -> None:
    """Collective: raise SaveError on every rank if any rank's `error` is set (rank 0 removes tmp)."""
    os_err = _os_error(error)
    mine = None if error is None else (getattr(os_err, "errno", None),
                                       (os_err.strerror if os_err and os_err.strerror else str(error))[:300])
    found = [mine]
    if dist.world_size() > 1:
        found = [None] * dist.world_size()
        torch.distributed.all_gather_object(found, mine)
    failed = [(rank, f) for rank, f in enumerate(found) if f is not None]
    if not failed:
        return
    if not engine.ctx.is_main:
        raise SaveError(f"checkpoint {tmp.name} failed (see rank 0's message)")
    shutil.rmtree(tmp, ignore_errors=True)
    what = "; ".join(f"rank {r}: {text}" if len(found) > 1 else text for r, (_, text) in failed)
    step = tmp.name[1:-len(".tmp")]
    latest = list_checkpoints(run_dir)
    kept = f"kept {latest[-1]}, the latest complete checkpoint" if latest else "there is no earlier checkpoint"
    message = f"could not write checkpoint {step} in {run_dir} ({what}); removed the partial {tmp.name}, {kept}."
    if any(code in (errno.ENOSPC, errno.EDQUOT) for _, (code, _) in failed):
        if latest:
            need, basis = safety.tree_mb(latest[-1]), f"the size of {latest[-1].name}"
        else:
            params = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters())
            need, basis = 3 * params / 2**20, "weights + AdamW's two moments, estimated"
        message += (f" The file system there has {safety.free_mb(run_dir):.1f} MB free; one checkpoint of this "
                    f"run needs about {need:.1f} MB ({basis}). Free space (or lower --keep_checkpoints, or "
                    f"use another --output_dir) and resume with --checkpoint auto")
    else:
        message += " Fix the cause and resume with --checkpoint auto"
    raise SaveError(message)


def matching_weights(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor | torch.Size],
                     source) -> dict[str, torch.Tensor]:
    """The weights a model of another task can take (same name and shape); at least the encoder's.
    `own`: the model's tensors, or their (full, unsharded) shapes."""
    shapes = {k: tuple(getattr(o, "shape", o)) for k, o in own.items()}
    matched = {k: v for k, v in weights.items() if shapes.get(k) == tuple(v.shape)}
    if not any(k.startswith("encoder.") for k in matched):
        raise SystemExit(f"--checkpoint {source}: no encoder weights match this model")
    return matched


def config_mismatch(saved: dict, current: dict) -> str:
    """The model-config fields where a checkpoint differs from --model ("" when none). Fields the
    checkpoint predates count with their default."""
    from models import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    saved = defaults | saved
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


def read_step_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Consolidated model weights of a step-N checkpoint of any engine, on CPU, read by one process
    without collectives (every rank may call it): dcp/ (torch), fairscale/model.pt, ds/ (DeepSpeed,
    fp32 from its ZeRO partitions). A damaged or foreign folder raises CheckpointError naming it."""
    ckpt = Path(ckpt)
    try:
        if (ckpt / "dcp").is_dir():
            return _read_dcp_model(ckpt / "dcp")
        if (ckpt / "fairscale" / "model.pt").is_file():
            return torch.load(ckpt / "fairscale" / "model.pt", map_location="cpu", weights_only=True)
        if (ckpt / "ds").is_dir():
            return _read_deepspeed_model(ckpt / "ds")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP, torch.load and DeepSpeed raise anything for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: cannot read its model weights ({type(e).__name__}: {first[:300]}); the "
                              f"checkpoint is damaged, use another step-N in {ckpt.parent}") from e
    raise CheckpointError(f"{ckpt}: no model weights (no dcp/, fairscale/model.pt or ds/); point at a step-N "
                          f"checkpoint written by this trainer")


def _read_dcp_model(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """The "model" entry of a torch.distributed.checkpoint directory, on one process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, m in saved.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata):
            model[key[len("model."):]] = torch.empty(m.size, dtype=m.properties.dtype)
    if not model:
        raise CheckpointError(f"{dcp_dir}: no model weights in this torch.distributed.checkpoint")
    state = {"model": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    return state["model"]


def _read_deepspeed_model(ds_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of DeepSpeed's save_checkpoint(tag="ds"): merged from the ZeRO partitions, or
    (ZeRO stage 0) the module state."""
    if any(ds_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


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


FINAL = "final"
_FINAL_FIX = "move them out of final/ (each run exports its weights there)"


def exported_step(run_dir: Path) -> int | None:
    """The step recorded in run_dir/final/'s weights (None: no export, or unreadable)."""
    weights = run_dir / FINAL / WEIGHTS
    if not weights.is_file():
        return None
    try:
        step = read_safetensors(weights, metadata_only=True)[1].get("step", "")
    except CheckpointError:
        return None
    return int(step) if step.isdigit() else None


def newer_than(run_dir: Path, step: int) -> list[Path]:
    """The run's checkpoints past `step`, and its final/ unless that holds `step` or an earlier one."""
    newer = [p for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) > step]
    final_step = exported_step(run_dir)
    if (run_dir / FINAL).is_dir() and (final_step is None or final_step > step):
        newer.append(run_dir / FINAL)
    return newer


def move_aside(run_dir: Path, paths: list[Path], step: int) -> Path:
    """Resuming an older step: move `paths` (newer_than) into run_dir/superseded-after-step-K[-n]/
    with a copy of loss.tsv (whose later rows the resumed run rewrites); nothing is deleted."""
    aside = _new_folder(run_dir / f"superseded-after-step-{step}")
    for p in paths:
        os.replace(p, aside / p.name)
    if (run_dir / "loss.tsv").is_file():
        shutil.copy2(run_dir / "loss.tsv", aside / "loss.tsv")
    safety.fsync_dir(run_dir)
    return aside


def _new_folder(base: Path) -> Path:
    """Create `base`, or base-2, base-3, ... (the first that does not exist)."""
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    aside.mkdir()
    return aside


EARLIER_LOGS = ("loss.tsv", "eval.json", "tensorboard")


def move_earlier_logs(run_dir: Path) -> Path | None:
    """A new run starting in `run_dir` (not resuming a checkpoint of it): the logs an earlier run left
    there (it never saved a checkpoint, or they were deleted) move into run_dir/earlier-run[-n]/
    instead of being rewritten (loss.tsv) or mixed with the new run's (TensorBoard)."""
    found = [run_dir / name for name in EARLIER_LOGS if (run_dir / name).exists()]
    if not found:
        return None
    aside = _new_folder(run_dir / "earlier-run")
    for p in found:
        os.replace(p, aside / p.name)
    safety.fsync_dir(run_dir)
    return aside


def check_no_earlier_final(run_dir: Path, model_name: str) -> None:
    """A new run (not resuming a checkpoint of `run_dir`) must not replace the model an earlier
    run exported there: SystemExit naming the ways on."""
    final = run_dir / FINAL
    if not final.is_dir() or not any(final.iterdir()):
        return
    step = exported_step(run_dir)
    raise SystemExit(f"{final} holds the model of an earlier run{f' (step {step})' if step is not None else ''}, "
                     f"and this run starts afresh (no step-N checkpoint of {run_dir} is left to resume), so it "
                     f"would replace that model; to train anew pick another --model_name or --output_dir (or "
                     f"move {final} away first); to go on from those weights, pass --checkpoint {final} with "
                     f"another --model_name than {model_name}")


def check_final(run_dir: Path) -> None:
    """Before a run starts: its final/ may be replaced (missing or an earlier export); else SystemExit."""
    try:
        safety.check_replaceable(run_dir / FINAL, fix=_FINAL_FIX)
    except safety.UnsafeWrite as e:
        raise SystemExit(str(e)) from None


def export(engine, run_dir: Path, meta: dict, config_dict: dict, tokenizer_dir: Path | None) -> Path | None:
    """run_dir/final/: one consolidated model.safetensors + config.json + tokenizer + args.json."""
    weights = engine.full_state_dict()  # collective
    out = run_dir / FINAL
    if engine.ctx.is_main:
        with safety.staged_dir(out, fix=_FINAL_FIX, info={"by": "training", "step": meta.get("step")}) as tmp:
            save_weights(weights, tmp / WEIGHTS, {"train_mode": meta.get("train_mode", ""), "step": str(meta.get("step", "")),
                                                  **({"label_names": json.dumps(meta["label_names"])}
                                                     if meta.get("label_names") else {})})
            (tmp / "config.json").write_text(json.dumps(config_dict, indent=2))
            (tmp / "args.json").write_text(json.dumps(meta.get("args", {}), indent=2, default=str))
            if meta.get("tracking"):  # the tracked runs (trainer/tracking.py), for trainer.evaluate to log to
                (tmp / "tracking.json").write_text(json.dumps({"step": meta.get("step"), "runs": meta["tracking"]}, indent=2))
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    if (tokenizer_dir / name).is_file():
                        shutil.copy2(tokenizer_dir / name, tmp / name)
    dist.barrier()
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): store each once and
    record the aliases in the metadata."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else (name,)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    write_safetensors(tensors, path, dict(metadata, aliases=json.dumps(aliases)))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.save_file with a reproducible header: safetensors writes the metadata keys in
    hash-map order, so two saves of the same tensors differ by bytes; the header is rewritten
    with sorted keys (same length, so the tensor offsets stay valid)."""
    from safetensors.torch import save

    data = bytearray(save(tensors, metadata=metadata))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert len(canonical) <= n, "canonical safetensors header longer than the original"
    data[8:8 + n] = canonical.ljust(n, b" ")
    with open(path, "wb") as f:
        f.write(data)


def read_label_names(path: Path) -> list[str] | None:
    """The class names (NER: tags) an exported classify (NER) model was trained with (its metadata), or None."""
    try:
        return label_names_in(read_safetensors(path, metadata_only=True)[1])
    except CheckpointError:
        return None


def label_names_in(metadata: dict[str, str]) -> list[str] | None:
    """The class names recorded in a model.safetensors' metadata (`export`), or None."""
    try:
        return json.loads(metadata["label_names"]) if metadata.get("label_names") else None
    except ValueError:
        return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read an exported model.safetensors, restoring tied aliases. A damaged file raises
    CheckpointError naming it."""
    tensors, metadata = read_safetensors(path)
    aliases = json.loads(metadata.get("aliases", "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def read_safetensors(path: Path, metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; CheckpointError naming the file when it is damaged
    (truncated, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {} if metadata_only else {k: f.get_tensor(k) for k in f.keys()}
            return tensors, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({e}); export the model again or use "
                              f"another checkpoint (a step-N directory of the run)") from None
