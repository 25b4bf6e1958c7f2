"""A shuffling, rank-splitting sampler that can restart in the middle of an epoch, and seeds every item; with
repeat factors, it over-samples images of rare classes (LVIS's repeat factor sampling).

torch's ``DistributedSampler`` shuffles per epoch and splits across ranks, but cannot start at a batch offset, so a
resumed run would either repeat or skip data; and augmentation randomness drawn from worker RNG streams depends on
how many workers there are and when iterators were created. Here the order of an epoch is a pure function of
(seed, epoch), and every item carries its own augmentation seed derived from (seed, epoch, position): a run
resumed at any batch sees exactly the images, crops and flips the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Sequence

import numpy as np
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

    ``repeat_factors`` (one per dataset item, each >= 1; see :func:`repeat_factors`): each epoch item i appears
    ``floor(r_i)`` times plus once more with probability ``frac(r_i)``, drawn anew every epoch from (seed, epoch) as
    detectron2's ``RepeatFactorTrainingSampler`` does, so every image keeps its expected share rather than a fixed
    rounding of it. The epoch is then cut (or topped up from its own shuffle) to ``floor(sum(r))`` items: a fixed
    length keeps the batch position of a checkpoint meaningful.

    Call :meth:`set_position` before creating each DataLoader iterator.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        repeat_factors: Sequence[float] | None = None,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if repeat_factors is not None:
            if len(repeat_factors) != dataset_size:
                raise ValueError(f"{len(repeat_factors)} repeat factors for {dataset_size} items")
            if any(not math.isfinite(factor) or factor < 1.0 for factor in repeat_factors):
                raise ValueError("repeat factors must be finite and >= 1")
        self.repeat_factors = None if repeat_factors is None else torch.tensor(repeat_factors, dtype=torch.float64)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def epoch_length(self) -> int:
        """Items in one epoch over all ranks: the dataset size, or ``floor(sum(repeat_factors))``."""
        if self.repeat_factors is None:
            return self.dataset_size
        return int(self.repeat_factors.sum().item())

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (0 when an epoch is smaller than one global batch)."""
        return self.epoch_length // (self.batch_size * self.world_size)

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
        if self.repeat_factors is None:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = self._repeated(generator)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        start = self.start_batch * self.batch_size * self.world_size
        for position in range(start + self.rank, used, self.world_size):
            yield int(order[position]), item_seed(self.seed, self.epoch, position)

    def _repeated(self, generator: torch.Generator) -> torch.Tensor:
        """This epoch's items with their repeats drawn (stochastic rounding), shuffled, at ``epoch_length``."""
        factors = self.repeat_factors
        whole = torch.floor(factors)
        counts = (whole + (torch.rand(len(factors), generator=generator, dtype=torch.float64) < factors - whole)).long()
        items = torch.repeat_interleave(torch.arange(len(factors)), counts)
        items = items[torch.randperm(len(items), generator=generator)]
        length = self.epoch_length
        while len(items) < length:  # a short draw is topped up from its own shuffle
            items = torch.cat([items, items[: length - len(items)]])
        return items[:length]


def category_repeat_factors(image_categories: Sequence[Iterable[Hashable]], threshold: float) -> dict[Hashable, float]:
    """LVIS's repeat factor per category (Gupta et al., 2019): ``f_c`` is the fraction of images holding a box of
    category c, and ``r_c = max(1, sqrt(threshold / f_c))``. Categories in at least ``threshold`` of the images are
    not over-sampled.

    ``image_categories``: per image, the categories of its boxes: class indices, or (class, attribute value) pairs
    when an annotation attribute splits the classes (:func:`repeat_factors`). ``threshold`` in (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the repeat threshold must be in (0, 1], got {threshold}")
    present = [set(categories) for categories in image_categories]
    counts: dict[Hashable, int] = {}
    for categories in present:
        for category in categories:
            counts[category] = counts.get(category, 0) + 1
    images = len(present)
    return {category: max(1.0, math.sqrt(threshold / (count / images))) for category, count in counts.items()}


def repeat_factors(image_labels: Sequence[Iterable[Hashable]], threshold: float) -> list[float]:
    """LVIS's repeat factor per image: the largest :func:`category_repeat_factors` of its boxes' categories (1 for
    an image without boxes).

    ``image_labels``: per image, the categories of its boxes: class indices (LVIS), or (class, attribute value)
    pairs, so that a rare kind of lesion within a common class (an occlusal caries among proximal ones) is
    over-sampled like a rare class. ``threshold`` in (0, 1].
    """
    image_categories = [[_category(label) for label in labels] for labels in image_labels]
    return image_repeat_factors(image_categories, category_repeat_factors(image_categories, threshold))


def image_repeat_factors(
    image_categories: Sequence[Iterable[Hashable]], per_category: dict[Hashable, float]
) -> list[float]:
    """Per image, the largest factor of its boxes' categories in ``per_category`` (from
    :func:`category_repeat_factors`), 1 for an image without boxes."""
    return [max((per_category[category] for category in categories), default=1.0) for categories in image_categories]


def _category(label: Hashable) -> Hashable:
    """Class indices as plain ints (numpy integers hash alike, but an int is what a log or a test reads)."""
    return int(label) if isinstance(label, (int, np.integer)) else label
