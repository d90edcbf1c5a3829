"""The PyTorch engine: DDP (stage 0), DDP + ZeroRedundancyOptimizer (1), FSDP2 (2, 3).

Stage 2 is `fully_shard(reshard_after_forward=False)`: parameters stay gathered between
forward and backward, so only gradients and optimizer state are sharded (ZeRO-2's memory,
no second all-gather). Stage 3 reshards after forward (ZeRO-3). Checkpoints use
`torch.distributed.checkpoint` (model and, except ZeRO-1, optimizer keyed by parameter
name), so a run resumes on a different number of processes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.base import (Engine, StepResult, adamw_kwargs, is_bad_step, param_groups,
                                  reset_peak_lr, tensor_state_bytes)


def ddp(model: nn.Module, ctx) -> DistributedDataParallel:
    """DDP over `model`; a Switch MoE model may leave experts without tokens in a step (unused parameters)."""
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=model.config.is_moe)


class TorchEngine(Engine):
    name = "torch"

    @classmethod
    def flag_problems(cls, args, stage: int) -> list[str]:
        problems = super().flag_problems(args, stage)
        if args.auto_wrap and stage < 2:
            problems.append("--auto_wrap wraps layers for parameter sharding; use it with train_zero_two.py")
        return problems

    def wrap(self, model: nn.Module) -> nn.Module:
        args, ctx = self.args, self.ctx
        model.to(ctx.device)
        self._inner = model
        self.compile_blocks(model)
        if self.stage >= 2:
            from torch.distributed.fsdp import fully_shard

            reshard = self.stage == 3
            if args.auto_wrap:
                for block in model.encoder.blocks():
                    fully_shard(block, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            self.model = model
        elif ctx.world_size > 1:
            self.model = ddp(model, ctx)
        else:
            self.model = model

        groups = param_groups(model, args.weight_decay)
        if self.stage == 1:
            optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                                weight_decay=args.weight_decay, **adamw_kwargs(args, ctx.device))
            optimizer.add_param_group(groups[1])
        else:
            optimizer = torch.optim.AdamW(groups, **adamw_kwargs(args, ctx.device))
        self._schedule(optimizer, sharded_grads=self.stage >= 2)
        return self.model

    def accumulate(self, sync: bool):
        if sync or self.ctx.world_size == 1:
            if self.stage >= 2:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.stage >= 2:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepResult:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return self._apply_update(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))

    def _apply_update(self, norm: float) -> StepResult:
        """After unscaling and clipping: the optimizer step unless non-finite, the schedule, zero grads."""
        finite = self.finite(norm)
        scale = 1.0
        if self.scaler:
            scale = float(self.scaler.get_scale())
            self.scaler.step(self.optimizer)  # skips the update itself when gradients are not finite
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.scheduler.step()
        return StepResult(norm, not finite, scale, bad=is_bad_step(True, not finite, scale, self.scaler is not None))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- state -------------------------------------------------------------------------
    def _small_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save(self, ckpt_dir: Path) -> None:
        state = {"model": get_model_state_dict(self.model)}
        if self.stage == 1:
            self.optimizer.consolidate_state_dict(to=0)
            if self.ctx.is_main:
                torch.save(self.optimizer.state_dict(), ckpt_dir / ZERO1_OPTIM)
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save(state, checkpoint_id=str(ckpt_dir / "dcp"))
        if self.ctx.is_main:
            torch.save(self._small_state(), ckpt_dir / "engine_state.pt")

    def load(self, ckpt_dir: Path) -> None:
        """Model and optimizer of any stage's checkpoint: DCP's name-keyed optimizer state (stages 0,
        2, 3) or ZeRO-1's consolidated one, keyed by the parameter's index in the AdamW groups,
        are converted into each other, so a run moves between the launchers without resetting
        its AdamW moments."""
        zero1 = ckpt_dir / ZERO1_OPTIM
        state = {"model": get_model_state_dict(self.model)}
        if zero1.exists():
            pass
        elif self.stage == 1:  # index-keyed from a name-keyed template over the full parameters
            full = torch.optim.AdamW(param_groups(self._inner, self.args.weight_decay),
                                     **adamw_kwargs(self.args, self.ctx.device))
            state["optim"] = get_optimizer_state_dict(self._inner, full)  # allocates the full moments
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
        set_model_state_dict(self.model, state["model"])
        if zero1.exists():
            consolidated = torch.load(zero1, map_location="cpu", weights_only=False)
            if self.stage == 1:
                self.optimizer.load_state_dict(consolidated)
            else:
                names = _group_order(get_optimizer_state_dict(self.model, self.optimizer))
                set_optimizer_state_dict(self.model, self.optimizer, _rekey(consolidated, names),
                                         options=StateDictOptions(full_state_dict=True))
        elif self.stage == 1:
            names = _group_order(state["optim"])
            self.optimizer.load_state_dict(_rekey(state["optim"], {n: i for i, n in enumerate(names)}))
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        if self.stage == 1:
            _steps_on_param_device(self.optimizer.optim)
        small = torch.load(ckpt_dir / "engine_state.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(small["scheduler"])
        reset_peak_lr(self.scheduler, self.args.learning_rate)
        if self.scaler and small["scaler"]:
            self.scaler.load_state_dict(small["scaler"])

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        # full tensors on every rank: DDP copies them, FSDP2 keeps each rank's shard
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_bytes(self) -> int:
        opt = self.optimizer.optim if self.stage == 1 else self.optimizer
        return tensor_state_bytes(opt.state)


ZERO1_OPTIM = "optimizer_zero1.pt"  # ZeRO-1's optimizer state, consolidated on rank 0


def _group_order(optim_state: dict) -> list[str]:
    """The parameter names of a name-keyed optimizer state dict, in the order of its groups: the
    order of ZeRO-1's indices (both optimizers are built from the same `param_groups`)."""
    return [name for group in optim_state["param_groups"] for name in group["params"]]


def _rekey(optim_state: dict, keys) -> dict:
    """An optimizer state dict with every parameter key k replaced by keys[k] (index <-> name)."""
    return {"state": {keys[k]: v for k, v in optim_state["state"].items()},
            "param_groups": [dict(g, params=[keys[k] for k in g["params"]]) for g in optim_state["param_groups"]]}


def _steps_on_param_device(optimizer: torch.optim.Optimizer) -> None:
    """ZeroRedundancyOptimizer.load_state_dict leaves every 0-dim state tensor on the CPU; a fused or
    capturable AdamW keeps its `step` on the parameter's device (where torch's own load puts it)."""
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable"):
            for p in group["params"]:
                if "step" in optimizer.state.get(p, {}):
                    optimizer.state[p]["step"] = optimizer.state[p]["step"].to(p.device, torch.float32)
