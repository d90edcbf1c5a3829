"""The one training loop, shared by train.py, train_zero_one.py and train_zero_two.py."""
from __future__ import annotations

import random
import signal
import sys
import time
from argparse import Namespace

import numpy as np
import torch

from trainer import checkpoint, dist, engines, faults, tasks
from trainer.args import parse_args, public_args, run_dir
from trainer.batch_size import find_batch_size
from trainer.metrics import Logger, MetricMeter, memory_mb
from trainer.sampler import BatchList, EpochSampler, TrainState


class Stop(Exception):
    """Training stops early (non-finite steps, SIGTERM) after saving a checkpoint."""

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
    except Stop as e:
        if ctx.is_main:
            print(f"[train] stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)
    finally:  # also on SystemExit (bad input found after init): leave no process group behind
        dist.shutdown()


def run(args: Namespace, ctx) -> dict:
    rd = run_dir(args)
    try:
        resume_path, resume_kind = checkpoint.resolve(args.checkpoint, rd)
        resume_meta = checkpoint.read_meta(resume_path) if resume_kind == "step" else None
    except checkpoint.CheckpointError as e:
        raise SystemExit(str(e)) from None
    full_resume = resume_meta is not None and resume_meta["args"]["train_mode"] == args.train_mode
    if resume_meta is not None:
        _check_compatible(args, resume_meta, resume_path)
    existing = checkpoint.list_checkpoints(rd)
    if resume_path is None and existing:
        raise SystemExit(f"{rd} already holds checkpoints ({existing[-1].name} is the latest) and would be "
                         f"overwritten; resume it with --checkpoint auto, or pick another --model_name/--output_dir")
    seed_everything(args.seed)  # identical initial weights on every rank
    task = tasks.build(args, ctx)
    engine = engines.create(args, ctx)
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
        elif resume_kind == "step":
            engine.load(resume_path, weights_only=True)
            ctx.log(f"[checkpoint] initialised matching weights from {resume_path} "
                          f"({resume_meta['args']['train_mode']} checkpoint)")
        else:
            _load_exported(engine, resume_path)
            ctx.log(f"[checkpoint] initialised matching weights from {resume_path}")

    meta = {"args": public_args(args), "model_config": task.config.to_dict(), "train_mode": args.train_mode,
            "tokenizer": str(task.tokenizer_dir) if task.tokenizer_dir else None}
    sampler = None
    if task.dataset is not None:
        # before the Logger, which rewrites loss.tsv: an impossible batch must not touch the run directory
        try:
            sampler = EpochSampler(len(task.dataset), args.train_batch_size, ctx.world_size, ctx.rank, args.seed,
                                   args.gradient_accumulation_steps, args.max_steps_per_epoch)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    logger = Logger(rd, ctx.is_main, args.num_steps, state.step,
                    {"args": meta["args"], "model_config": meta["model_config"]},
                    progress=not args.no_progress and task.dataset is not None and state.step < args.num_steps)
    try:
        if task.dataset is not None and state.step < args.num_steps:
            _train(args, ctx, task, engine, model, state, logger, rd, meta, sampler)
        results = task.evaluate(engine)
        if results:
            logger.log_eval(state.step, results)
            ctx.log("[eval] " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        if args.num_steps > 0 and task.dataset is not None:
            out = checkpoint.export(engine, rd, dict(meta, step=state.step), task.config.to_dict(),
                                    task.tokenizer_dir)
            ctx.log(f"[export] {out}")
    finally:
        logger.close()
    return {"state": state, "eval": results}


def _check_compatible(args: Namespace, meta: dict, path) -> None:
    from models import load_config

    shown = checkpoint.config_mismatch(meta["model_config"], load_config(args.model).to_dict())
    if shown:
        raise SystemExit(f"--checkpoint {path} was trained with another model config ({shown}); "
                         f"pass the same --model as the checkpoint ({meta['args'].get('model')})")


def _load_exported(engine, path) -> None:
    matched = checkpoint.matching_weights(checkpoint.load_weights(path), engine.module.state_dict(), path)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(engine.model, matched, options=StateDictOptions(full_state_dict=True, strict=False))


def _micro_batches(args, ctx, task, sampler: EpochSampler, state: TrainState):
    """This rank's micro-batches from the saved data position on, advancing it as they are consumed."""
    dataset = task.dataset
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=BatchList(sampler.batches(state.epoch, state.samples_in_epoch)),
            collate_fn=task.collate, num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda",
            persistent_workers=False, worker_init_fn=_ignore_sigterm,
            # its own generator: creating an iterator must not draw from the global RNG (dropout),
            # or a resumed run's random stream would be shifted against the uninterrupted one
            generator=torch.Generator().manual_seed(args.seed + state.epoch))
        for batch in loader:
            state.samples_in_epoch += sampler.global_micro
            yield batch
        state.epoch += 1
        state.samples_in_epoch = 0


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: torchrun and slurm signal the worker's whole process
    group, and a worker dying first would crash the rank before it can save. They exit with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Terminate:
    """SIGTERM (slurm preemption, torchrun shutdown) asks the loop to checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _optimizer_state_mb(engine) -> dict[str, float]:
    """Optimizer state per process: the mean over processes (DDP's total / N when sharded) and the largest."""
    mine = torch.tensor([engine.optimizer_state_bytes() / 2**20], dtype=torch.float64, device=engine.ctx.device)
    total, largest = dist.all_reduce(mine.clone(), "sum"), dist.all_reduce(mine.clone(), "max")
    return {"perf/optimizer_state_mb": total.item() / dist.world_size(), "perf/optimizer_state_max_mb": largest.item()}


def _is_bad_step(loss_ok: bool, skipped: bool, loss_scale: float, fp16: bool) -> bool:
    """A step counts towards --max_bad_steps when its loss is not finite, or its gradients are not
    finite and no fp16 loss scaler can still fix that: an fp16 overflow at a loss scale > 1 is the
    scaler's normal search (it skips the step and halves the scale), not a bad step."""
    return not loss_ok or (skipped and (not fp16 or loss_scale <= 1.0))


def _train(args, ctx, task, engine, model, state: TrainState, logger: Logger, rd, meta: dict,
           sampler: EpochSampler) -> None:
    batches = _micro_batches(args, ctx, task, sampler, state)
    meter = MetricMeter()
    accum = args.gradient_accumulation_steps
    term = _Terminate()
    engine.train()
    last_log, last_step = time.perf_counter(), state.step
    ctx.log(f"[train] {args.launcher} engine={engine.name} stage={engine.stage} processes={ctx.world_size} "
                  f"device={ctx.device} batch={args.train_batch_size}x{accum}x{ctx.world_size} "
                  f"samples={len(task.dataset)} steps {state.step}->{args.num_steps}")

    def save():
        return checkpoint.save(engine, state, rd, meta, keep=args.keep_checkpoints)

    try:
        while state.step < args.num_steps:
            finite = torch.ones((), dtype=torch.bool, device=ctx.device)  # read once per step, no sync per micro-batch
            for micro in range(accum):
                batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
                with engine.accumulate(sync=micro == accum - 1):
                    with engine.autocast():
                        out = model(**batch)
                    engine.backward(out["loss"] / accum)
                meter.add(out, task.count_tokens(batch), args.train_batch_size)
                last_loss = out["loss"].detach()
                finite &= torch.isfinite(last_loss)
            lr = engine.lr()  # the rate this step applies
            result = engine.step()
            loss_ok = bool(finite)
            state.step += 1
            logger.advance()
            bad = _is_bad_step(loss_ok, result.skipped, result.loss_scale, args.fp16)
            faults.inject("after_step", state.step, ctx.rank)  # test hooks, no-ops unless TRAINER_TEST_FAULT
            faults.inject("sigterm", state.step, ctx.rank)
            # One all-reduce per step makes every rank take the same decision: a loss can be
            # non-finite on one rank only, and SIGTERM may reach the ranks at different steps.
            if ctx.world_size > 1:
                flags = torch.tensor([float(bad), float(term.requested)], device=ctx.device)
                dist.all_reduce(flags, "max")
                bad, terminate = bool(flags[0].item()), bool(flags[1].item())
            else:
                terminate = term.requested
            state.bad_steps = state.bad_steps + 1 if bad else 0

            if state.step % args.logging_steps == 0 or state.step == args.num_steps:
                scalars, tokens, samples = meter.reduce(ctx.device)
                now = time.perf_counter()
                elapsed = max(now - last_log, 1e-9)
                scalars = {f"train/{k}": v for k, v in scalars.items()} | {
                    "train/lr": lr, "train/grad_norm": result.grad_norm,
                    "train/loss_scale": result.loss_scale, "train/epoch": state.epoch,
                    "perf/tokens_per_s": tokens / elapsed, "perf/samples_per_s": samples / elapsed,
                    "perf/step_time_s": elapsed / max(1, state.step - last_step),
                    **_optimizer_state_mb(engine)} | memory_mb(ctx.device)
                logger.log(state.step, scalars)
                last_log, last_step = now, state.step

            if state.bad_steps >= args.max_bad_steps:
                first_bad = state.step - state.bad_steps + 1
                good = [p for p in checkpoint.list_checkpoints(rd) if int(p.name.split("-")[1]) < first_bad]
                # keep=0: the checkpoints from before the bad steps must survive this one
                path = checkpoint.save(engine, state, rd, meta, keep=0)
                before = (f"the last checkpoint before them is {good[-1]}" if good
                          else "no checkpoint precedes them")
                again = f"resume from --checkpoint {good[-1]}" if good else "train again"
                raise Stop(f"{state.bad_steps} consecutive steps with non-finite loss or gradients (steps "
                           f"{first_bad}-{state.step}; last loss {float(last_loss)}, grad norm {result.grad_norm}, "
                           f"loss scale {result.loss_scale}); saved {path} for inspection, {before}. "
                           f"Lower --learning_rate, raise --warmup_steps or use --bf16 instead of --fp16, and "
                           f"{again} (or raise --max_bad_steps)", code=3)
            if terminate:
                path = save()
                raise Stop(f"SIGTERM at step {state.step}: saved checkpoint {path}; "
                           f"resume with --checkpoint auto", code=143)
            # no periodic save inside a run of bad steps: --keep_checkpoints rotation would replace
            # the good checkpoints from before it by broken ones
            if (args.save_steps and state.step % args.save_steps == 0 and state.step < args.num_steps
                    and state.bad_steps == 0):
                save()
        save()
    finally:
        term.restore()
