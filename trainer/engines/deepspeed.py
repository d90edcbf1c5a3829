"""The DeepSpeed engine: ZeRO stage 0/1/2/3 from the launcher, config from the shared flags.

The DeepSpeed config is generated from the flags (micro-batch, accumulation, clipping,
fp16/bf16, ZeRO stage, CPU offload); `--deepspeed_config` is merged over it, and a value
that contradicts a flag stops the run before training with both values named.

Mapping onto the Engine interface (the loop owns accumulation and the 1/accum scaling):
`accumulate(sync)` sets DeepSpeed's accumulation boundary, `backward` calls
`engine.backward(loss, scale_wrt_gas=False)` (the loop already divided by accum) and
`step()` calls `engine.step()` once, on the boundary. DeepSpeed clips, scales the fp16 loss,
skips overflowing steps and advances our LambdaLR (the torch engine's schedule) itself.

Optimizer: torch.optim.AdamW (fused kernel on CPU and GPU: nothing compiled at run time),
DeepSpeedCPUAdam with `--cpu_offload`; the weight-decay groups of `param_groups`. DeepSpeed's
FusedAdam is not used: it compiles with nvcc on first use, which needs a CUDA toolkit matching
torch's and failed on an H100 whose TORCH_CUDA_ARCH_LIST holds "9.0a" (DeepSpeed 0.19.8 parses
the arch list as integers: `ValueError: invalid literal for int() with base 10: '0a'`).
Checkpoints: DeepSpeed's own (`save_checkpoint(dir, tag="ds")`), resumed with
`load_checkpoint`. Its ZeRO partitions fit one process count: on another count (or from
ZeRO-1 to 2) step-N/ds/ is converted once by DeepSpeed's `ds_to_universal` into
step-N/ds_universal/ (ds/ is only read) and loaded with `load_universal`.
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

from trainer.engines.base import (Engine, StepResult, adamw_kwargs, is_bad_step, param_groups,
                                  reset_peak_lr, schedule_lambda, schedule_steps, tensor_state_bytes)

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
    total = schedule_steps(args)
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
    if sched_type is not None and getattr(args, "lr_schedule", "linear") != "linear":
        problems.append(f"  scheduler section in {args.deepspeed_config}, but --lr_schedule {args.lr_schedule} has "
                        f"no DeepSpeed scheduler; drop the scheduler section to use the flags'")
    elif sched_type is not None and sched_type != "WarmupDecayLR":
        problems.append(f"  scheduler.type = {sched_type!r} in {args.deepspeed_config}: the flags describe linear "
                        f"warm-up and linear decay (WarmupDecayLR); drop the scheduler section to use the flags'")
    if problems:
        raise SystemExit("--deepspeed_config contradicts the command line; change one side of each:\n"
                         + "\n".join(problems))
    return _merge(cfg, user)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def flag_problems(cls, args: Namespace, stage: int) -> list[str]:
        problems = []
        if args.cpu_offload and stage < 1:
            problems.append("--cpu_offload offloads ZeRO-partitioned optimizer state: use train_zero_one.py, "
                            "train_zero_two.py (or --zero3) with --engine deepspeed")
        if args.auto_wrap:
            problems.append("--auto_wrap has no effect with --engine deepspeed (DeepSpeed ZeRO-3 gathers parameters "
                            "per module itself): drop it")
        return problems

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

    # -- setup -------------------------------------------------------------------------
    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        args = self.args
        if args.cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **adamw_kwargs(args))  # takes no `fused`
        return torch.optim.AdamW(groups, **adamw_kwargs(args, self.ctx.device))

    def wrap(self, model: nn.Module) -> nn.Module:
        import deepspeed

        args, ctx = self.args, self.ctx
        self.config = build_config(args, self.stage, ctx.world_size, self._user)
        model.to(ctx.device)
        self._inner = model
        self.compile_blocks(model)
        groups = param_groups(model, args.weight_decay)
        kwargs: dict = {}
        if "optimizer" in self.config:  # the user's optimizer section (checked against the flags)
            kwargs["model_parameters"] = groups
            adam = adamw_kwargs(args)
            self.config["optimizer"].setdefault("params", {}).update(
                adam, betas=list(adam["betas"]), weight_decay=args.weight_decay)
        else:
            kwargs["optimizer"] = self._optimizer(groups)
        if "scheduler" not in self.config:
            sched_opt = kwargs.get("optimizer")
            if sched_opt is not None:
                kwargs["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(sched_opt, schedule_lambda(args))
            else:  # an optimizer DeepSpeed builds: pass a factory
                kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(args))
        else:
            params = self.config["scheduler"].setdefault("params", {})
            params.update(warmup_num_steps=args.warmup_steps, total_num_steps=schedule_steps(args),
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
        skipped = not applied or not self.finite(norm)
        return StepResult(norm, skipped, scale, bad=is_bad_step(True, skipped, scale, bool(self.args.fp16)))

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    # -- state -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / TAG).is_dir():
            raise SystemExit(f"--checkpoint {ckpt_dir}: not a DeepSpeed checkpoint (no {TAG}/); it was written "
                             f"by another engine: resume it with that engine, or start from its exported "
                             f"weights (final/model.safetensors)")
        load_dir = self._resume_dir(ckpt_dir)
        universal = load_dir != ckpt_dir
        # the hyperparameters of each group, from this run's flags: DeepSpeed's ZeRO-3 universal load
        # copies the first saved group's into every group (weight decay onto biases and LayerNorm)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.ds.optimizer.param_groups]
        # DeepSpeed reads this config key only inside load_checkpoint: set it for this load alone
        self.ds._config.load_universal_checkpoint = universal
        try:
            path, _ = self.ds.load_checkpoint(str(load_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise SystemExit(f"--checkpoint {ckpt_dir}: DeepSpeed could not load {load_dir / TAG}")
        if universal:
            for group, own in zip(self.ds.optimizer.param_groups, groups):
                group.update(own)
            # ZeRO-3's universal load gives every partition the same `step` tensor object, which
            # AdamW then advances once per partition: each needs its own
            for state in self._base_optimizer().state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            reset_peak_lr(self.scheduler, self.args.learning_rate)

    def _resume_dir(self, ckpt_dir: Path) -> Path:
        """ckpt_dir itself when its ZeRO partitions fit this run, else its universal conversion."""
        meta = json.loads((ckpt_dir / "meta.json").read_text())
        saved_size, saved_stage = meta.get("world_size", self.ctx.world_size), meta.get("stage", self.stage)
        if saved_stage == self.stage and (saved_size == self.ctx.world_size or self.stage == 0):
            return ckpt_dir  # the same partitions (stage 0 keeps the whole optimizer state in one file)
        if 0 in (saved_stage, self.stage) or (saved_stage == 3) != (self.stage == 3):
            # stage 0 has no ZeRO partitions to convert; the universal loaders of stages 1-2 and of 3 read
            # differently laid out optimizer_state.pt files (DeepSpeed 0.19.8: KeyError 'optimizer_state_dict')
            raise SystemExit(
                f"--checkpoint {ckpt_dir}: DeepSpeed checkpoint of ZeRO stage {saved_stage} ({saved_size} "
                f"processes), resumed with stage {self.stage} ({self.ctx.world_size} processes); DeepSpeed's "
                f"universal checkpoint converts to any process count within stages 1-2 or within stage 3, not "
                f"across. Resume with the launcher that wrote it ({_LAUNCHER[saved_stage]}, any process count), "
                f"or start from its exported weights (final/model.safetensors)")
        self.ctx.log(f"[deepspeed] {ckpt_dir} holds ZeRO-{saved_stage} partitions of {saved_size} processes; "
                     f"this run is ZeRO-{self.stage} on {self.ctx.world_size}: loading its universal checkpoint")
        return universal_checkpoint(ckpt_dir, self.ctx.is_main, self.ctx.log)

    def weight_shapes(self) -> dict[str, torch.Size]:
        # ZeRO-3 parameters are empty outside a GatheredParameters block; ds_shape is the full shape
        shapes = {name: getattr(p, "ds_shape", p.shape)
                  for name, p in self._inner.named_parameters(remove_duplicate=False)}
        return shapes | {name: b.shape for name, b in self._inner.named_buffers()}

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        import deepspeed

        for name, p in self._inner.named_parameters(remove_duplicate=False):
            if name in weights:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                    with torch.no_grad():
                        p.data.copy_(weights[name].to(p.dtype))
        for name, b in self._inner.named_buffers():
            if name in weights:
                b.data.copy_(weights[name].to(b.dtype))
        opt = self.ds.optimizer
        if hasattr(opt, "refresh_fp32_params"):  # the fp32 master copy of mixed-precision ZeRO
            opt.refresh_fp32_params()

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

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside DeepSpeed's ZeRO / fp16 wrappers."""
        base = self.ds.optimizer
        while not isinstance(base, torch.optim.Optimizer) or isinstance(getattr(base, "optimizer", None),
                                                                         torch.optim.Optimizer):
            base = base.optimizer
        return base

    def optimizer_state_bytes(self) -> int:
        return tensor_state_bytes(self._base_optimizer().state)


