"""The representation measures on constructed cases whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from caries_mim.analysis import (
    attention_nmi,
    effective_rank,
    high_frequency_log_amplitude,
    knn_accuracy,
    linear_probe_accuracy,
    mean_attention_distance,
    patch_distances,
    radial_log_amplitude,
)
from caries_mim.errors import InvalidArgumentError

GRID = (4, 4)
PATCHES = 16


def with_cls(patch_attention: torch.Tensor, cls_share: float = 0.0) -> torch.Tensor:
    """(H, N, N) patch rows -> (1, H, 1 + N, 1 + N) maps whose patch rows give ``cls_share`` to the CLS key."""
    heads = patch_attention.shape[0]
    full = torch.zeros(1, heads, PATCHES + 1, PATCHES + 1)
    full[0, :, 0, :] = 1.0 / (PATCHES + 1)
    full[0, :, 1:, 0] = cls_share
    full[0, :, 1:, 1:] = patch_attention * (1 - cls_share)
    return full


def test_identity_attention_has_distance_zero_and_nmi_one():
    identity = torch.eye(PATCHES).expand(2, -1, -1)
    attention = with_cls(identity, cls_share=0.3)  # mass on CLS is renormalized away
    assert mean_attention_distance(attention, GRID, patch_size=16).tolist() == [0.0, 0.0]
    assert attention_nmi(attention, GRID).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_uniform_attention_has_the_mean_pairwise_distance_and_nmi_zero():
    uniform = torch.full((1, PATCHES, PATCHES), 1.0 / PATCHES)
    attention = with_cls(uniform)
    # Mean distance between the centres of a 4 x 4 grid of 16 px patches, summed by hand over all pairs.
    pairs = [math.hypot(a // 4 - b // 4, a % 4 - b % 4) * 16 for a in range(PATCHES) for b in range(PATCHES)]
    assert mean_attention_distance(attention, GRID, patch_size=16).item() == pytest.approx(sum(pairs) / 256, rel=1e-5)
    assert attention_nmi(attention, GRID).item() == pytest.approx(0.0, abs=1e-6)


def test_attending_to_the_right_neighbour_is_one_patch_away_in_millimetres():
    shifted = torch.zeros(1, PATCHES, PATCHES)
    for query in range(PATCHES):
        row, column = divmod(query, 4)
        shifted[0, query, row * 4 + (column + 1) % 4 if column < 3 else row * 4 + column - 1] = 1.0
    distance_mm = mean_attention_distance(with_cls(shifted), GRID, patch_size=16 * 0.1)
    assert distance_mm.item() == pytest.approx(1.6)
    # A permutation of keys is as informative as identity: each query has a key of its own ... almost (two queries
    # of a row share the left neighbour when the last column looks left).
    assert 0.8 < attention_nmi(with_cls(shifted), GRID).item() < 1.0


def test_patch_distances_and_shape_errors():
    distances = patch_distances((2, 3), patch_size=2.0)
    assert distances[0, 5].item() == pytest.approx(math.hypot(2, 4))
    with pytest.raises(InvalidArgumentError, match="T = 1 \\+ 4x4"):
        mean_attention_distance(torch.rand(1, 2, 10, 10), GRID, 16)


def test_a_pure_sinusoid_at_the_grids_finest_frequency_is_all_high_frequency():
    rows = columns = 8
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    checkerboard = torch.cos(math.pi * (x + y)).float()  # the corner frequency (0.5, 0.5) cycles per token, no mean
    smooth = 1.0 + 0.1 * torch.cos(2 * math.pi * x / columns).float()  # mean plus the lowest frequency
    high = high_frequency_log_amplitude(checkerboard.expand(2, 3, -1, -1))
    low = high_frequency_log_amplitude(smooth.expand(2, 3, -1, -1))
    assert high > 10  # the DC bin is empty, the corner holds everything
    assert low < -10  # nothing at the corner
    profile = radial_log_amplitude(smooth.expand(1, 1, -1, -1))
    assert profile.argmax().item() == 0
    assert profile[1] > profile[2:].max()


def test_effective_rank_of_rank_one_and_of_orthogonal_features():
    generator = torch.Generator().manual_seed(0)
    rank_one = torch.randn(50, 1, generator=generator) * torch.randn(1, 12, generator=generator)
    # float32 rounding leaves singular values ~1e-7 of the first: 1 to within 1e-4.
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-4)
    # Centred rows of +-e_i span 6 directions with equal singular values.
    spread = torch.cat([torch.eye(6), -torch.eye(6)])
    assert effective_rank(spread) == pytest.approx(6.0, rel=1e-6)
    assert effective_rank(torch.ones(5, 3)) == 0.0  # no variation at all
    with pytest.raises(InvalidArgumentError):
        effective_rank(torch.ones(1, 3))


def test_probes_separate_separable_classes_and_are_at_chance_on_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=generator) * 4
    features = centres[labels] + torch.randn(300, 16, generator=generator)
    train, test = slice(0, 200), slice(200, 300)
    assert linear_probe_accuracy(features[train], labels[train], features[test], labels[test]) == 1.0
    assert knn_accuracy(features[train], labels[train], features[test], labels[test]) == 1.0
    noise = torch.randn(300, 16, generator=generator)
    assert linear_probe_accuracy(noise[train], labels[train], noise[test], labels[test]) < 0.55
    assert knn_accuracy(noise[train], labels[train], noise[test], labels[test]) < 0.55
    with pytest.raises(InvalidArgumentError, match="one label per feature row"):
        knn_accuracy(features[train], labels[:5], features[test], labels[test])
