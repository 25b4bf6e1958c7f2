"""Images <-> flattened patches, in MAE's layout (row-major patches; inside a patch: rows, columns, channels)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), N = (H/p) * (W/p) row-major; H and W must be multiples of p."""
    batch, channels, height, width = images.shape
    p = patch_size
    rows, columns = height // p, width // p
    if rows * p != height or columns * p != width:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch size {p}")
    patches = images.reshape(batch, channels, rows, p, columns, p)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * columns, p * p * channels)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, rows*p, columns*p); inverse of :func:`patchify`."""
    batch, count, values = patches.shape
    rows, columns = grid
    p = patch_size
    channels = values // (p * p)
    if count != rows * columns or channels * p * p != values:
        raise ValueError(f"{count} patches of {values} values do not fit grid {grid} with patch size {p}")
    images = patches.reshape(batch, rows, columns, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(batch, channels, rows * p, columns * p)


def mask_to_pixels(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N) per-patch mask -> (B, 1, rows*p, columns*p) per-pixel mask with the same values."""
    rows, columns = grid
    coarse = mask.reshape(mask.shape[0], 1, rows, columns)
    return coarse.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
