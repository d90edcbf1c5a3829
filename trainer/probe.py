"""Downstream probes during pretraining: `--probe_steps N --probe_tasks nsmc,...`.

Every N optimizer steps (and at the last step) the loop hands the live engine to `Prober.run`,
which fine-tunes a copy of the current encoder on a small fixed slice of each task and returns
`probe/<task>/<metric>` for the Logger (TensorBoard, loss.tsv columns for the headline metrics,
the --report_to trackers). The recipes are trainer.evaluate's (`RECIPES`), sliced (`SIZE`, one
pass over the slice, seed 42), overridable with `--probe_set TASK.FLAG=VALUE`; a probe value is
what `python -m trainer.evaluate <the same weights> --tasks T --set <evaluate_sets(...)>` gives.

How it runs (docs/tasks.md "Probing during pretraining" has the why):
- in the training processes, every rank taking part: the consolidated weights (the engine's
  `full_state_dict`, the path of the final export, so FSDP2/ZeRO-3/DeepSpeed shards are gathered)
  go to `run_dir/probe/final/`, then each task is one `trainer.loop.run` on the same process
  group, sharded like any fine-tune (torch engine at the run's stage: DDP, ZeRO-1 or FSDP2). No
  rank waits on another for longer than a file write, so no collective can time out;
- the live model, its optimizer and the data position are not touched, and every rank's random
  state (python, numpy, torch, CUDA) is saved before and restored after: a run with probes has the
  same training losses, bit for bit, as one without;
- `run_dir/probe/` (the weights copy and the fine-tune's run directory) is deleted after each probe.
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import signal
import time
from argparse import Namespace
from pathlib import Path

import torch

from trainer import checkpoint, dist
from trainer.dist import DistContext

SIZE = {"max_train_examples": 1024, "max_eval_examples": 512}  # each task's fixed slice (first rows)
SEED = 42
MARK = ".probe_work"  # marks run_dir/probe/ as the probe's own scratch folder


def task_names(args: Namespace) -> list[str]:
    return [t.strip() for t in args.probe_tasks.split(",") if t.strip()]


def tags(args: Namespace) -> list[str]:
    """The loss.tsv columns: each task's headline metrics (trainer.evaluate's HEADLINE; the others go
    to TensorBoard only) and the probe's seconds."""
    from trainer.evaluate import HEADLINE

    if not getattr(args, "probe_steps", 0):
        return []
    return [f"probe/{t}/{m}" for t in task_names(args) for m in HEADLINE[t]] + ["probe/time_s"]


def evaluate_sets(args: Namespace, parser) -> dict[str, list[str]]:
    """Per task, the `--set TASK.FLAG=VALUE` items that turn trainer.evaluate's recipe into the
    probe's: the slice, one pass over it (num_steps = rows / global batch, 10% warm-up), then
    --probe_set (which wins, `all.` or per task)."""
    from trainer.evaluate import recipes

    names = task_names(args)
    sized = [f"all.{k}={v}" for k, v in SIZE.items()]
    first = recipes(names, sized + list(args.probe_set), args.probe_data_dir, _Renamed(parser))
    out = {}
    for t in names:
        mine = [s for s in args.probe_set if s.startswith(("all.", f"{t}."))]
        given = {s.split("=", 1)[0].split(".", 1)[1] for s in mine}
        derived = []
        rows, batch = int(first[t]["max_train_examples"]), int(first[t]["train_batch_size"])
        steps = int(first[t]["num_steps"])
        if rows and "num_steps" not in given:  # rows 0 = all: the evaluate recipe's num_steps
            steps = math.ceil(rows / batch)
            derived.append(f"num_steps={steps}")
        if "warmup_steps" not in given:
            derived.append(f"warmup_steps={steps // 10}")
        # in the order trainer.evaluate applies them: the slice, then --probe_set's all.X, then its TASK.X
        ordered = [f"{k}={v}" for k, v in SIZE.items()] + derived + [
            s.split(".", 1)[1] for s in sorted(mine, key=lambda s: not s.startswith("all."))]
        final = dict(s.split("=", 1) for s in ordered)  # the last value of each flag is the one applied
        out[t] = [f"{t}.{k}={v}" for k, v in final.items()]
    return out


