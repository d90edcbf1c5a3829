"""The fairscale engine (the original pipeline's backend).

Stage 0: plain DDP (the torch engine's stage 0). Stage 1: DDP + fairscale `OSS` (AdamW state
sharded, parameters partitioned whole, greedily by size). Stage 2: `ShardedDataParallel` +
OSS (gradients reduced to the rank that owns the parameter, freed on the others). Stage 3:
fairscale `FullyShardedDataParallel`, one unit per `model.encoder.blocks()` layer with
`--auto_wrap`; it needs CUDA (measured on CPU: `KeyError: 'all_gather'` from its CUDA
streams in `_rebuild_full_params`), so without CUDA, or when its first forward, backward or
optimizer step fails on this torch release, the run stops with an error naming `--engine torch` /
`--engine deepspeed`.

Measured on torch 2.13: ShardedDDP's default gradient buckets break with
`zero_grad(set_to_none=True)` (the new gradient tensors no longer alias the buckets, so the
second step reduces stale values); this engine disables bucketing (`reduce_buffer_size=0`),
which also keeps ZeRO-2's point: gradients of parameters another rank owns are freed.

Checkpoints (stages 1-3): `fairscale/model.pt` (full weights), `fairscale/optimizer.pt` (OSS
state consolidated on rank 0, re-partitioned on load, so any process count resumes),
`fairscale/engine_state.pt` (scheduler, scaler). Stage 0 writes the torch engine's layout.
"""
from __future__ import annotations

import contextlib
import functools
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn as nn

from trainer import checkpoint, dist
from trainer.engines.base import Engine, StepResult, adamw_kwargs, param_groups, reset_peak_lr, tensor_state_bytes
from trainer.engines.torch import TorchEngine, ddp

SUB = "fairscale"
ALTERNATIVES = ("use `--engine torch` (train_zero_two.py --zero3: PyTorch FSDP2) or `--engine deepspeed` "
                "(train_zero_two.py --zero3: DeepSpeed ZeRO-3), which run on CPU and GPU")


def _import_fairscale():
    try:
        import fairscale  # noqa: F401
        from fairscale.optim.oss import OSS  # noqa: F401
    except Exception as e:  # ImportError, or an API fairscale expects from an older torch
        raise SystemExit(f"--engine fairscale: cannot import fairscale on torch {torch.__version__} "
                         f"({type(e).__name__}: {e}); `pip install fairscale`, or use --engine torch / "
                         f"--engine deepspeed") from None


class _FirstStepGuard(nn.Module):
    """Runs fairscale FSDP's forward through the engine's `_first`, so a failure of the first
    forward names the alternatives as one of the first backward or optimizer step does."""

    def __init__(self, inner: nn.Module, first):
        super().__init__()
        self.inner = inner
        self.first = first

    def forward(self, *args, **kwargs):
        return self.first("forward", lambda: self.inner(*args, **kwargs))


