"""Resumable, distributed epoch sampling.

Epoch e draws a permutation of the data set seeded by (seed, e) and takes its first
`samples_per_epoch` indices; global micro-batch k is the slice [k*B*W, (k+1)*B*W) of it and
rank r takes the r-th block of B. The data position is (epoch, samples consumed in the epoch),
so a run resumes on the same sample even with a different number of processes.

Length bucketing (`lengths` given: --unpad auto for the variable-length tasks): the epoch's order
is cut into windows of BUCKET_BATCHES global micro-batches; each window is sorted by length and
cut into global micro-batches of similar lengths, whose order inside the window is shuffled,
seeded by (seed, epoch). The collate pads each micro-batch to its own longest row, so batches
carry almost no padding. The order is still a function of (seed, epoch, lengths, global batch):
resuming from (epoch, samples consumed) continues it exactly; the windows follow the global
micro-batch, so resuming with another batch x processes product regroups the rest of the epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

BUCKET_BATCHES = 64  # global micro-batches per sorting window (HF's group_by_length uses 50)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    samples_in_epoch: int = 0     # global samples consumed in this epoch
    bad_steps: int = 0            # consecutive steps with non-finite loss/gradients


class EpochSampler:
    def __init__(self, num_samples: int, micro_batch: int, world_size: int, rank: int, seed: int,
                 accumulation: int = 1, max_steps_per_epoch: int = 0, lengths: np.ndarray | None = None):
        """lengths: tokens of every sample, to group samples of similar length into micro-batches
        (None: the plain permutation)."""
        assert lengths is None or len(lengths) == num_samples, (len(lengths), num_samples)
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.num_samples, self.micro_batch = num_samples, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_micro = micro_batch * world_size
        step_samples = self.global_micro * accumulation
        self.samples_per_epoch = samples_per_epoch(num_samples, self.global_micro, step_samples, max_steps_per_epoch)
        if max_steps_per_epoch and self.samples_per_epoch > num_samples:
            raise ValueError(
                f"--max_steps_per_epoch {max_steps_per_epoch} x {step_samples} samples per step "
                f"(batch {micro_batch} x accumulation {accumulation} x {world_size} processes) = "
                f"{self.samples_per_epoch} exceeds the {num_samples} samples in the data; "
                f"lower --max_steps_per_epoch to at most {num_samples // step_samples} or use more data")
        if self.samples_per_epoch < self.global_micro:
            raise ValueError(
                f"the data holds {num_samples} samples, fewer than one global batch "
                f"(batch {micro_batch} x {world_size} processes = {self.global_micro}); "
                f"lower --train_batch_size or use more data")

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches of `epoch`, from global sample `start` on."""
        order = permutation(self.num_samples, np.random.default_rng([self.seed, epoch]))[:self.samples_per_epoch]
        if self.lengths is not None:
            order = bucket_by_length(order, self.lengths, self.global_micro,
                                     np.random.default_rng([self.seed, epoch, 1]))
        for s in range(start, self.samples_per_epoch - self.global_micro + 1, self.global_micro):
            lo = s + self.rank * self.micro_batch
            yield order[lo:lo + self.micro_batch].tolist()


def samples_per_epoch(num_samples: int, global_micro: int, step_samples: int, max_steps_per_epoch: int) -> int:
    """The samples an epoch takes: --max_steps_per_epoch optimizer steps' worth, else every whole global
    micro-batch (--train_batch_size x processes) of the data."""
    if max_steps_per_epoch:
        return max_steps_per_epoch * step_samples
    return num_samples // global_micro * global_micro


def permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """rng.permutation(n) (the same order: the shuffle's swaps do not depend on the dtype) as int32
    where n fits: 4 bytes per sample instead of 8, per process and epoch (100M samples: 400 MB)."""
    if n >= 2 ** 31:
        return rng.permutation(n)
    order = np.arange(n, dtype=np.int32)
    rng.shuffle(order)
    return order


def bucket_by_length(order: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator,
                     window_batches: int = BUCKET_BATCHES) -> np.ndarray:
    """`order` (a multiple of `batch` long) regrouped: in each window of `window_batches` batches the
    samples are sorted by length (longest first, ties in `order`), cut into batches, and the
    batches of the window put in an order drawn from `rng`. The same samples, window by window."""
    assert len(order) % batch == 0, (len(order), batch)
    out = np.empty_like(order)
    window = batch * window_batches
    for lo in range(0, len(order), window):
        part = order[lo:lo + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        chunks = part.reshape(-1, batch)
        out[lo:lo + len(part)] = chunks[rng.permutation(len(chunks))].reshape(-1)
    return out


def length_sorted(lengths: np.ndarray) -> np.ndarray:
    """Positions of `lengths`, longest first (ties in order): evaluation batches of similar
    lengths; the first batch is the largest, so running out of memory shows at once."""
    return np.argsort(-np.asarray(lengths), kind="stable")


def example_lengths(dataset, indices: Sequence[int] | None = None) -> np.ndarray:
    """Tokens of the samples `indices` (default all): the length of each one's input_ids."""
    indices = range(len(dataset)) if indices is None else indices
    return np.fromiter((len(dataset[i]["input_ids"]) for i in indices), dtype=np.int64, count=len(indices))


class BatchList:
    """A DataLoader batch_sampler over a precomputed generator of index lists."""

    def __init__(self, batches: Iterator[list[int]]):
        self._batches = batches

    def __iter__(self):
        return iter(self._batches)
