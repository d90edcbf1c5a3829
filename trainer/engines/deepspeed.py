"""The DeepSpeed engine: ZeRO stage 0/1/2/3 from the launcher, config from the shared flags.

The DeepSpeed config is generated from the flags (micro-batch, accumulation, clipping,
fp16/bf16, ZeRO stage, CPU offload); `--deepspeed_config` is merged over it, and a value
that contradicts a flag stops the run before training with both values named.

Mapping onto the Engine interface (the loop owns accumulation and the 1/accum scaling):
`accumulate(sync)` sets DeepSpeed's accumulation boundary, `backward` calls
`engine.backward(loss, scale_wrt_gas=False)` (the loop already divided by accum) and
`step()` calls `engine.step()` once, on the boundary. DeepSpeed clips, scales the fp16 loss,
skips overflowing steps and advances our LambdaLR (the torch engine's schedule) itself.

Optimizer: torch.optim.AdamW on the CPU (no compiled op), DeepSpeed's FusedAdam on the GPU,
DeepSpeedCPUAdam with `--cpu_offload`; the weight-decay groups of `param_groups`.
Checkpoints: DeepSpeed's own (`save_checkpoint(dir, tag="ds")`), resumed with
`load_checkpoint`; they are tied to the process count (ZeRO partitions).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn as nn

from trainer.engines.base import Engine, StepResult, lr_lambda, param_groups, reset_peak_lr, tensor_state_bytes

TAG = "ds"
AUTO = "auto"


def _get(d: dict, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _set(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def flag_values(args: Namespace, stage: int, world_size: int) -> list[tuple[str, object, str]]:
    """(config path, value the flags imply, the flag to change) for every key the flags decide."""
    accum = args.gradient_accumulation_steps
    total = args.scheduler_num_steps or args.num_steps
    return [
        ("train_micro_batch_size_per_gpu", args.train_batch_size, "--train_batch_size"),
        ("gradient_accumulation_steps", accum, "--gradient_accumulation_steps"),
        ("train_batch_size", args.train_batch_size * accum * world_size,
         "--train_batch_size x --gradient_accumulation_steps x processes"),
        ("gradient_clipping", args.max_grad_norm, "--max_grad_norm"),
        ("zero_optimization.stage", stage,
         "the launcher (train.py = 0, train_zero_one.py = 1, train_zero_two.py = 2, train_zero_two.py --zero3 = 3)"),
        ("fp16.enabled", bool(args.fp16), "--fp16"),
        ("bf16.enabled", bool(args.bf16), "--bf16"),
        ("optimizer.params.lr", args.learning_rate, "--learning_rate"),
        ("optimizer.params.betas", list(args.adam_betas), "--adam_betas"),
        ("optimizer.params.eps", args.adam_epsilon, "--adam_epsilon"),
        ("optimizer.params.weight_decay", args.weight_decay, "--weight_decay"),
        ("scheduler.params.warmup_num_steps", args.warmup_steps, "--warmup_steps"),
        ("scheduler.params.total_num_steps", total, "--scheduler_num_steps / --num_steps"),
        ("scheduler.params.warmup_max_lr", args.learning_rate, "--learning_rate"),
    ]


def build_config(args: Namespace, stage: int, world_size: int, user: dict | None = None) -> dict:
    """The DeepSpeed config the flags imply, with `user` merged over it.

    "auto" values in `user` take the flag's value; a value that contradicts a flag raises
    SystemExit naming both values and what to change.
    """
    cfg: dict = {
        "train_micro_batch_size_per_gpu": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": bool(args.fp16), "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": bool(args.bf16)},
    }
    if stage >= 1:
        cfg["zero_optimization"].update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if args.cpu_offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if not user:
        return cfg

    user = copy.deepcopy(user)
    problems = []
    for path, value, flag in flag_values(args, stage, world_size):
        given = _get(user, path)
        if given is None:
            continue
        if given == AUTO:
            _set(user, path, value)
        elif not _same(given, value):
            problems.append(f"  {path} = {given!r} in {args.deepspeed_config}, but {flag} gives {value!r}")
    offload = _get(user, "zero_optimization.offload_optimizer.device")
    if offload not in (None, "none", AUTO) and not args.cpu_offload:
        problems.append(f"  zero_optimization.offload_optimizer.device = {offload!r} in {args.deepspeed_config}, "
                        f"but --cpu_offload is not given")
    if offload in ("none",) and args.cpu_offload:
        problems.append(f"  zero_optimization.offload_optimizer.device = 'none' in {args.deepspeed_config}, "
                        f"but --cpu_offload is given")
    if _get(user, "zero_optimization.offload_param.device") not in (None, "none") and stage != 3:
        problems.append(f"  zero_optimization.offload_param needs ZeRO-3 (train_zero_two.py --zero3), "
                        f"this launcher runs stage {stage}")
    opt_type = _get(user, "optimizer.type")
    if opt_type is not None and str(opt_type).lower() not in ("adam", "adamw"):
        problems.append(f"  optimizer.type = {opt_type!r} in {args.deepspeed_config}: this trainer's flags describe "
                        f"AdamW (--learning_rate, --adam_betas, --adam_epsilon, --weight_decay); use AdamW or drop it")
    sched_type = _get(user, "scheduler.type")
    if sched_type is not None and sched_type != "WarmupDecayLR":
        problems.append(f"  scheduler.type = {sched_type!r} in {args.deepspeed_config}: the flags describe linear "
                        f"warm-up and linear decay (WarmupDecayLR); drop the scheduler section to use the flags'")
    if problems:
        raise SystemExit("--deepspeed_config contradicts the command line; change one side of each:\n"
                         + "\n".join(problems))
    return _merge(cfg, user)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, args: Namespace, ctx, stage: int):
        super().__init__(args, ctx, stage)
        if ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"--engine deepspeed: cannot import deepspeed ({e}); `pip install deepspeed` "
                             f"or use --engine torch") from None
        if args.fp16 and ctx.device.type == "cpu":
            from deepspeed.accelerator import get_accelerator
            if not get_accelerator().is_fp16_supported():
                raise SystemExit("--engine deepspeed --fp16: DeepSpeed's fp16 is not supported on this CPU (it needs "
                                 "AVX512-FP16 or a GPU); use --bf16 on the CPU, or --engine torch --fp16 (PyTorch AMP)")
        user = None
        if args.deepspeed_config:
            with open(args.deepspeed_config) as f:
                try:
                    user = json.load(f)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"--deepspeed_config {args.deepspeed_config}: not valid JSON ({e})") from None
        self._user = user
        if args.cpu_offload and stage < 1:
            raise SystemExit("--cpu_offload offloads ZeRO-partitioned optimizer state: use train_zero_one.py, "
                             "train_zero_two.py (or --zero3) with --engine deepspeed")
        if args.auto_wrap and ctx.is_main:
            print("[deepspeed] --auto_wrap has no effect: DeepSpeed ZeRO-3 gathers parameters per module itself",
                  flush=True)

    # -- setup -------------------------------------------------------------------------
    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        args = self.args
        adam = dict(lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_epsilon)
        if args.cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
        if self.ctx.device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **adam)
        return torch.optim.AdamW(groups, **adam)

    def wrap(self, model: nn.Module) -> nn.Module:
        import deepspeed

        args, ctx = self.args, self.ctx
        self.config = build_config(args, self.stage, ctx.world_size, self._user)
        model.to(ctx.device)
        self._inner = model
        groups = param_groups(model, args.weight_decay)
        total = args.scheduler_num_steps or args.num_steps
        kwargs: dict = {}
        if "optimizer" in self.config:  # the user's optimizer section (checked against the flags)
            kwargs["model_parameters"] = groups
            self.config["optimizer"].setdefault("params", {}).update(
                lr=args.learning_rate, betas=list(args.adam_betas), eps=args.adam_epsilon,
                weight_decay=args.weight_decay)
        else:
            kwargs["optimizer"] = self._optimizer(groups)
        if "scheduler" not in self.config:
            sched_opt = kwargs.get("optimizer")
            if sched_opt is not None:
                kwargs["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                    sched_opt, lr_lambda(args.warmup_steps, total))
            else:  # an optimizer DeepSpeed builds: pass a factory
                kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, lr_lambda(args.warmup_steps, total))
        else:
            params = self.config["scheduler"].setdefault("params", {})
            params.update(warmup_num_steps=args.warmup_steps, total_num_steps=total,
                          warmup_max_lr=args.learning_rate, warmup_min_lr=params.get("warmup_min_lr", 0),
                          warmup_type=params.get("warmup_type", "linear"))
        if ctx.is_main:
            print("[deepspeed] config " + json.dumps(self.config, sort_keys=True), flush=True)
        try:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, config=self.config, dist_init_required=False, **kwargs)
        except (AssertionError, ValueError) as e:
            raise SystemExit(f"--engine deepspeed: DeepSpeed rejected the configuration: {e}") from None
        self.model = self.ds
        return self.ds

    @property
    def module(self) -> nn.Module:
        return self._inner

    # -- one step ----------------------------------------------------------------------
    def autocast(self):
        # DeepSpeed's fp16/bf16 modes cast the model itself (fp32 master weights in the optimizer)
        return contextlib.nullcontext()

    def accumulate(self, sync: bool):
        self.ds.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        own_norm = None
        if self.stage == 0 and not (self.args.fp16 or self.args.bf16):
            # plain-fp32 DeepSpeed clips without reporting the norm; the gradients are all-reduced here
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        applied = self.ds.was_step_applied()
        norm = self.ds.get_global_grad_norm()
        norm = own_norm if norm is None else float(norm)
        norm = float("nan") if norm is None else norm
        if norm < 0:  # DeepSpeed reports -1 for an overflow
            norm = float("inf")
        scale = 1.0
        if self.args.fp16:
            scale = float(self.ds._get_optimizer_loss_scale() or 1.0)
        return StepResult(norm, not applied or not self.finite(norm), scale)

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    # -- state -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False)

    def load(self, ckpt_dir: Path, weights_only: bool = False) -> None:
        ckpt_dir = Path(ckpt_dir)
        if not weights_only:
            if not (ckpt_dir / TAG).is_dir():
                raise SystemExit(f"--checkpoint {ckpt_dir}: not a DeepSpeed checkpoint (no {TAG}/); it was written "
                                 f"by another engine: resume it with that engine, or start from its exported "
                                 f"weights (final/model.safetensors)")
            self._check_world_size(ckpt_dir)
            path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
            if path is None:
                raise SystemExit(f"--checkpoint {ckpt_dir}: DeepSpeed could not load {ckpt_dir / TAG}")
            if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
                reset_peak_lr(self.scheduler, self.args.learning_rate)
            return
        self.load_weights(read_full_weights(ckpt_dir))

    def _check_world_size(self, ckpt_dir: Path) -> None:
        meta = ckpt_dir / "meta.json"
        if self.stage >= 1 and meta.is_file():
            saved = json.loads(meta.read_text()).get("world_size")
            if saved and saved != self.ctx.world_size:
                raise SystemExit(
                    f"--checkpoint {ckpt_dir}: DeepSpeed ZeRO-{self.stage} checkpoint written by {saved} processes, "
                    f"resumed by {self.ctx.world_size}; DeepSpeed's ZeRO partitions need the same count (or convert "
                    f"it with deepspeed.checkpoint.ds_to_universal). Run with {saved} processes")

    def load_weights(self, weights: dict[str, torch.Tensor]) -> int:
        """Copy the weights whose name and shape match into the model (collective); returns how many."""
        import deepspeed

        named = dict(self._inner.named_parameters(remove_duplicate=False))
        buffers = dict(self._inner.named_buffers())
        count = 0
        for name, p in named.items():
            w = weights.get(name)
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if w is None or tuple(w.shape) != shape:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                with torch.no_grad():
                    p.data.copy_(w.to(p.dtype))
            count += 1
        for name, b in buffers.items():
            w = weights.get(name)
            if w is not None and w.shape == b.shape:
                b.data.copy_(w.to(b.dtype))
        opt = self.ds.optimizer
        if hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()
        return count

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        model = self._inner
        keys = set(model.state_dict(keep_vars=True).keys())
        out: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}
        mixed = self.args.fp16 or self.args.bf16
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                full = safe_get_full_fp32_param(p) if mixed and p.requires_grad else None
                if full is None:
                    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                        full = p.detach().clone()
                seen[id(p)] = full.float().cpu()
            if name in keys:
                out[name] = seen[id(p)]
        for name, b in model.named_buffers():
            if name in keys:
                out[name] = b.detach().cpu()
        return out if self.ctx.is_main else {}

    def optimizer_state_bytes(self) -> int:
        base = self.ds.optimizer
        while not isinstance(base, torch.optim.Optimizer) or isinstance(getattr(base, "optimizer", None),
                                                                         torch.optim.Optimizer):
            base = base.optimizer
        return tensor_state_bytes(base.state)


def read_full_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 model weights from a checkpoint of any engine (every rank reads them)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / TAG).is_dir():
        zero_files = list((ckpt_dir / TAG).glob("*zero_pp_rank_*_optim_states.pt"))
        if zero_files:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
        states = torch.load(ckpt_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if (ckpt_dir / "dcp").is_dir():  # the torch engine's distributed checkpoint
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        state = _load_state_dict_from_keys(checkpoint_id=str(ckpt_dir / "dcp"))
        return dict(state.get("model", {}))
    if (ckpt_dir / "fairscale").is_dir():
        return torch.load(ckpt_dir / "fairscale" / "model.pt", map_location="cpu", weights_only=False)
    raise SystemExit(f"--checkpoint {ckpt_dir}: no model weights found (no {TAG}/, dcp/ or fairscale/)")
