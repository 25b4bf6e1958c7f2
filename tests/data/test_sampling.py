"""ResumableEpochSampler: shuffles per epoch, splits ranks without overlap, restarts mid-epoch identically."""

from __future__ import annotations

import pytest

from caries_mim.data import ResumableEpochSampler, item_seed


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
