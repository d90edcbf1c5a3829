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
    bad: bool = False     # non-finite gradients that no loss scaler can still fix (counts to --max_bad_steps)


def is_bad_step(loss_ok: bool, skipped: bool, loss_scale: float, fp16: bool) -> bool:
    """A step counts towards --max_bad_steps when its loss is not finite, or its gradients are not
    finite and no fp16 loss scaler can still fix that: an fp16 overflow at a loss scale > 1 is the
    scaler's normal search (it skips the step and halves the scale), not a bad step."""
    return not loss_ok or (skipped and (not fp16 or loss_scale <= 1.0))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (every 1-D parameter; a
    sharded parameter is judged by its original shape, fairscale FSDP's `_orig_size`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "_orig_size", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(args: Namespace, device: torch.device | None = None) -> dict:
    """AdamW's arguments from the flags (the weight decay is per group: `param_groups`). With the
    `device` of a torch AdamW, `fused=True` where torch has the fused kernel for it (CPU, CUDA, ...):
    one kernel over all parameters instead of a dozen ops per tensor; at BERT-base size on 2 CPU
    cores the step takes 0.065 s instead of 0.22-0.34 s (bench/README.md). Same update up to rounding."""
    kwargs = dict(lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_epsilon)
    if device is not None:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        if device.type in _get_fused_kernels_supported_devices():
            kwargs["fused"] = True
    return kwargs


# Compiled variants of the encoder layers' one code object that dynamo keeps (its default, 8, is
# reached within tens of steps): padded batch or not, local or global attention (ModernBERT), the
# last layer at its query rows, training or validation, each first static then dynamic in the
# sequence length: 32 for a ModernBERT. Past the limit dynamo runs the layer eagerly from then on.
RECOMPILE_LIMIT = 64


def compile_layers(model: nn.Module, device: torch.device) -> None:
    """torch.compile each encoder layer of `model` in place (what --compile does, `compile_blocks`)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    if device.type == "cpu":
        # dropout through aten's generator, not inductor's generated one: on the CPU that is faster
        # (small config 1.07x eager instead of 0.98-1.02x) and draws the eager masks (same losses)
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True
    for block in model.encoder.blocks():
        block.compile()


def schedule_steps(args: Namespace) -> int:
    """The LR schedule's length: --scheduler_num_steps, 0 meaning --num_steps."""
    return args.scheduler_num_steps or args.num_steps


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "linear", decay_steps: int = 0):
    """The LR factor of each step: linear warm-up from 0 to the peak, then
    linear: linear decay to 0 at `total_steps`;
    wsd (warmup-stable-decay): the peak until the last `decay_steps` steps, then 1-sqrt decay
    (factor 1 - sqrt(progress through the decay), Hägele et al. 2024, as ModernBERT) to 0 at `total_steps`."""
    if schedule not in ("linear", "wsd"):
        raise ValueError(f"schedule must be 'linear' or 'wsd', got {schedule!r}")
    decay_start = total_steps - decay_steps

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "wsd":
            if step < decay_start:
                return 1.0
            return max(0.0, 1.0 - math.sqrt(min(1.0, (step - decay_start) / max(1, decay_steps))))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def schedule_lambda(args: Namespace):
    """lr_lambda for the run's flags (--warmup_steps, --scheduler_num_steps or --num_steps,
    --lr_schedule, --decay_steps): the one schedule of every engine."""
    return lr_lambda(args.warmup_steps, schedule_steps(args),
                     getattr(args, "lr_schedule", "linear"), getattr(args, "decay_steps", 0))


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
        self._inner: nn.Module | None = None  # the unwrapped model, set by `wrap`

    # -- setup -------------------------------------------------------------------------
    @classmethod
    def flag_problems(cls, args: Namespace, stage: int) -> list[str]:
        """The engine-specific flags (--auto_wrap, --compile, --cpu_offload, --deepspeed_config) this
        engine cannot honour at ZeRO `stage` (3 = train_zero_two.py --zero3), each with its fix;
        trainer.args.validate_args stops on them before any work. Here: the DeepSpeed-only flags."""
        problems = []
        if args.cpu_offload:
            problems.append("--cpu_offload is a DeepSpeed feature: add --engine deepspeed")
        if args.deepspeed_config:
            problems.append("--deepspeed_config needs --engine deepspeed")
        return problems

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard/wrap the model, build optimizer, scheduler and loss scaler; return the model to call."""

    def compile_blocks(self, model: nn.Module) -> None:
        """--compile: torch.compile each encoder layer in place (regional compilation), before
        wrapping. Parameter names stay (checkpoints are the same as eager ones), DDP/FSDP/ZeRO
        see ordinary modules, and a layer type is compiled once, not once per layer."""
        if getattr(self.args, "compile", False):
            compile_layers(model, self.ctx.device)

    def _schedule(self, optimizer: torch.optim.Optimizer, sharded_grads: bool) -> None:
        """self.optimizer, the LR schedule over it (`schedule_lambda`) and, with --fp16, the loss
        scaler: ShardedGradScaler when each rank holds only its shard of the gradients (it agrees on
        inf/nan across ranks), else GradScaler."""
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda(self.args))
        self.scaler = None
        if self.args.fp16:
            if sharded_grads:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler(device=self.ctx.device.type)
                if type(optimizer) is torch.optim.AdamW:
                    # the fused AdamW takes the scaler's found_inf into its kernel and wants a 0-d
                    # tensor; ShardedGradScaler's is shape [1] (measured on CUDA, torch 2.11: "output
                    # with shape [] doesn't match the broadcast shape [1]"). The foreach AdamW lets
                    # the scaler skip the step itself.
                    for group in optimizer.param_groups:
                        group["fused"] = False
                    optimizer._step_supports_amp_scaling = False
            else:
                self.scaler = torch.amp.GradScaler(self.ctx.device.type)

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (its attributes, e.g. gather_fn)."""
        return self._inner

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
    def load(self, ckpt_dir: Path) -> None:
        """Read what `save` wrote (collective)."""

    def load_weights(self, weights: dict[str, torch.Tensor], source: Path | str = "") -> dict[str, tuple]:
        """Initialise the model from the weights of another run or task (collective; every rank
        passes the same full tensors): those whose name and shape match, `checkpoint.matching_weights`
        (at least the encoder's, else SystemExit naming `source`). Optimizer state stays fresh.
        Returns the model's entries it left as initialised: name -> (the model's shape, the
        checkpoint's shape or None where it has no such entry)."""
        from trainer import checkpoint

        own = self.weight_shapes()
        matched = checkpoint.matching_weights(weights, own, source)
        fresh = {k: (tuple(shape), tuple(weights[k].shape) if k in weights else None)
                 for k, shape in own.items() if k not in matched}
        self._set_weights(matched)  # (torch's set_model_state_dict adds the model's own entries to it)
        return fresh

    def weight_shapes(self) -> dict[str, torch.Size]:
        """Name -> full (unsharded) shape of every entry of the model's state dict."""
        return {k: v.shape for k, v in self.module.state_dict().items()}

    @abstractmethod
    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (full tensors of some of the model's entries) into the model (collective)."""

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
