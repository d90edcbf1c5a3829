"""Tasks (train_mode) plug into the one loop: each builds its tokenizer, data and model.

A Task exposes `model` (unwrapped), `config`, `tokenizer_dir`, `dataset` (with `collate`),
`make_batch(b)` (a worst-case batch for the batch-size finder), `attach(engine)` (after the
engine has wrapped the model) and `evaluate(engine)` (after training; {} when nothing to do).
"""
from __future__ import annotations

from argparse import Namespace

from trainer.dist import DistContext
from trainer.tasks.base import Task


def build(args: Namespace, ctx: DistContext) -> Task:
    if args.train_mode == "pretrain":
        from trainer.tasks.pretrain import PretrainTask
        return PretrainTask(args, ctx)
    if args.train_mode == "mrc":
        from trainer.tasks.mrc import MRCTask
        return MRCTask(args, ctx)
    if args.train_mode == "ict":
        from trainer.tasks.ict import ICTTask
        return ICTTask(args, ctx)
    if args.train_mode == "encoder":
        from trainer.tasks.encoder import EncoderTask
        return EncoderTask(args, ctx)
    if args.train_mode == "classify":
        from trainer.tasks.classify import ClassifyTask
        return ClassifyTask(args, ctx)
    raise SystemExit(f"--train_mode {args.train_mode} is not available")


__all__ = ["Task", "build"]