def _grad_only_through_loss(module: nn.Module, args, out):
    """Forward hook inside fairscale FSDP: every output but "loss" detached. FSDP hooks each output
    that requires grad to gather the full parameters before backward, and frees each parameter's
    full copy once its gradient is ready; the hook of another output fired after the MLM head's
    parameters had been freed (`assert self.has_full_params`, traced on an H100, torch 2.11; with
    this hook the backward went through). The loop backpropagates "loss" only; the others are read
    as numbers."""
    if isinstance(out, dict) and "loss" in out:
        return {k: v.detach() if k != "loss" and isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


class FairscaleEngine(TorchEngine):
    name = "fairscale"

    @classmethod
    def flag_problems(cls, args: Namespace, stage: int) -> list[str]:
        problems = Engine.flag_problems(args, stage)  # not the torch engine's: its stage 2 is FSDP2
        if args.auto_wrap and stage < 3:
            problems.append("--auto_wrap wraps layers into fairscale FSDP units, which --engine fairscale uses only "
                            "in ZeRO-3: add --zero3 (train_zero_two.py), or use --engine torch (train_zero_two.py)")
        if args.compile and stage == 3:
            problems.append("--compile is not supported with fairscale's FullyShardedDataParallel (--engine fairscale "
                            "--zero3): it swaps parameter storage around every forward, outside what torch.compile "
                            "guards; use --engine torch (FSDP2) or --engine deepspeed for ZeRO-3 with --compile")
        return problems

    def __init__(self, args: Namespace, ctx, stage: int):
        super().__init__(args, ctx, stage)
        _import_fairscale()
        self._checked: set[str] = set()
        if stage == 3 and ctx.device.type != "cuda":
            raise SystemExit(
                "--engine fairscale ZeRO-3 (train_zero_two.py --zero3) needs CUDA: fairscale's "
                "FullyShardedDataParallel gathers parameters on CUDA streams (on CPU it fails with "
                f"KeyError: 'all_gather' in _rebuild_full_params); {ALTERNATIVES}")

    # -- setup -------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        if self.stage == 0:
            return super().wrap(model)
        from fairscale.optim.oss import OSS

        args, ctx = self.args, self.ctx
        model.to(ctx.device)
        self._inner = model
        self.compile_blocks(model)
        if self.stage == 3:
            self.model = self._wrap_fsdp(model)
            # unflattened shards: param_groups judges each by its original shape
            optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay),
                                          **adamw_kwargs(args, ctx.device))
        else:
            optimizer = OSS(param_groups(model, args.weight_decay), optim=torch.optim.AdamW,
                            **adamw_kwargs(args, ctx.device))
            if self.stage == 1:
                self.model = ddp(model, ctx)
            else:
                from fairscale.nn.data_parallel import ShardedDataParallel
                self.model = ShardedDataParallel(model, optimizer, reduce_buffer_size=0)
        # stages 2-3: gradients live on their owner only
        self._schedule(optimizer, sharded_grads=self.stage >= 2)
        return self.model

    def _wrap_fsdp(self, model: nn.Module) -> nn.Module:
        from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

        mixed = self.args.fp16 or self.args.bf16
        # unflattened: each shard keeps its parameter's original shape (_orig_size) for the decay groups
        fsdp = functools.partial(FSDP, mixed_precision=bool(mixed), flatten_parameters=False,
                                 reshard_after_forward=True,
                                 compute_dtype=torch.bfloat16 if self.args.bf16 else None)  # None: fp16
        if self.args.auto_wrap:
            blocks = list(model.encoder.blocks())
            wrapped = {id(b): fsdp(b) for b in blocks}
            # replace every reference (a shared ALBERT layer is referenced from several slots)
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if id(child) in wrapped and parent is not wrapped[id(child)]:
                        setattr(parent, name, wrapped[id(child)])
        model.register_forward_hook(_grad_only_through_loss)
        return _FirstStepGuard(fsdp(model), self._first)

    # -- one step ----------------------------------------------------------------------
    def autocast(self):
        if self.stage == 3:  # fairscale FSDP's mixed_precision casts parameters itself
            return contextlib.nullcontext()
        return super().autocast()

    def accumulate(self, sync: bool):
        if self.stage == 0:
            return super().accumulate(sync)
        if sync or self.ctx.world_size == 1:
            return contextlib.nullcontext()
        inner = self.model.inner if self.stage == 3 else self.model
        return inner.no_sync()

    def _first(self, what: str, fn):
        """fn(); in ZeRO-3 a failure of fairscale FSDP's first `what` names the alternatives."""
        if self.stage != 3 or what in self._checked:
            return fn()
        try:
            result = fn()
        except Exception as e:
            raise SystemExit(f"--engine fairscale ZeRO-3: fairscale FSDP failed in its first {what} on torch "
                             f"{torch.__version__} ({type(e).__name__}: {e}); {ALTERNATIVES}") from e
        self._checked.add(what)
        return result

    def backward(self, loss: torch.Tensor) -> None:
        self._first("backward", lambda: TorchEngine.backward(self, loss))

    def step(self) -> StepResult:
        return self._first("optimizer step", self._step)

    def _step(self) -> StepResult:
        if self.stage == 0:
            return super().step()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        if self.stage == 3:
            norm = float(self.model.inner.clip_grad_norm_(max_norm))
        else:
            norm = float(self.optimizer.clip_grad_norm(max_norm))  # all-reduced over the shards
        return self._apply_update(norm)

    # -- state -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        if self.stage == 0:
            return super().save(ckpt_dir)
        out = ckpt_dir / SUB
        if self.ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        weights = self.full_state_dict()
        if self.stage == 3:
            optim = self.model.inner.gather_full_optim_state_dict(self.optimizer)
        else:
            self.optimizer.consolidate_state_dict(recipient_rank=0)
            optim = self.optimizer.state_dict() if self.ctx.is_main else None
        if self.ctx.is_main:
            torch.save(weights, out / "model.pt")
            torch.save(optim, out / "optimizer.pt")
            torch.save(self._small_state(), out / "engine_state.pt")
        dist.barrier()

    def load(self, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        if self.stage == 0 and (ckpt_dir / "dcp").is_dir():
            return super().load(ckpt_dir)
        if not (ckpt_dir / SUB).is_dir():
            raise SystemExit(f"--checkpoint {ckpt_dir}: written by another engine or stage (no {SUB}/); resume it "
                             f"with the engine and launcher that wrote it (see its meta.json), or start from its "
                             f"exported weights (final/model.safetensors)")
        own = self.weight_shapes()
        matched = checkpoint.matching_weights(checkpoint.read_step_weights(ckpt_dir), own, ckpt_dir)
        if set(matched) != set(own):
            raise SystemExit(f"checkpoint weights do not match the model: missing {sorted(set(own) - set(matched))[:5]}")
        self._set_weights(matched)
        optim = torch.load(ckpt_dir / SUB / "optimizer.pt", map_location="cpu", weights_only=False)
        if self.stage == 3:
            optim = self.model.inner.get_shard_from_optim_state_dict(optim)
        self.optimizer.load_state_dict(optim)
        small = torch.load(ckpt_dir / SUB / "engine_state.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(small["scheduler"])
        reset_peak_lr(self.scheduler, self.args.learning_rate)
        if self.scaler and small["scaler"]:
            self.scaler.load_state_dict(small["scaler"])

    def weight_shapes(self) -> dict[str, torch.Size]:
        if self.stage == 3:  # the shards' full shapes: gathered (collective)
            return {k: v.shape for k, v in self.full_state_dict_all().items()}
        return super().weight_shapes()

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.stage == 0:
            return super()._set_weights(weights)
        if self.stage == 3:  # fairscale FSDP loads a complete full state dict and keeps its shards
            self.model.inner.load_state_dict(self.full_state_dict_all() | weights)
        else:  # stages 1-2: every rank holds the full weights
            self._inner.load_state_dict(weights, strict=False)

    def full_state_dict_all(self) -> dict[str, torch.Tensor]:
        # fairscale FSDP's state_dict() gathers the full parameters (collective)
        return {k: v.detach().cpu().clone() for k, v in self.model.inner.state_dict().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 0:
            return super().full_state_dict()
        if self.stage == 3:
            return self.full_state_dict_all()
        # stages 1-2: every rank holds the full, identical weights
        return {k: v.detach().cpu() for k, v in self._inner.state_dict().items()}

    def optimizer_state_bytes(self) -> int:
        if self.stage in (1, 2):
            return tensor_state_bytes(self.optimizer.optim.state)
        return tensor_state_bytes(self.optimizer.state)