class _Renamed:
    """trainer.evaluate's messages about its --set, for --probe_set."""

    def __init__(self, parser):
        self.parser = parser

    def error(self, message: str):
        self.parser.error(message.replace("--set ", "--probe_set ", 1))


def plan(args: Namespace, parser, ckpt: dict, world: int) -> dict[str, list[str]]:
    """Per task, the launcher argv of its probe fine-tune from `ckpt` ({"checkpoint", "model"})."""
    from trainer.evaluate import job_argv, recipes

    sets = evaluate_sets(args, parser)
    out = {}
    for t in task_names(args):
        recipe = recipes([t], sets[t], args.probe_data_dir, parser)[t]
        batch = int(recipe["train_batch_size"])
        if batch % world:
            parser.error(f"--probe_tasks {t}: the probe's train_batch_size {batch} (the global batch) is not "
                         f"divisible by the {world} processes; add --probe_set {t}.train_batch_size=<a multiple "
                         f"of {world}>")
        argv = job_argv(t, recipe, ckpt, SEED, work_dir(args) / "runs", world, no_progress=False)
        # the run's device and precision; the torch engine at the run's ZeRO stage (parameters
        # stay sharded with --zero3), whatever --engine pretrains
        argv += ["--device", args.device, "--report_to", "tensorboard"]
        argv += [f for f, on in (("--fp16", args.fp16), ("--bf16", args.bf16), ("--zero3", args.stage == 3),
                                 ("--auto_wrap", args.auto_wrap and args.stage >= 2)) if on]
        out[t] = argv + ["--no_progress"]
    return out


def work_dir(args: Namespace) -> Path:
    """The probe's scratch folder: in the run directory, which every node reads (the weights copy)."""
    from trainer.args import run_dir

    return run_dir(args) / "probe"


def launcher_stage(args: Namespace) -> int:
    return min(args.stage, 2)  # stage 3 = train_zero_two.py --zero3


def check(args: Namespace, parser) -> None:
    """validate_args' part: flags, task names, every probe recipe parsed as its launcher would and
    its data files read, before any work."""
    from trainer.args import parse_args
    from trainer.evaluate import DATA_DIR, SUITES, _check_data

    args.probe_data_dir = args.probe_data_dir or DATA_DIR
    if args.probe_steps < 0:
        parser.error(f"--probe_steps must be >= 0 (0 = no probes), got {args.probe_steps}")
    if not args.probe_steps:
        return
    if args.train_mode != "pretrain":
        parser.error(f"--probe_steps probes a pretraining run; --train_mode {args.train_mode} is evaluated at its "
                     f"end (use trainer.evaluate to score its checkpoints on other tasks)")
    valid = SUITES["korean"]
    names = task_names(args)
    unknown = [t for t in names if t not in valid]
    if unknown or not names:
        parser.error(f"--probe_tasks {args.probe_tasks!r}: unknown task(s) {', '.join(unknown) or '(none given)'}; "
                     f"valid: {', '.join(valid)} (trainer.evaluate's suite)")
    if len(set(names)) != len(names):
        parser.error(f"--probe_tasks {args.probe_tasks!r} names a task twice")
    work = work_dir(args)
    if work.exists() and not (work / MARK).is_file():
        parser.error(f"{work} exists and was not written by the probe, which needs that folder for its scratch "
                     f"copies; move it away")
    world = int(os.environ.get("WORLD_SIZE") or 1)
    for task, argv in plan(args, parser, {"checkpoint": "", "model": args.model}, world).items():
        try:
            parse_args(launcher_stage(args), argv)
        except SystemExit as e:
            if e.code:
                parser.error(f"--probe_tasks {task}: its probe recipe is not valid for this run (see the message "
                             f"above); fix it with --probe_set {task}.FLAG=VALUE (data files: --probe_data_dir)")
        try:
            _check_data(task, argv[:argv.index("--device")])
        except SystemExit as e:
            parser.error(f"--probe_tasks: {e}; pass the data with --probe_data_dir or --probe_set {task}.train_file=...")


