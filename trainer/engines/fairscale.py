"""The fairscale engine (the original pipeline's backend).

Stage 0: plain DDP (the torch engine's stage 0). Stage 1: DDP + fairscale `OSS` (AdamW state
sharded, parameters partitioned whole, greedily by size). Stage 2: `ShardedDataParallel` +
OSS (gradients reduced to the rank that owns the parameter, freed on the others). Stage 3:
fairscale `FullyShardedDataParallel`, one unit per `model.encoder.blocks()` layer with
`--auto_wrap`; it needs CUDA (measured on CPU: `KeyError: 'all_gather'` from its CUDA
streams in `_rebuild_full_params`), so without CUDA, or when its first step fails on this
torch release, the run stops with an error naming `--engine torch` / `--engine deepspeed`.

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
from torch.nn.parallel import DistributedDataParallel

from trainer import dist
from trainer.engines.base import StepResult, lr_lambda, param_groups, reset_peak_lr, tensor_state_bytes
from trainer.engines.torch import TorchEngine

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


def _fsdp_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """`param_groups` for FSDP shards: decide by the parameter's original shape, not the shard's."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "_orig_size", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _FirstStepGuard(nn.Module):
    """Turns a failure of fairscale FSDP's first forward into an error naming the alternatives."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.checked = False

    def forward(self, *args, **kwargs):
        if self.checked:
            return self.inner(*args, **kwargs)
        try:
            out = self.inner(*args, **kwargs)
        except Exception as e:
            raise SystemExit(f"--engine fairscale ZeRO-3: fairscale FSDP failed in its first forward on torch "
                             f"{torch.__version__} ({type(e).__name__}: {e}); {ALTERNATIVES}") from e
        self.checked = True
        return out


class FairscaleEngine(TorchEngine):
    name = "fairscale"

    def __init__(self, args: Namespace, ctx, stage: int):
        super().__init__(args, ctx, stage)
        _import_fairscale()
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
        adam = dict(lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_epsilon)
        if self.stage == 3:
            self.model = self._wrap_fsdp(model)
            self.optimizer = torch.optim.AdamW(_fsdp_param_groups(self.model, args.weight_decay), **adam)
        else:
            self.optimizer = OSS(param_groups(model, args.weight_decay), optim=torch.optim.AdamW, **adam)
            if self.stage == 1:
                self.model = DistributedDataParallel(
                    model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=getattr(getattr(model, "config", None), "n_experts", 1) > 1)
            else:
                from fairscale.nn.data_parallel import ShardedDataParallel
                self.model = ShardedDataParallel(model, self.optimizer, reduce_buffer_size=0)
        total = args.scheduler_num_steps or args.num_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(args.warmup_steps, total))
        self.scaler = None
        if args.fp16:
            if self.stage == 1:
                self.scaler = torch.amp.GradScaler(ctx.device.type)
            else:  # gradients live on their owner only: agree on inf/nan across ranks
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler(device=ctx.device.type)
        return self.model

    def _wrap_fsdp(self, model: nn.Module) -> nn.Module:
        from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

        mixed = self.args.fp16 or self.args.bf16
        # unflattened: each shard keeps its parameter's original shape (_orig_size) for the decay groups
        fsdp = functools.partial(FSDP, mixed_precision=bool(mixed), flatten_parameters=False,
                                 reshard_after_forward=True)
        if self.args.auto_wrap:
            blocks = list(model.encoder.blocks())
            wrapped = {id(b): fsdp(b) for b in blocks}
            # replace every reference (a shared ALBERT layer is referenced from several slots)
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if id(child) in wrapped and parent is not wrapped[id(child)]:
                        setattr(parent, name, wrapped[id(child)])
        return _FirstStepGuard(fsdp(model))

    @property
    def module(self) -> nn.Module:
        return self._inner

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

    def step(self) -> StepResult:
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

    def load(self, ckpt_dir: Path, weights_only: bool = False) -> None:
        ckpt_dir = Path(ckpt_dir)
        if self.stage == 0 and (ckpt_dir / "dcp").is_dir():
            return super().load(ckpt_dir, weights_only)
        if weights_only:
            from trainer.engines.deepspeed import read_full_weights
            self._load_weights(read_full_weights(ckpt_dir), strict=False)
            return
        if not (ckpt_dir / SUB).is_dir():
            raise SystemExit(f"--checkpoint {ckpt_dir}: written by another engine or stage (no {SUB}/); resume it "
                             f"with the engine and launcher that wrote it (see its meta.json), or start from its "
                             f"exported weights (final/model.safetensors)")
        self._load_weights(torch.load(ckpt_dir / SUB / "model.pt", map_location="cpu", weights_only=False),
                           strict=True)
        optim = torch.load(ckpt_dir / SUB / "optimizer.pt", map_location="cpu", weights_only=False)
        if self.stage == 3:
            optim = self.model.inner.get_shard_from_optim_state_dict(optim)
        self.optimizer.load_state_dict(optim)
        small = torch.load(ckpt_dir / SUB / "engine_state.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(small["scheduler"])
        reset_peak_lr(self.scheduler, self.args.learning_rate)
        if self.scaler and small["scaler"]:
            self.scaler.load_state_dict(small["scaler"])

    def _load_weights(self, weights: dict[str, torch.Tensor], strict: bool) -> None:
        own = self._inner.state_dict() if self.stage < 3 else self.full_state_dict_all()
        matched = {k: v for k, v in weights.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
        if strict and set(matched) != set(own):
            raise SystemExit(f"checkpoint weights do not match the model: missing {sorted(set(own) - set(matched))[:5]}")
        if self.stage == 3:
            self.model.inner.load_state_dict(own | matched)
        else:
            self._inner.load_state_dict(matched, strict=False)

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
