"""Simple feature pyramid: three levels at strides p/2, p, 2p, for square and rectangular patch grids."""

from __future__ import annotations

import pytest
import torch

from caries_mim.detection import ChannelLayerNorm, SimpleFeaturePyramid


@pytest.mark.parametrize(("rows", "columns"), [(4, 4), (6, 10)])
def test_levels_have_strides_half_one_and_two_patches(rows, columns):
    pyramid = SimpleFeaturePyramid(in_channels=32, channels=16)
    levels = pyramid(torch.randn(2, 32, rows, columns))
    assert [tuple(level.shape) for level in levels] == [
        (2, 16, 2 * rows, 2 * columns),
        (2, 16, rows, columns),
        (2, 16, rows // 2, columns // 2),
    ]
    assert pyramid.out_channels == 16


def test_channel_layer_norm_normalizes_each_position_over_channels():
    maps = torch.randn(2, 8, 3, 5) * 4 + 3
    normalized = ChannelLayerNorm(8, eps=1e-6)(maps)
    assert normalized.shape == maps.shape
    torch.testing.assert_close(normalized.mean(dim=1), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.var(dim=1, unbiased=False), torch.ones(2, 3, 5), atol=1e-3, rtol=0)


def test_the_stride_p_level_is_not_resampled():
    """The stride-p level is the input map through its 1x1 and 3x3 convs only: changing one patch changes only the
    positions within the 3x3 conv's reach."""
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(in_channels=32, channels=16).eval()
    features = torch.randn(1, 32, 8, 8)
    changed = features.clone()
    changed[..., 0, 0] += 5.0
    with torch.no_grad():
        difference = (pyramid(features)[1] - pyramid(changed)[1]).abs().sum(dim=1)[0]
    assert difference[:2, :2].min() > 0
    assert difference[2:, :].max() == 0
    assert difference[:, 2:].max() == 0
