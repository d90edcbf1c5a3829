"""One Engine per backend; `create` picks it from --engine and the launcher's stage."""
from __future__ import annotations

from argparse import Namespace

from trainer.dist import DistContext
from trainer.engines.base import Engine, StepResult


def create(args: Namespace, ctx: DistContext) -> Engine:
    if args.engine == "torch":
        from trainer.engines.torch import TorchEngine
        return TorchEngine(args, ctx, args.stage)
    if args.engine == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(args, ctx, args.stage)
    if args.engine == "fairscale":
        from trainer.engines.fairscale import FairscaleEngine
        return FairscaleEngine(args, ctx, args.stage)
    raise ValueError(f"unknown engine {args.engine!r}")


__all__ = ["Engine", "StepResult", "create"]
