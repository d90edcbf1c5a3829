"""One Engine per backend; `create` picks it from --engine and the launcher's stage."""
from __future__ import annotations

from argparse import Namespace

from trainer.dist import DistContext
from trainer.engines.base import Engine, StepResult


def engine_class(name: str) -> type[Engine]:
    """The Engine of --engine (its module imports the backend library only when used)."""
    if name == "torch":
        from trainer.engines.torch import TorchEngine
        return TorchEngine
    if name == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine
    if name == "fairscale":
        from trainer.engines.fairscale import FairscaleEngine
        return FairscaleEngine
    raise ValueError(f"unknown engine {name!r}")


def create(args: Namespace, ctx: DistContext) -> Engine:
    return engine_class(args.engine)(args, ctx, args.stage)


__all__ = ["Engine", "StepResult", "create", "engine_class"]