class _Quiet(DistContext):
    """The fine-tunes' own messages ([classify] ..., [train] ..., [export] ...) are not printed."""

    def log(self, message: str) -> None:
        pass


class Prober:
    """Created by the loop before the first step; `due(step)`, then `run(step, engine)` on every rank."""

    def __init__(self, args: Namespace, ctx: DistContext, task, meta: dict):
        self.args, self.ctx = args, ctx
        self.tasks = task_names(args)
        self.config, self.tokenizer_dir = task.config.to_dict(), task.tokenizer_dir
        self.meta = {"args": meta["args"], "train_mode": meta["train_mode"]}
        self.work = work_dir(args)
        self.sets = evaluate_sets(args, args._parser)
        self.spent, self.count = 0.0, 0
        self.started = time.perf_counter()
        if ctx.is_main:
            self._clear()  # a killed probe's leftovers (check() refused a folder that is not ours)
        ctx.log(f"[probe] {', '.join(self.tasks)} every {args.probe_steps} steps and at step {args.num_steps}, "
                f"each the recipe of `python -m trainer.evaluate CKPT --tasks {','.join(self.tasks)} "
                f"--data_dir {args.probe_data_dir} "
                + " ".join(f"--set {s}" for t in self.tasks for s in self.sets[t]) + "`")

    def due(self, step: int) -> bool:
        return step % self.args.probe_steps == 0 or step == self.args.num_steps

    def _clear(self) -> None:
        if self.work.exists() and (self.work / MARK).is_file():
            shutil.rmtree(self.work)

    def run(self, step: int, engine) -> dict[str, float]:
        """Fine-tune and score a copy of the current weights on every probe task (collective)."""
        from trainer.args import parse_args
        from trainer.evaluate import prepare
        from trainer.loop import Stop, run

        start = time.perf_counter()
        rng = checkpoint._rng_state()
        scalars: dict[str, float] = {}
        stop_signal = 0
        try:
            if self.ctx.is_main:
                self.work.mkdir(parents=True, exist_ok=True)
                (self.work / MARK).write_text("scratch copies of the probe; deleted after each probe\n")
            snapshot = checkpoint.export(engine, self.work, dict(self.meta, step=step), self.config,
                                         self.tokenizer_dir)  # collective; ends in a barrier
            ckpt = prepare(str(snapshot), self.work, "snapshot", self.ctx.is_main)
            argvs = plan(self.args, self.args._parser, ckpt, self.ctx.world_size)
            quiet = _Quiet(self.ctx.rank, self.ctx.world_size, self.ctx.local_rank, self.ctx.device, self.ctx.backend)
            for task in self.tasks:
                try:
                    metrics = run(parse_args(launcher_stage(self.args), argvs[task]), quiet)["eval"]
                except Stop as e:  # every rank together (the fine-tune's loop decides with an all-reduce)
                    if e.code > 128:  # SIGTERM/SIGINT during the fine-tune: the pretraining loop stops at its next step
                        stop_signal = e.code - 128
                        break
                    self.ctx.log(f"[probe] step {step}: the {task} fine-tune stopped ({e}); no value")
                    continue
                scalars |= {f"probe/{task}/{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}
        finally:
            checkpoint._set_rng_state(rng)
            gc.collect()  # the fine-tune's model and optimizer, before the next training step
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.ctx.is_main:
                self._clear()
        dist.barrier()
        if stop_signal:
            self.ctx.log(f"[probe] step {step}: {signal.Signals(stop_signal).name} during the probe; it ends here "
                         f"and the pretraining saves and stops after its next step")
            signal.raise_signal(stop_signal)  # to the pretraining loop's handler, restored by now
        seconds = time.perf_counter() - start
        self.spent, self.count = self.spent + seconds, self.count + 1
        share = self.spent / max(time.perf_counter() - self.started, 1e-9)
        headline = tags(self.args)
        shown = ", ".join(f"{k[len('probe/'):]}={v:.4f}" for k, v in scalars.items() if k in headline)
        self.ctx.log(f"[probe] step {step}: {shown or 'no values'} ({seconds:.1f} s; {self.count} probe(s) "
                     f"{self.spent:.1f} s = {share:.1%} of the training time so far)")
        return scalars | {"probe/time_s": seconds}
