"""One gradient tensor for the word embeddings tied to the MLM decoder.

The tied weight (V, D) gets two gradients in pretraining: the decoder's (a (V, D) matmul result) and
the lookup's (rows scattered into a (V, D) tensor of zeros). Autograd then adds the two into a third
(V, D) tensor. At BERT-base size that is two 98 MB temporaries per step, each written into freshly
mapped memory: 6-7% of a CPU training step (torch.profiler: the zero fill 127 ms, the out-of-place sum
135 ms, against 3.9 s). Here the decoder's gradient is handed to the lookup's backward, which adds the
looked-up rows into it in place: one (V, D) tensor, the one the decoder's matmul wrote.

Order: the decoder runs after the encoder in the forward, so in the backward its gradient is ready
before any gradient reaches the lookup (autograd runs a node only when every gradient of its output
is in, and the lookup's output feeds the whole encoder). When no decoder gradient came (a forward with
no MLM rows, the query side of ICT after the passage side took it), the lookup scatters into zeros as
nn.Embedding does. Used only where the forward ties them itself (`PretrainModel`), on parameters that
stay in place during the step (not DeepSpeed ZeRO-3's, which swaps `param.data`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TiedGrad:
    """The link between one forward's lookups and its decoder: the decoder's weight gradient waits
    here for the first lookup backward."""

    def __init__(self) -> None:
        self.lookups = 0        # lookups done in this forward through the slot
        self.grad: Tensor | None = None
        self.closed = False     # a lookup backward ran: a later decoder gradient goes to autograd

    def give(self, grad: Tensor) -> bool:
        if self.closed:
            return False
        self.grad = grad if self.grad is None else self.grad + grad
        return True

    def take(self) -> Tensor | None:
        grad, self.grad, self.closed = self.grad, None, True
        return grad

    def decoder_weight(self, weight: Tensor) -> Tensor:
        """`weight` as the decoder reads it: its gradient goes to this slot when a lookup will take it."""
        if self.lookups == 0 or not (torch.is_grad_enabled() and weight.requires_grad):
            return weight
        return _DecoderWeight.apply(weight, self)


class _DecoderWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, slot: TiedGrad) -> Tensor:
        ctx.slot = slot
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None if ctx.slot.give(grad) else grad), None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, slot: TiedGrad) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.slot, ctx.weight_shape, ctx.weight_dtype = slot, weight.shape, weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        out = ctx.slot.take()
        if out is None:
            out = grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        elif out.dtype != ctx.weight_dtype or not out.is_contiguous():
            out = out.to(ctx.weight_dtype, memory_format=torch.contiguous_format)
        rows = grad.reshape(-1, grad.shape[-1]).to(out.dtype)
        if out.device.type == "cpu":
            out.index_add_(0, ids.reshape(-1), rows)
        else:  # CUDA's index_add_ is nondeterministic (atomics); embedding_dense_backward is not
            out.add_(torch.ops.aten.embedding_dense_backward(rows, ids.reshape(-1), ctx.weight_shape[0], -1, False))
        return None, out, None


class TiedEmbedding(nn.Embedding):
    """nn.Embedding (same parameters and state dict) whose lookup can share its weight gradient with
    the MLM decoder through a `TiedGrad` set in `tied` for one forward."""

    tied: TiedGrad | None = None

    def usable(self) -> bool:
        w = self.weight
        return (self.padding_idx is None and self.max_norm is None and not self.sparse
                and not self.scale_grad_by_freq and isinstance(w, nn.Parameter) and w.is_leaf
                and not hasattr(w, "ds_id"))  # DeepSpeed ZeRO-3 swaps param.data in and out

    @contextlib.contextmanager
    def linked(self) -> Iterator[TiedGrad | None]:
        """For one forward: the `TiedGrad` its lookups and the decoder share, or None where the
        plain path applies (not `usable`, no gradient wanted)."""
        if not (self.usable() and torch.is_grad_enabled() and self.weight.requires_grad):
            yield None
            return
        self.tied = TiedGrad()
        try:
            yield self.tied
        finally:
            self.tied = None

    def forward(self, input_ids: Tensor) -> Tensor:
        slot = self.tied
        if slot is None or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(input_ids)
        slot.lookups += 1
        return _Lookup.apply(input_ids, self.weight, slot)
