"""Padding token-id sequences into batches: the one helper every dataset's `collate` uses."""
from __future__ import annotations

from typing import Sequence

import torch

PAD_MULTIPLE = 8


def padded_length(longest: int, max_seq_length: int, multiple: int = PAD_MULTIPLE) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, capped at ``max_seq_length``."""
    rounded = -(-max(longest, 1) // multiple) * multiple
    return min(rounded, max_seq_length)


def pad_batch(seqs: Sequence[Sequence[int]], pad_value: int, max_seq_length: int,
              multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-pad integer sequences into a (B, L) int64 tensor.

    Returns ``(ids, attention_mask, num_truncated)``; sequences longer than ``max_seq_length``
    are cut there (their last token is kept as the final position, so a closing ``[SEP]``
    survives) and counted in ``num_truncated`` rather than raising.
    """
    if not seqs:
        raise ValueError("pad_batch got an empty batch")
    length = padded_length(max(len(s) for s in seqs), max_seq_length, multiple)
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.int64)
    mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    num_truncated = 0
    for i, s in enumerate(seqs):
        s = list(s)
        if len(s) > length:
            num_truncated += 1
            s = s[: length - 1] + s[-1:]
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
        mask[i, : len(s)] = 1
    return ids, mask, num_truncated