_LAUNCHER = {0: "train.py", 1: "train_zero_one.py", 2: "train_zero_two.py", 3: "train_zero_two.py --zero3"}
UNIVERSAL = "ds_universal"
_SOURCE = "source.json"


def _fingerprint(ds_dir: Path) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of every file of a DeepSpeed checkpoint: what a conversion was made from."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(ds_dir.iterdir()) if p.is_file()}


def universal_checkpoint(ckpt_dir: Path, is_main: bool, log=print) -> Path:
    """step-N/ds_universal/: DeepSpeed's universal checkpoint of step-N/ds/, converted once by
    `deepspeed.checkpoint.ds_to_universal` and kept beside it (step-N/ds/ is only read); remade
    when ds/ changed since. Collective: rank 0 converts, every rank returns the folder or exits."""
    from trainer import dist

    out = ckpt_dir / UNIVERSAL
    error = None
    if is_main:
        try:
            _convert(ckpt_dir, out, log)
        except SystemExit as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise SystemExit(error)
    return out


def _convert(ckpt_dir: Path, out: Path, log) -> None:
    import io
    import shutil
    import socket
    import time

    from data.corpus import pid_alive

    source = _fingerprint(ckpt_dir / TAG)
    if (out / _SOURCE).is_file() and json.loads((out / _SOURCE).read_text()) == source:
        log(f"[deepspeed] using {out}, converted before")
        return
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    host = socket.gethostname()
    for stale in ckpt_dir.glob(f".{UNIVERSAL}.*-{host}-*"):  # left by conversions killed on this host
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_dir / f".{UNIVERSAL}.tmp-{host}-{os.getpid()}"
    old = ckpt_dir / f".{UNIVERSAL}.old-{host}-{os.getpid()}"
    start = time.perf_counter()
    chatter = io.StringIO()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # one worker: a process pool would fork this process, process group included
        job = Namespace(input_folder=str(ckpt_dir / TAG), output_folder=str(tmp / TAG), num_extract_workers=1,
                        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(job)
        (tmp / _SOURCE).write_text(json.dumps(source))
        if out.exists():  # converted from an earlier ds/ of this step
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"--checkpoint {ckpt_dir}: cannot write its universal checkpoint beside it ({e}); "
                         f"copy {ckpt_dir} to a writable place and resume from the copy") from None
    except Exception as e:  # noqa: BLE001 - the converter raises anything from AssertionError to KeyError
        shutil.rmtree(tmp, ignore_errors=True)
        said = " | ".join(chatter.getvalue().strip().splitlines()[-3:])
        raise SystemExit(f"--checkpoint {ckpt_dir}: deepspeed.checkpoint.ds_to_universal could not convert "
                         f"{ckpt_dir / TAG} ({type(e).__name__}: {e}; it said: {said}). Resume with the process "
                         f"count and launcher that wrote it (see its meta.json)") from None
    log(f"[deepspeed] converted {ckpt_dir / TAG} to the universal checkpoint {out} "
        f"in {time.perf_counter() - start:.1f} s")
