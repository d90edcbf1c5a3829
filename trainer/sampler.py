"""Resumable, distributed epoch sampling.

Epoch e draws a permutation of the data set seeded by (seed, e) and takes its first
`samples_per_epoch` indices; global micro-batch k is the slice [k*B*W, (k+1)*B*W) of it and
rank r takes the r-th block of B. The data position is (epoch, samples consumed in the epoch),
so a run resumes on the same sample even with a different number of processes.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    samples_in_epoch: int = 0     # global samples consumed in this epoch
    bad_steps: int = 0            # consecutive steps with non-finite loss/gradients


class EpochSampler:
    def __init__(self, num_samples: int, micro_batch: int, world_size: int, rank: int, seed: int,
                 accumulation: int = 1, max_steps_per_epoch: int = 0):
        self.num_samples, self.micro_batch = num_samples, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_micro = micro_batch * world_size
        step_samples = self.global_micro * accumulation
        if max_steps_per_epoch:
            self.samples_per_epoch = max_steps_per_epoch * step_samples
            if self.samples_per_epoch > num_samples:
                raise ValueError(
                    f"--max_steps_per_epoch {max_steps_per_epoch} x {step_samples} samples per step "
                    f"(batch {micro_batch} x accumulation {accumulation} x {world_size} processes) = "
                    f"{self.samples_per_epoch} exceeds the {num_samples} samples in the data; "
                    f"lower --max_steps_per_epoch to at most {num_samples // step_samples} or use more data")
        else:
            self.samples_per_epoch = (num_samples // self.global_micro) * self.global_micro
        if self.samples_per_epoch < self.global_micro:
            raise ValueError(
                f"the data holds {num_samples} samples, fewer than one global batch "
                f"(batch {micro_batch} x {world_size} processes = {self.global_micro}); "
                f"lower --train_batch_size or use more data")

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches of `epoch`, from global sample `start` on."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)[:self.samples_per_epoch]
        for s in range(start, self.samples_per_epoch - self.global_micro + 1, self.global_micro):
            lo = s + self.rank * self.micro_batch
            yield order[lo:lo + self.micro_batch].tolist()


class BatchList:
    """A DataLoader batch_sampler over a precomputed generator of index lists."""

    def __init__(self, batches: Iterator[list[int]]):
        self._batches = batches

    def __iter__(self):
        return iter(self._batches)
