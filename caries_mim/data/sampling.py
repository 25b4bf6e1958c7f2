"""A shuffling, rank-splitting sampler that can restart in the middle of an epoch, and seeds every item.

torch's ``DistributedSampler`` shuffles per epoch and splits across ranks, but cannot start at a batch offset, so a
resumed run would either repeat or skip data; and augmentation randomness drawn from worker RNG streams depends on
how many workers there are and when iterators were created. Here the order of an epoch is a pure function of
(seed, epoch), and every item carries its own augmentation seed derived from (seed, epoch, position): a run
resumed at any batch sees exactly the images, crops and flips the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

#: Large odd multipliers that spread (seed, epoch, position) over 63 bits without collisions in practice.
_EPOCH_MIX = 0x9E3779B97F4A7C15
_POSITION_MIX = 0xBF58476D1CE4E5B9


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the item at ``position`` of the shuffled ``epoch``, in [0, 2**32)."""
    mixed = (seed * _EPOCH_MIX + (epoch + 1) * _POSITION_MIX + position * _EPOCH_MIX) % 2**64
    mixed ^= mixed >> 31
    return (mixed * _POSITION_MIX % 2**64) >> 32


class ResumableEpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(dataset_index, augmentation_seed)`` for this rank's share of one epoch, from a start batch.

    Each epoch is a permutation seeded by (seed, epoch), truncated to whole global batches
    (``batch_size * world_size``; the remainder waits for another epoch's shuffle) and dealt round-robin to ranks,
    so every rank gets the same number of batches and no image appears twice in a step. Datasets that yield
    the key to :meth:`~caries_mim.data.UnlabeledRadiographs.__getitem__` apply the seed to their transform.

    Call :meth:`set_position` before creating each DataLoader iterator.
    """

    def __init__(self, dataset_size: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (0 when the dataset is smaller than one global batch)."""
        return self.dataset_size // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration covers batches ``start_batch ..`` of ``epoch``."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.dataset_size, generator=generator)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        start = self.start_batch * self.batch_size * self.world_size
        for position in range(start + self.rank, used, self.world_size):
            yield int(order[position]), item_seed(self.seed, self.epoch, position)
