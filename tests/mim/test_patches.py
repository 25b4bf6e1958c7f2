"""Images <-> patches in MAE's layout, and per-patch masks as pixel masks."""

from __future__ import annotations

import pytest
import torch

from caries_mim.mim import mask_to_pixels, patchify, unpatchify


def mae_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """facebookresearch/mae ``MaskedAutoencoderViT.patchify``, generalized to C channels and rectangles."""
    n, c, height, width = images.shape
    h, w = height // p, width // p
    x = images.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def mae_unpatchify(x: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """MAE's ``unpatchify`` (einsum ``nhwpqc->nchpwq``), generalized the same way."""
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


SHAPES = [(2, 1, 64, 64, 16), (2, 3, 64, 64, 16), (1, 1, 32, 80, 16), (3, 3, 48, 24, 8), (1, 2, 12, 18, 3)]


@pytest.mark.parametrize(("batch", "channels", "height", "width", "p"), SHAPES)
def test_round_trip(batch, channels, height, width, p):
    images = torch.rand(batch, channels, height, width)
    patches = patchify(images, p)
    assert patches.shape == (batch, (height // p) * (width // p), p * p * channels)
    assert torch.equal(unpatchify(patches, (height // p, width // p), p), images)


@pytest.mark.parametrize(("batch", "channels", "height", "width", "p"), SHAPES)
def test_layout_matches_mae_einsum(batch, channels, height, width, p):
    images = torch.rand(batch, channels, height, width)
    assert torch.equal(patchify(images, p), mae_patchify(images, p))
    patches = torch.rand(batch, (height // p) * (width // p), p * p * channels)
    grid = (height // p, width // p)
    assert torch.equal(unpatchify(patches, grid, p), mae_unpatchify(patches, *grid, p, channels))


def test_patch_order_is_row_major_and_values_row_column_channel():
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    patches = patchify(images, 2)  # grid 2x3
    # Patch 4 = grid row 1, column 1: pixel rows 2-3, columns 2-3. Values run over (row, column, channel).
    expected = torch.stack([images[0, :, 2, 2], images[0, :, 2, 3], images[0, :, 3, 2], images[0, :, 3, 3]])
    assert torch.equal(patches[0, 4], expected.flatten())


def test_patchify_rejects_non_multiple():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.rand(1, 1, 30, 32), 16)


@pytest.mark.parametrize(("grid", "values"), [((3, 3), 256), ((4, 3), 250)])
def test_unpatchify_rejects_inconsistent_shapes(grid, values):
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.rand(1, 12, values), grid, 16)


def test_mask_to_pixels():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])  # grid 2x3
    pixels = mask_to_pixels(mask, (2, 3), 4)
    assert pixels.shape == (1, 1, 8, 12)
    for index, value in enumerate(mask[0]):
        row, column = divmod(index, 3)
        block = pixels[0, 0, row * 4 : (row + 1) * 4, column * 4 : (column + 1) * 4]
        assert torch.all(block == value)


def test_mask_to_pixels_agrees_with_patchify():
    """Pixel mask patchified back gives each patch's mask value in every slot."""
    mask = (torch.rand(3, 20) > 0.5).float()
    pixels = mask_to_pixels(mask, (4, 5), 8)
    patches = patchify(pixels, 8)
    assert torch.equal(patches, mask.unsqueeze(-1).expand(-1, -1, 64))
