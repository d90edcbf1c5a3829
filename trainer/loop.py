"""The one training loop, shared by train.py, train_zero_one.py and train_zero_two.py."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint, dist, engines, faults, probe, safety, tasks, tracking
from trainer.args import parse_args, public_args, run_dir
from trainer.batch_size import find_batch_size
from trainer.engines.base import schedule_lambda, schedule_steps
from trainer.metrics import Logger, MetricMeter, memory_mb
from trainer.sampler import BatchList, EpochSampler, TrainState, samples_per_epoch


class Stop(Exception):
    """Training stops early (non-finite steps, SIGTERM, SIGINT) after saving a checkpoint."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(stage: int, argv: list[str] | None = None) -> None:
    args = parse_args(stage, argv)
    ctx = dist.init(args.device)
    try:
        run(args, ctx)
    except (Stop, checkpoint.SaveError) as e:
        if ctx.is_main:
            print(f"[train] stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "code", 1))
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (setup, evaluation, export)
        print(f"[train] interrupted (SIGINT) on rank {ctx.rank} outside the training steps; the checkpoints "
              f"written so far are kept", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:  # also on SystemExit (bad input found after init): leave no process group behind
        dist.shutdown()


def run(args: Namespace, ctx) -> dict:
    """Train/evaluate holding the run directory's lock (global rank 0 takes it; every rank learns
    whether it was free, so a second run with the same --model_name stops at once)."""
    rd = run_dir(args)
    lock, refused = safety.RunLock(rd) if ctx.is_main else None, None
    if lock is not None:
        try:  # a restarted torchrun attempt may start while its killed predecessor is still exiting
            lock.acquire(wait_s=60 if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) else 0)
        except safety.RunLocked as e:
            refused = str(e)
        except OSError as e:
            refused = f"--output_dir {args.output_dir}: cannot create {rd} ({e.strerror}); pick a writable --output_dir"
    refused = dist.broadcast_object(refused)
    if refused:
        raise SystemExit(refused)
    try:
        return _run(args, ctx, rd)
    finally:
        if lock is not None:
            lock.release()  # and removes the run directory if this run left it empty


def _run(args: Namespace, ctx, rd) -> dict:
    from models import load_config

    try:
        start = checkpoint.resolve_start(args.checkpoint, rd)  # once: the task gets it too
    except checkpoint.CheckpointError as e:
        raise SystemExit(str(e)) from None
    resume_path, resume_kind, resume_meta = start.path, start.kind, start.meta
    full_resume = resume_meta is not None and resume_meta["args"]["train_mode"] == args.train_mode
    start.check_config(load_config(args.model).to_dict())
    if full_resume:
        checkpoint.check_engine(start, args.engine, args.stage, args.model_name)
    existing = checkpoint.list_checkpoints(rd)
    # a step-N of the user's (no meta.json: not a checkpoint) would be replaced by that step's save
    strays = sorted(p.name for p in rd.iterdir() if checkpoint.STEP_DIR.match(p.name)
                    and not (p / checkpoint.META).is_file()) if rd.is_dir() and args.num_steps > 0 else []
    if strays:
        raise SystemExit(f"{rd} holds {', '.join(strays)}, which {'is' if len(strays) == 1 else 'are'} not a "
                         f"checkpoint of this trainer (no {checkpoint.META}); saving that step would replace it. "
                         f"Move it out of {rd}, or pick another --model_name/--output_dir")
    if resume_path is None and existing:
        raise SystemExit(f"{rd} already holds checkpoints ({existing[-1].name} is the latest) and would be "
                         f"overwritten; resume it with --checkpoint auto, or pick another --model_name/--output_dir")
    own = full_resume and resume_path.resolve().parent == rd.resolve()
    if existing and not own:  # weights of another run or task: its step-N would mix with (and rotate out) these
        raise SystemExit(f"{rd} already holds checkpoints ({existing[-1].name} is the latest) and would be "
                         f"overwritten by a run starting from --checkpoint {resume_path} ("
                         f"{'weights only' if not full_resume else 'another run'}); continue this run with "
                         f"--checkpoint auto, or pick another --model_name/--output_dir")
    if full_resume and 0 < args.num_steps < resume_meta["step"]:
        step = resume_meta["step"]
        raise SystemExit(f"--checkpoint {resume_path} is at step {step}, past --num_steps {args.num_steps}: there is "
                         f"nothing to train. --num_steps is the total, not the steps to add: pass --num_steps "
                         f"{step} or more (e.g. {step + args.num_steps}), or resume from a checkpoint at step "
                         f"{args.num_steps} or below")
    # resuming an older step of this run: the newer checkpoints and final/ are moved aside, not
    # overwritten (an evaluation-only run, --num_steps 0, writes neither)
    newer = checkpoint.newer_than(rd, resume_meta["step"]) if own and args.num_steps > 0 else []
    exports = args.num_steps > 0 and (args.train_mode == "pretrain"
                                      or (args.train_mode != "encoder" and bool(args.train_file)))
    if exports and not own:  # a new run: an earlier run's model in final/ is not this run's to replace
        checkpoint.check_no_earlier_final(rd, args.model_name)
    if args.num_steps > 0 and not any(p.name == checkpoint.FINAL for p in newer):
        checkpoint.check_final(rd)
    _check_same_tokenizer(args, start)
    seed_everything(args.seed)  # identical initial weights on every rank
    task = tasks.build(args, ctx, start)
    engine = engines.create(args, ctx)
    if args.train_batch_size == 0 and full_resume:
        _keep_resumed_batch(args, resume_meta, ctx)
    if args.train_batch_size == 0:
        limit = 4096
        if task.dataset is not None:
            limit = max(1, min(limit, len(task.dataset) // (ctx.world_size * args.gradient_accumulation_steps)))
        args.train_batch_size = find_batch_size(args, task.model, task.make_batch, ctx.device, engine.autocast(),
                                                limit=limit, log=ctx.log)
    model = engine.wrap(task.model)
    task.attach(engine)

    state = TrainState()
    if resume_path is not None:
        if full_resume:
            try:
                state = checkpoint.load(engine, resume_path)
            except checkpoint.CheckpointError as e:
                raise SystemExit(str(e)) from None
            ctx.log(f"[checkpoint] resumed {resume_path} at step {state.step} "
                          f"(epoch {state.epoch}, sample {state.samples_in_epoch})")
        else:
            try:
                weights = (checkpoint.read_step_weights(resume_path) if resume_kind == "step"
                           else _exported_weights(resume_path))
            except checkpoint.CheckpointError as e:  # damaged shards or a damaged model.safetensors
                raise SystemExit(f"--checkpoint {args.checkpoint}: {e}") from None
            drop = task.fresh_weights  # prefixes of a head the task knows to mean other labels
            fresh = engine.load_weights({k: v for k, v in weights.items() if not k.startswith(drop)}, resume_path)
            _check_fresh_weights(args, task, resume_path, fresh, ctx.log)
            what = f" ({resume_meta['args']['train_mode']} checkpoint)" if resume_kind == "step" else ""
            ctx.log(f"[checkpoint] initialised matching weights from {resume_path}{what}")
    if full_resume and task.dataset is not None and ctx.is_main:
        _warn_other_data(args, resume_meta, resume_path, len(task.dataset), state, ctx.world_size,
                         bucketed=task.unpads("train"), moe=task.config.is_moe)
        _note_schedule_change(args, resume_meta, state.step, ctx.log)

    meta = {"args": public_args(args), "model_config": task.config.to_dict(), "train_mode": args.train_mode,
            "tokenizer": str(task.tokenizer_dir) if task.tokenizer_dir else None,
            "tokenizer_ids": tokenizer_ids(task.tokenizer) if getattr(task, "tokenizer", None) else None,
            "num_samples": len(task.dataset) if task.dataset is not None else None}
    if getattr(task, "label_names", None):  # classify's label names, NER's tags: index i naming class i
        meta["label_names"] = task.label_names
    sampler = None
    if task.dataset is not None:
        # before the Logger, which rewrites loss.tsv: an impossible batch must not touch the run directory
        try:
            sampler = EpochSampler(len(task.dataset), args.train_batch_size, ctx.world_size, ctx.rank, args.seed,
                                   args.gradient_accumulation_steps, args.max_steps_per_epoch,
                                   lengths=task.train_lengths())
        except ValueError as e:
            raise SystemExit(str(e)) from None
        step_samples = sampler.global_micro * args.gradient_accumulation_steps
        if step_samples > sampler.samples_per_epoch and args.num_steps > 0 and ctx.is_main:
            print(f"[train] warning: one optimizer step takes {step_samples} samples (--train_batch_size "
                  f"{args.train_batch_size} x {ctx.world_size} process(es) x --gradient_accumulation_steps "
                  f"{args.gradient_accumulation_steps}), more than the {sampler.samples_per_epoch} of an epoch: every "
                  f"step draws on two epochs or more and sees some samples twice. Lower --gradient_accumulation_steps "
                  f"to at most {max(1, sampler.samples_per_epoch // sampler.global_micro)} (or the batch size), or use "
                  f"more data", file=sys.stderr, flush=True)
    if newer and ctx.is_main:
        aside = checkpoint.move_aside(rd, newer, resume_meta["step"])
        ctx.log(f"[checkpoint] resuming step {resume_meta['step']} of a run that went further: moved "
                f"{', '.join(p.name for p in newer)} (and a copy of loss.tsv) to {aside}; delete that folder "
                f"if you do not need them")
    trains = task.dataset is not None and state.step < args.num_steps
    if trains and not own and ctx.is_main:  # the logs of an earlier run (one that never saved a checkpoint)
        earlier = checkpoint.move_earlier_logs(rd)
        if earlier is not None:
            ctx.log(f"[train] {rd} held the logs of an earlier run that left no checkpoint to resume; moved them "
                    f"to {earlier} (delete that folder if you do not need them) and start afresh")
    logger = Logger(rd, ctx.is_main, args.num_steps, state.step,
                    {"args": meta["args"], "model_config": meta["model_config"]},
                    progress=not args.no_progress and trains,
                    tensorboard="tensorboard" in args.report_to,
                    tracking=tracking.start(args, rd, resume_meta, ctx.world_size, ctx.log)
                    if ctx.is_main else None, trains=trains)
    meta["tracking"] = logger.tracking_ids  # checkpoints keep the run ids: a resume continues the same runs
    logger.reserve([f"eval/{k}" for k in task.validation_metrics()] + probe.tags(args))
    try:
        if trains:
            _train(args, ctx, task, engine, model, state, logger, rd, meta, sampler)
        elif task.dataset is not None and args.num_steps > 0:
            ctx.log(f"[train] already at --num_steps {args.num_steps} ({resume_path} is step {state.step}); "
                    f"nothing to train. Raise --num_steps to train on, or start fresh under another "
                    f"--model_name or --output_dir")
        results = task.evaluate(engine)
        if results:
            logger.log_eval(state.step, results)
            ctx.log("[eval] " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        if args.num_steps > 0 and task.dataset is not None:
            if not trains and dist.broadcast_object(checkpoint.exported_step(rd) if ctx.is_main else None) == state.step:
                ctx.log(f"[export] {rd / 'final'} already holds step {state.step}; kept")
            else:
                out = checkpoint.export(engine, rd, dict(meta, step=state.step), task.config.to_dict(),
                                        task.tokenizer_dir)
                ctx.log(f"[export] {out}")
                for name in ("config.json", "args.json"):
                    logger.artifact(out / name, "final")
    finally:
        logger.close()
    return {"state": state, "eval": results}


# the flags that decide the order and content of the training samples (besides the data itself)
DATA_ORDER_FLAGS = ("seed", "max_seq_length", "objective", "mlm_probability", "whole_word_mask", "mlm_separator",
                    "mlm_packing", "max_steps_per_epoch", "max_train_examples", "max_query_length", "doc_stride")
# the flags that shape the learning-rate schedule (trainer.engines.base.schedule_lambda)
SCHEDULE_FLAGS = ("learning_rate", "warmup_steps", "num_steps", "scheduler_num_steps", "lr_schedule", "decay_steps")


def tokenizer_ids(tok) -> str:
    """A digest of what decides the token ids a model is trained on: the vocabulary (token -> id) and the
    morpheme analyzer. Unlike the fingerprint (the serialised tokenizer.json) it does not change with the
    `tokenizers` version that writes the file."""
    import hashlib
    import json

    body = json.dumps([sorted(tok.tokenizer.get_vocab(with_added_tokens=True).items()), tok.morpheme],
                      ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _check_same_tokenizer(args: Namespace, start: checkpoint.Start) -> None:
    """A step-N records the token ids it was trained on (`tokenizer_ids`); the folder it names (or
    --tokenizer) may since hold another tokenizer (trained again into the same folder, another
    machine's folder of that name): its ids would not match the trained embeddings. SystemExit
    before any work; a tokenizer that is gone or unreadable is left to the task's messages."""
    recorded = (start.meta or {}).get("tokenizer_ids")
    path = Path(args.tokenizer) if args.tokenizer else start.tokenizer()
    if not recorded or path is None or not (path / "tokenizer.json").is_file():
        return
    from data.tokenizer import KoTokenizer, TokenizerError

    try:
        tok = KoTokenizer.load(path)
    except (TokenizerError, FileNotFoundError):
        return
    if tokenizer_ids(tok) != recorded:
        folder = start.tokenizer()
        if folder is not None and folder.resolve() == path.resolve():  # the folder it names was trained again
            what = f"its tokenizer folder {path} (recorded in meta.json) holds now"
            fix = (f"the folder was trained again or replaced since. Put that tokenizer back into {path} (the run's "
                   f"final/ folder holds a copy when it got that far), or move {path} away and pass a copy of the "
                   f"original with --tokenizer DIR")
        else:
            what = f"--tokenizer {path} holds"
            fix = f"pass the tokenizer it was trained with ({folder}) or leave --tokenizer out"
        raise SystemExit(f"--checkpoint {start.path} was trained with another tokenizer than {what} (vocabulary or "
                         f"morpheme analyzer differ: vocab {tok.vocab_size}, morpheme {tok.morpheme or 'none'}), so "
                         f"token ids would not match the trained embeddings; {fix}")


def _keep_resumed_batch(args: Namespace, meta: dict, ctx) -> None:
    """--train_batch_size 0 on a full resume: the batch the checkpoint's run found (saved in its
    args), where the process count and accumulation are the same, so that the data order continues
    as in the uninterrupted run (a new search may find another size: free memory differs)."""
    saved = meta["args"]
    batch, world = int(saved.get("train_batch_size") or 0), meta.get("world_size")
    if batch and world == ctx.world_size and saved.get("gradient_accumulation_steps") == args.gradient_accumulation_steps:
        args.train_batch_size = batch
        ctx.log(f"[batch size] --train_batch_size 0 on a resume: the checkpoint's {batch} per process "
                f"({world} process(es)), so that the data order continues; pass a number to change it")
    else:
        ctx.log(f"[batch size] --train_batch_size 0 on a resume at another process count or accumulation "
                f"(checkpoint: {batch} per process x {world} process(es)): searching again; the data order "
                f"differs from the original run's unless the global batch comes out the same")


def _note_schedule_change(args: Namespace, meta: dict, step: int, log) -> None:
    """A resume whose schedule differs from the checkpoint's run (typically --num_steps raised after
    the run ended, which lengthens the linear decay) follows the new schedule from the next step:
    say so, with the learning rate the next step gets under each."""
    saved = Namespace(**{**vars(args), "lr_schedule": "linear", "decay_steps": 0, "scheduler_num_steps": 0,
                         **{k: v for k, v in meta["args"].items() if k in SCHEDULE_FLAGS}})
    shape = {"learning_rate": lambda a: a.learning_rate, "warmup_steps": lambda a: a.warmup_steps,
             "schedule length": schedule_steps, "lr_schedule": lambda a: a.lr_schedule,
             "decay_steps": lambda a: a.decay_steps if a.lr_schedule == "wsd" else 0}
    changed = [f"{name} {f(saved)} -> {f(args)}" for name, f in shape.items() if f(saved) != f(args)]
    if not changed:
        return
    lr_now = args.learning_rate * schedule_lambda(args)(step)
    lr_then = saved.learning_rate * schedule_lambda(saved)(step)
    log(f"[checkpoint] the learning-rate schedule differs from the checkpoint's run ({'; '.join(changed)}): "
        f"step {step + 1} trains at lr {lr_now:.3g} (under the original schedule: {lr_then:.3g}), and the new "
        f"schedule applies from there")


def _warn_other_data(args: Namespace, meta: dict, path, num_samples: int, state: TrainState, world_size: int,
                     bucketed: bool = False, moe: bool = False) -> None:
    """Resuming on other data is allowed (continued pretraining on a new corpus) but no longer
    reproduces the original run: say so, on stderr."""
    saved, changes = meta["args"], []
    for flag in ("corpus_path", "train_file"):
        before, now = saved.get(flag), getattr(args, flag, None)
        if not _same_path(before, saved.get("cwd"), now):
            changes.append(f"--{flag} {before} -> {now}")
    if meta.get("num_samples") not in (None, num_samples):
        changes.append(f"{meta['num_samples']} -> {num_samples} samples")
    if changes:
        print(f"[checkpoint] warning: {path} was trained on other data ({'; '.join(changes)}). Training goes on "
              f"from its data position (epoch {state.epoch}, sample {state.samples_in_epoch}) in this data, so "
              f"it is not the continuation of the original run; pass the original data to continue that one "
              f"exactly", file=sys.stderr, flush=True)
    # flags that decide which samples come next, or what they hold (masks, lengths)
    order = [f"--{k} {saved[k]} -> {getattr(args, k)}" for k in DATA_ORDER_FLAGS
             if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]
    world, accum = meta.get("world_size"), saved.get("gradient_accumulation_steps")
    if world and accum and saved.get("train_batch_size"):
        old_split = (int(saved["train_batch_size"]), int(world), int(accum))
        new_split = (args.train_batch_size, world_size, args.gradient_accumulation_steps)
        before, now = old_split[0] * old_split[1] * old_split[2], new_split[0] * new_split[1] * new_split[2]
        if before != now:
            order.append(f"global batch {before} -> {now} (--train_batch_size x processes x accumulation)")
        elif old_split != new_split:  # the same global batch, split otherwise
            split = old_split, new_split
            epoch = [samples_per_epoch(num_samples, old_split[0] * old_split[1], now,
                                       saved.get("max_steps_per_epoch") or 0),
                     samples_per_epoch(num_samples, new_split[0] * new_split[1], now, args.max_steps_per_epoch)]
            shown = " -> ".join("{} x {} process(es) x {} accumulation".format(*s) for s in split)
            if bucketed:
                order.append(f"the same global batch of {now} split otherwise ({shown}): training batches are "
                             f"grouped by length in windows of global micro-batches (--unpad auto), so the "
                             f"samples of each step differ")
            elif epoch[0] != epoch[1]:
                order.append(f"the same global batch of {now} split otherwise ({shown}): an epoch takes "
                             f"{epoch[0]} -> {epoch[1]} of the {num_samples} samples (whole global micro-batches "
                             f"of --train_batch_size x processes), so the epochs end elsewhere")
            else:
                print(f"[checkpoint] note: resuming {path} with another split of the same global batch of {now} "
                      f"samples ({shown}, --train_batch_size x processes x --gradient_accumulation_steps): every "
                      f"step trains on the same samples in the same order under the same learning rate, so "
                      f"this continues the run equivalently: the gradients are the same up to rounding (a "
                      f"step's loss is the mean over all its tokens whatever the split; dropout draws other "
                      f"masks" + (", and Switch experts route each micro-batch on its own: their capacity and "
                                  "router loss follow the micro-batch size)" if moe and old_split[0] != new_split[0]
                                  else ")"), file=sys.stderr, flush=True)
    if order:
        print(f"[checkpoint] warning: resuming {path} with other data settings ({'; '.join(order)}): the samples "
              f"from here differ from those the original run would have drawn; pass its values to continue it "
              f"exactly", file=sys.stderr, flush=True)


def _same_path(before: str | None, cwd: str | None, now: str | None) -> bool:
    if before is None or now is None:
        return before == now
    old = Path(before) if Path(before).is_absolute() or cwd is None else Path(cwd) / before
    return old.resolve() == Path(now).resolve()


def _check_fresh_weights(args, task, source: Path, fresh: dict[str, tuple], log) -> None:
    """The model's entries --checkpoint did not provide (`Engine.load_weights`): an evaluation-only
    run (nothing to train) refuses to score them at their random initial values; a training run
    names them (a new task head is expected; a head of another size means other labels)."""
    if not fresh:
        return
    shown = ", ".join(f"{k} {list(m)}" + (f" (checkpoint {list(c)})" if c else " (not taken from the checkpoint)")
                      for k, (m, c) in list(fresh.items())[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "")
    other_size = any(c is not None for _, c in fresh.values())
    hint = (" Its head has another size than this run's: other labels in the files than the checkpoint was "
            "trained on" + (" (pass --num_labels with the checkpoint's class count to score it as it is)"
                            if args.train_mode == "classify" else "") + "." if other_size else "")
    if args.num_steps == 0 or task.dataset is None:
        raise SystemExit(f"--checkpoint {source}: evaluating only (nothing to train), but the {args.train_mode} "
                         f"model's {shown} would keep random initial values: the checkpoint holds no trained "
                         f"{args.train_mode} model for these files.{hint} Fine-tune one first (--train_file), or "
                         f"point --checkpoint at a {args.train_mode} run's checkpoint or final/")
    log(f"[checkpoint] left as initialised (this run trains them): {shown}" + (f".{hint}" if other_size else ""))


def _exported_weights(path) -> dict[str, torch.Tensor]:
    from trainer.export import load_source  # reads transformers ModernBERT folders too

    return load_source(path).state if (path.parent / "config.json").is_file() else checkpoint.load_weights(path)


def _micro_batches(args, ctx, task, sampler: EpochSampler, state: TrainState):
    """This rank's micro-batches from the saved data position on, advancing it as they are consumed."""
    dataset = task.dataset
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=BatchList(sampler.batches(state.epoch, state.samples_in_epoch)),
            collate_fn=task.collate, num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda",
            persistent_workers=False, worker_init_fn=_ignore_stop_signals,
            # its own generator: creating an iterator must not draw from the global RNG (dropout),
            # or a resumed run's random stream would be shifted against the uninterrupted one
            generator=torch.Generator().manual_seed(args.seed + state.epoch))
        for batch in loader:
            state.samples_in_epoch += sampler.global_micro
            yield batch
        state.epoch += 1
        state.samples_in_epoch = 0


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: torchrun, slurm and a terminal's Ctrl-C signal
    the worker's whole process group, and a worker dying first would crash the rank before it can
    save. They exit with it (the rank closes its loader; torch's watchdog ends orphaned workers)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_children() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers) before an immediate exit:
    left alive, a worker serving a batch's file descriptors to the vanished parent prints a
    ConnectionResetError traceback, and lingers until its watchdog notices."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except (OSError, ValueError):
            pass


class _Terminate:
    """SIGTERM (slurm preemption, torchrun shutdown) and SIGINT (Ctrl-C) ask the loop to checkpoint
    at the end of the step and stop (exit 128 + signal); a second SIGINT exits at once, unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, verbose: bool = True):
        self.signum = 0  # the first stop signal received
        self.verbose = verbose
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        # os.write: print() could re-enter a stderr write (the progress bar's) it interrupted
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            os.write(2, b"[train] second SIGINT: exiting now without saving; the last complete step-N is kept\n")
            _kill_children()
            os._exit(130)
        if signum == signal.SIGINT and self.verbose:
            os.write(2, b"[train] SIGINT: saving a checkpoint at the end of this step, then stopping "
                        b"(Ctrl-C again to exit at once without saving)\n")
        self.signum = self.signum or signum

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def _optimizer_state_mb(engine) -> dict[str, float]:
    """Optimizer state per process: the mean over processes (DDP's total / N when sharded) and the largest."""
    mine = torch.tensor([engine.optimizer_state_bytes() / 2**20], dtype=torch.float64, device=engine.ctx.device)
    total, largest = dist.all_reduce(mine.clone(), "sum"), dist.all_reduce(mine.clone(), "max")
    return {"perf/optimizer_state_mb": total.item() / dist.world_size(), "perf/optimizer_state_max_mb": largest.item()}


def _step_scalars(meter: MetricMeter, engine, state: TrainState, lr: float, result: engines.StepResult,
                  since: tuple[float, int]) -> dict[str, float]:
    """The logged row of a step: the training metrics since the last row (`since`: seconds and
    steps), rates, optimizer state and memory (collective: the meter and optimizer state are reduced)."""
    scalars, tokens, samples = meter.reduce(engine.ctx.device)
    elapsed = max(since[0], 1e-9)
    return {f"train/{k}": v for k, v in scalars.items()} | {
        "train/lr": lr, "train/grad_norm": result.grad_norm,
        "train/loss_scale": result.loss_scale, "train/epoch": state.epoch,
        "perf/tokens_per_s": tokens / elapsed, "perf/samples_per_s": samples / elapsed,
        "perf/step_time_s": elapsed / max(1, since[1]),
        **_optimizer_state_mb(engine)} | memory_mb(engine.ctx.device)


def _stop_bad_steps(engine, state: TrainState, rd, meta: dict, last_loss: float, result: engines.StepResult) -> None:
    """--max_bad_steps consecutive bad steps: save them for inspection and raise Stop naming the
    last good checkpoint to resume from."""
    first_bad = state.step - state.bad_steps + 1
    good = [p for p in checkpoint.list_checkpoints(rd) if int(p.name.split("-")[1]) < first_bad]
    # keep=0: the checkpoints from before the bad steps must survive this one
    path = checkpoint.save(engine, state, rd, meta, keep=0)
    before = (f"the last checkpoint before them is {good[-1]}" if good
              else "no checkpoint precedes them")
    again = f"resume from --checkpoint {good[-1]}" if good else "train again"
    raise Stop(f"{state.bad_steps} consecutive steps with non-finite loss or gradients (steps "
               f"{first_bad}-{state.step}; last loss {last_loss}, grad norm {result.grad_norm}, "
               f"loss scale {result.loss_scale}); saved {path} for inspection, {before}. "
               f"Lower --learning_rate, raise --warmup_steps or use --bf16 instead of --fp16, and "
               f"{again} (or raise --max_bad_steps)", code=3)


def token_weights(task, micros: list[dict], world_size: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]] | None:
    """For each micro-batch of a step (on the device), loss name -> its weight: the micro-batch's
    tokens for that loss (Task.loss_tokens) x micro-batches in the step (all processes) / the step's
    tokens. A loss that is a mean over its micro-batch's tokens (MLM), so weighted and averaged over the
    micro-batches and processes as the engines do, is the mean over all the step's tokens: the step's
    gradient is one batch's, whatever the split into --train_batch_size x processes x accumulation
    (unweighted, micro-batches with fewer masked tokens weighed more per token). One all-reduce of a
    few numbers per step, on the device (no host sync). None: nothing to weight (one micro-batch in
    all, or no such loss)."""
    counts = [task.loss_tokens(b) for b in micros]
    names = sorted(counts[0]) if counts else []
    if not names or len(micros) * world_size == 1:
        return None
    local = torch.stack([torch.stack([torch.as_tensor(c[n], device=device) for n in names]) for c in counts]).float()
    total = dist.all_reduce(local.sum(0), "sum")                 # (K,) the step's tokens per loss
    w = local * (len(micros) * world_size) / total.clamp_min(1)  # (accum, K)
    return [dict(zip(names, row)) for row in w]


def weighted(out: dict, weights: dict[str, torch.Tensor]) -> dict:
    """The model's outputs with each token-mean loss (and its accuracy, "<x>_acc" of "<x>_loss") times its
    weight, and "loss" changed by as much: what the engines average is then a mean over the step's tokens
    (and so is what the logs show)."""
    out = dict(out)
    for name, w in weights.items():
        if name not in out:
            continue
        loss = out[name]
        out[name] = loss * w
        out["loss"] = out["loss"] + (out[name] - loss)
        acc = name.removesuffix("_loss") + "_acc"
        if acc in out:
            out[acc] = out[acc] * w
    return out


def _train(args, ctx, task, engine, model, state: TrainState, logger: Logger, rd, meta: dict,
           sampler: EpochSampler) -> None:
    batches = _micro_batches(args, ctx, task, sampler, state)
    meter = MetricMeter()
    accum = args.gradient_accumulation_steps
    term = _Terminate(verbose=ctx.is_main)
    engine.train()
    last_log, last_step = time.perf_counter(), state.step
    ctx.log(f"[train] {args.launcher} engine={engine.name} stage={engine.stage} processes={ctx.world_size} "
                  f"device={ctx.device} batch={args.train_batch_size}x{accum}x{ctx.world_size} "
                  f"samples={len(task.dataset)} steps {state.step}->{args.num_steps}")
    prober = probe.Prober(args, ctx, task, meta) if args.probe_steps else None

    def save():
        return checkpoint.save(engine, state, rd, meta, keep=args.keep_checkpoints)

    try:
        while state.step < args.num_steps:
            finite = torch.ones((), dtype=torch.bool, device=ctx.device)  # read once per step, no sync per micro-batch
            micros = [task.to_device(next(batches)) for _ in range(accum)]
            weights = token_weights(task, micros, ctx.world_size, ctx.device)
            for micro, batch in enumerate(micros):
                with engine.accumulate(sync=micro == accum - 1):
                    with engine.autocast():
                        out = model(**batch)
                    out = weighted(out, weights[micro]) if weights else out
                    engine.backward(out["loss"] / accum)
                meter.add(out, task.count_tokens(batch), args.train_batch_size)
                last_loss = out["loss"].detach()
                finite &= torch.isfinite(last_loss)
            del micros
            lr = engine.lr()  # the rate this step applies
            result = engine.step()
            state.step += 1
            logger.advance()
            bad = not bool(finite) or result.bad  # the engine judges its gradients (StepResult.bad)
            faults.inject("after_step", state.step, ctx.rank)  # test hooks, no-ops unless TRAINER_TEST_FAULT
            faults.inject("sigterm", state.step, ctx.rank)
            # One all-reduce per step makes every rank take the same decision: a loss can be
            # non-finite on one rank only, and SIGTERM may reach the ranks at different steps.
            if ctx.world_size > 1:
                flags = torch.tensor([float(bad), float(term.signum)], device=ctx.device)
                dist.all_reduce(flags, "max")
                bad, terminate = bool(flags[0].item()), int(flags[1].item())
            else:
                terminate = term.signum
            state.bad_steps = state.bad_steps + 1 if bad else 0

            # held-out validation (task.validate) every --eval_steps and at the last step, in the same row
            eval_due = bool(task.validation_metrics()) and (
                state.step == args.num_steps or bool(args.eval_steps and state.step % args.eval_steps == 0))
            # downstream probes (trainer/probe.py) every --probe_steps and at the last step; not when stopping
            probe_due = prober is not None and prober.due(state.step) and not terminate
            if state.step % args.logging_steps == 0 or state.step == args.num_steps or eval_due or probe_due:
                now = time.perf_counter()
                scalars = _step_scalars(meter, engine, state, lr, result, (now - last_log, state.step - last_step))
                if eval_due:
                    evaluated = task.validate(engine)
                    scalars |= {f"eval/{k}": v for k, v in evaluated.items()}
                    ctx.log(f"[eval] step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluated.items()))
                if probe_due:
                    scalars |= prober.run(state.step, engine)
                logger.log(state.step, scalars)
                last_log, last_step = (time.perf_counter() if eval_due or probe_due else now), state.step

            if state.bad_steps >= args.max_bad_steps:
                _stop_bad_steps(engine, state, rd, meta, float(last_loss), result)
            if terminate:
                path = save()
                raise Stop(f"{signal.Signals(terminate).name} at step {state.step}: saved checkpoint {path}; "
                           f"resume with --checkpoint auto", code=128 + terminate)
            # no periodic save inside a run of bad steps: --keep_checkpoints rotation would replace
            # the good checkpoints from before it by broken ones
            if (args.save_steps and state.step % args.save_steps == 0 and state.step < args.num_steps
                    and state.bad_steps == 0):
                save()
        save()
    finally:
        term.restore()
        # shut the DataLoader workers down now: a loader kept alive by a traceback would meet
        # multiprocessing's exit-time terminate(), which the workers ignore, and hang the exit
        batches.close()
