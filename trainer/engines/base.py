"""The Engine interface: what the one training loop asks of a backend.

The loop calls, in order: `wrap(model)` once; per micro-batch `with engine.accumulate(last):`
`with engine.autocast(): out = model(**batch)` then `backward(loss)`; `step()` per optimizer
step; `save(dir)` / `load(dir)` for checkpoints; `full_state_dict()` for the final export.
Each backend (torch, deepspeed, fairscale) and ZeRO stage implements this once.
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from trainer.dist import DistContext


@dataclass
class StepResult:
    grad_norm: float      # before clipping; inf/nan when the gradients were not finite
    skipped: bool         # the optimizer step was not applied (non-finite gradients)
    loss_scale: float     # fp16 loss scale (1.0 without fp16)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (every 1-D parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak, then linear decay to 0 at `total_steps`."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def reset_peak_lr(scheduler, peak_lr: float) -> None:
    """After loading a LambdaLR state: apply this run's --learning_rate.

    The saved state carries the old run's base rates, so a resume with a changed learning rate
    (e.g. lowered after divergence) would silently keep the old one. The schedule's shape comes
    from the current flags anyway (its lambda is not part of the state)."""
    scheduler.base_lrs = [peak_lr] * len(scheduler.base_lrs)
    rates = [peak_lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates


def amp_dtype(args: Namespace) -> torch.dtype | None:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def tensor_state_bytes(state: dict) -> int:
    """Bytes of the tensors held locally in an optimizer state (local shards of DTensors)."""
    total = 0
    for per_param in state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


class Engine(ABC):
    name = "base"

    def __init__(self, args: Namespace, ctx: DistContext, stage: int):
        self.args, self.ctx, self.stage = args, ctx, stage
        self.amp_dtype = amp_dtype(args)
        self.model: nn.Module | None = None

    # -- setup -------------------------------------------------------------------------
    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard/wrap the model, build optimizer, scheduler and loss scaler; return the model to call."""

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (its attributes, e.g. gather_fn)."""
        return self.model

    # -- one step ----------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    @abstractmethod
    def accumulate(self, sync: bool):
        """Context for one micro-batch; gradients are synchronised only when `sync`."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> StepResult:
        """Unscale, clip, apply the optimizer step (unless non-finite), advance the LR schedule, zero grads."""

    @abstractmethod
    def lr(self) -> float: ...

    # -- state -------------------------------------------------------------------------
    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write model + optimizer + scheduler + scaler state into ckpt_dir (collective)."""

    @abstractmethod
    def load(self, ckpt_dir: Path, weights_only: bool = False) -> None:
        """Read what `save` wrote (collective). weights_only: model weights present in both, nothing else."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated model weights on CPU, complete on rank 0 (collective)."""

    @abstractmethod
    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this process."""

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @staticmethod
    def finite(x: float) -> bool:
        return math.isfinite(x)
