"""Tasks (train_mode) plug into the one loop: each builds its tokenizer, data and model.

A Task exposes `model` (unwrapped), `config`, `tokenizer_dir`, `dataset` (with `collate`),
`make_batch(b)` (a worst-case batch for the batch-size finder), `attach(engine)` (after the
engine has wrapped the model) and `evaluate(engine)` (after training; {} when nothing to do) and `validate(engine)` with
`validation_metrics()` (held-out metrics every --eval_steps and at the last step; pretrain).
"""
from __future__ import annotations

import importlib
from argparse import Namespace

from trainer.checkpoint import Start
from trainer.dist import DistContext
from trainer.tasks.base import Task
from trainer.tasks.pooling import resolve_pooling, uses_pooling

# train_mode -> (module in trainer/tasks, Task class); imported on use (each pulls in its data code)
TASKS = {"pretrain": ("pretrain", "PretrainTask"), "mrc": ("mrc", "MRCTask"), "ict": ("ict", "ICTTask"),
         "encoder": ("encoder", "EncoderTask"), "classify": ("classify", "ClassifyTask"), "ner": ("ner", "NERTask"),
         "nli": ("pairs", "NLITask"), "sts": ("pairs", "STSTask")}


def build(args: Namespace, ctx: DistContext, start: Start | None = None) -> Task:
    """The task of --train_mode; `start`: the resolved --checkpoint (resolved here when None)."""
    if start is None:
        from trainer.args import run_dir
        from trainer.checkpoint import CheckpointError, resolve_start

        try:
            start = resolve_start(args.checkpoint, run_dir(args))
        except CheckpointError as e:
            raise SystemExit(str(e)) from None
    if uses_pooling(args):  # before the task builds its model; the checkpoint's meta records the choice
        args.pooling, why = resolve_pooling(args, start=start)
        if why:
            ctx.log(f"[{args.train_mode}] {why}")
    if args.train_mode not in TASKS:
        raise SystemExit(f"--train_mode {args.train_mode} is not available")
    module, cls = TASKS[args.train_mode]
    return getattr(importlib.import_module(f"trainer.tasks.{module}"), cls)(args, ctx, start)


__all__ = ["Task", "build"]
