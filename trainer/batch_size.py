"""`--train_batch_size 0`: find the largest micro-batch that fits (ZeRO launchers).

Activation memory is measured, not guessed: one forward at batch 1 and 2 with
`saved_tensors_hooks` counts the bytes autograd keeps for backward (parameters excluded),
which gives bytes per sample. Model, gradient and AdamW state per process follow from the
parameter count and the ZeRO stage. The largest batch whose total fits the budget is taken;
on a GPU it is then tried for real (forward + backward) and halved on out-of-memory.
All processes agree on the smallest result.
"""
from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Callable

import torch
import torch.nn as nn

from trainer import dist


def activation_bytes(model: nn.Module, batch: dict, autocast) -> int:
    """Bytes of tensors saved for backward by one forward pass (distinct storages, no parameters)."""
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(**batch)
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def state_bytes(num_params: int, stage: int, world: int, fp16: bool) -> int:
    """Parameters + gradients + AdamW moments held per process (fp32 master weights)."""
    p = 4 * num_params
    shard = lambda x: x / world  # noqa: E731
    params = shard(p) if stage == 3 else p
    grads = shard(p) if stage >= 2 else 2 * p  # DDP keeps a bucket copy of the gradients
    adam = 2 * p if stage == 0 else shard(2 * p)
    return int(params + grads + adam)


def default_budget_mb(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9 / 2**20)
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().total * 0.8 / local / 2**20)


def find_batch_size(args: Namespace, model: nn.Module, make_batch: Callable[[int], dict], device: torch.device,
                    autocast, limit: int = 4096, log=print) -> int:
    """The largest micro-batch that fits the memory budget; prints how it was decided."""
    budget = (args.max_memory_mb or default_budget_mb(device)) * 2**20
    model.to(device)
    a1 = activation_bytes(model, make_batch(1), autocast)
    a2 = activation_bytes(model, make_batch(2), autocast)
    per_sample = max(1, a2 - a1)
    fixed_act = max(0, a1 - per_sample)
    num_params = sum(p.numel() for p in model.parameters())
    static = state_bytes(num_params, args.stage, dist.world_size(), args.fp16)
    baseline = torch.cuda.memory_allocated(device) - 4 * num_params if device.type == "cuda" else 0
    free = budget - static - fixed_act - max(0, baseline)
    fits = int(max(0, free) // (per_sample * 1.2))  # 20% headroom for transients
    batch = min(limit, fits)
    how = (f"[batch size] activations {per_sample / 2**20:.2f} MB/sample (+{fixed_act / 2**20:.1f} MB fixed), "
           f"measured with saved-tensor hooks at batch 1 and 2, seq {args.max_seq_length}; "
           f"model+grads+AdamW {static / 2**20:.1f} MB per process (stage {args.stage}, {dist.world_size()} processes); "
           f"budget {budget / 2**20:.0f} MB ({'--max_memory_mb' if args.max_memory_mb else 'default'}); "
           f"with 20% headroom -> batch {fits}" + (f", capped at {limit} (data size / processes)" if fits > limit else ""))
    if batch < 1:
        raise SystemExit(how + "\nnot even one sample fits: raise --max_memory_mb, lower --max_seq_length, "
                               "or use train_zero_two.py --zero3 to shard more")
    if device.type == "cuda":
        batch = _try_on_gpu(model, make_batch, batch, autocast, log)
        how += f"; confirmed on the GPU at batch {batch}"
    t = torch.tensor([batch], device=device)
    dist.all_reduce(t, "min")
    batch = int(t.item())
    log(how + f"; agreed across processes: --train_batch_size {batch}")
    return batch


def _try_on_gpu(model: nn.Module, make_batch, batch: int, autocast, log) -> int:
    while batch >= 1:
        try:
            with autocast:
                out = model(**make_batch(batch))
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return batch
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            log(f"[batch size] batch {batch} ran out of GPU memory; trying {batch // 2}")
            batch //= 2
    raise SystemExit("[batch size] not even batch 1 fits in GPU memory: lower --max_seq_length or use --zero3")
