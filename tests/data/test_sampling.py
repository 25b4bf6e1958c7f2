"""ResumableEpochSampler: shuffles per epoch, splits ranks without overlap, restarts mid-epoch identically."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from caries_mim.data import ResumableEpochSampler, category_repeat_factors, item_seed, repeat_factors


def epoch(sampler: ResumableEpochSampler, number: int, start: int = 0) -> list[tuple[int, int]]:
    sampler.set_position(number, start)
    return list(sampler)


def test_an_epoch_is_a_permutation_truncated_to_whole_batches():
    sampler = ResumableEpochSampler(23, batch_size=5, seed=1)
    items = epoch(sampler, 0)
    indices = [index for index, _ in items]
    assert len(indices) == 20 == len(sampler)
    assert len(set(indices)) == 20
    assert sampler.batches_per_epoch == 4


def test_epochs_shuffle_differently_and_deterministically():
    sampler = ResumableEpochSampler(50, batch_size=10, seed=7)
    assert epoch(sampler, 0) != epoch(sampler, 1)
    assert epoch(sampler, 1) == epoch(ResumableEpochSampler(50, batch_size=10, seed=7), 1)
    assert epoch(sampler, 1) != epoch(ResumableEpochSampler(50, batch_size=10, seed=8), 1)


def test_ranks_share_an_epoch_without_overlap_and_in_equal_parts():
    ranks = [ResumableEpochSampler(41, batch_size=4, rank=r, world_size=3, seed=2) for r in range(3)]
    parts = [[index for index, _ in epoch(sampler, 5)] for sampler in ranks]
    assert [len(part) for part in parts] == [12, 12, 12]
    assert len(set().union(*map(set, parts))) == 36


def test_starting_mid_epoch_continues_the_same_sequence():
    sampler = ResumableEpochSampler(30, batch_size=4, rank=1, world_size=2, seed=3)
    full = epoch(sampler, 2)
    assert epoch(sampler, 2, start=2) == full[2 * 4 :]
    assert epoch(sampler, 2, start=sampler.batches_per_epoch) == []


def test_item_seeds_differ_by_position_and_epoch_and_fit_32_bits():
    seeds = {item_seed(0, e, p) for e in range(5) for p in range(200)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize(("kwargs"), [{"batch_size": 0}, {"rank": 2, "world_size": 2}, {"world_size": 0}])
def test_bad_geometry_is_rejected(kwargs):
    with pytest.raises(ValueError, match="bad sampler geometry"):
        ResumableEpochSampler(10, **{"batch_size": 2, **kwargs})


def test_a_start_past_the_epoch_is_rejected():
    sampler = ResumableEpochSampler(10, batch_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_position(0, 6)


def test_repeat_factors_follow_lvis_for_rare_classes_only():
    # Class 0 in 8 of 10 images, class 1 in 2 of 10: at threshold 0.5, class 1 gets sqrt(0.5 / 0.2) = 1.58.
    labels = [[0]] * 6 + [[0, 1]] * 2 + [[]] * 2
    factors = repeat_factors(labels, threshold=0.5)
    assert factors[:6] == [1.0] * 6
    assert factors[6:8] == pytest.approx([0.5**0.5 / 0.2**0.5] * 2)
    assert factors[8:] == [1.0, 1.0]  # no boxes: drawn as often as before
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(labels, threshold=0.0)


def test_an_attribute_splits_a_common_class_so_its_rare_kind_is_over_sampled():
    # Caries in all 10 images, but occlusal caries in 1: by class alone nothing is over-sampled; by (class, surface)
    # the occlusal one gets sqrt(1 / 0.1) = 3.16 and the mesial ones (9 of 10) sqrt(1 / 0.9) = 1.05.
    classes = [[0]] * 10
    assert repeat_factors(classes, threshold=1.0) == [1.0] * 10
    pairs = [[(0, "mesial")]] * 9 + [[(0, "occlusal")]]
    per_category = category_repeat_factors(pairs, threshold=1.0)
    assert per_category == pytest.approx({(0, "mesial"): (1 / 0.9) ** 0.5, (0, "occlusal"): 10**0.5})
    assert repeat_factors(pairs, threshold=1.0) == pytest.approx([(1 / 0.9) ** 0.5] * 9 + [10**0.5])
    # numpy class indices are the same categories as ints
    assert repeat_factors([np.array([0]), np.array([0, 1])], threshold=1.0) == repeat_factors([[0], [0, 1]], 1.0)


def test_repeat_factor_epochs_have_a_fixed_length_and_the_expected_shares():
    factors = [1.0] * 30 + [2.5] * 10
    sampler = ResumableEpochSampler(40, batch_size=5, seed=3, repeat_factors=factors)
    assert sampler.epoch_length == 55
    assert sampler.batches_per_epoch == 11
    counts: Counter[int] = Counter()
    for number in range(400):
        items = epoch(sampler, number)
        assert len(items) == 55
        counts.update(index for index, _ in items)
    # Over 400 epochs each repeated image is drawn 2.5x as often as each plain one (stochastic rounding anew each
    # epoch, not one fixed rounding per image).
    plain = sum(counts[i] for i in range(30)) / 30
    repeated = [counts[i] / plain for i in range(30, 40)]
    assert all(2.3 < ratio < 2.7 for ratio in repeated)


def test_repeat_factor_epochs_are_deterministic_and_resume_mid_epoch():
    factors = [1.0, 1.5, 3.0, 1.2] * 5
    sampler = ResumableEpochSampler(20, batch_size=4, seed=5, repeat_factors=factors)
    whole = epoch(sampler, 2)
    assert whole == epoch(ResumableEpochSampler(20, batch_size=4, seed=5, repeat_factors=factors), 2)
    assert epoch(sampler, 2, start=3) == whole[3 * 4 :]
    assert whole != epoch(sampler, 3)


def test_without_repeat_factors_an_epoch_is_the_seeded_permutation_as_before():
    """Runs trained before the option draw the same epochs: the permutation of (seed, epoch) and nothing else."""
    expected = torch.randperm(30, generator=torch.Generator().manual_seed(2 * 1_000_003 + 4)).tolist()
    assert [index for index, _ in epoch(ResumableEpochSampler(30, batch_size=5, seed=2), 4)] == expected


@pytest.mark.parametrize("factors", [[1.0, 0.5], [1.0, float("nan")], [1.0]])
def test_bad_repeat_factors_are_rejected(factors):
    with pytest.raises(ValueError, match="repeat factors"):
        ResumableEpochSampler(2, batch_size=1, repeat_factors=factors)
