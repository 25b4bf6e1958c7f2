"""2D sin-cos position embeddings (MAE's layout) and their resampling to other patch grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_position_embedding(embed_dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos embedding for a (rows, columns) patch grid, exactly as MAE's ``get_2d_sincos_pos_embed``.

    The first half of the channels encodes the column index, the second half the row index; each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (D/4))``. Keeping MAE's layout means an imported
    MAE checkpoint's (frozen) position embedding equals ours on the same grid.

    Returns:
        float32 tensor (rows * columns, embed_dim) in [-1, 1], row-major over the grid (the order patches are
        flattened in).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    rows, columns = grid
    row_index, column_index = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(columns, dtype=torch.float64), indexing="ij"
    )
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (rows * columns, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(column_index), encode(row_index)], dim=1).float()


def resample_position_embedding(
    embedding: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample a patch position embedding from one grid to another (bicubic, as timm and MAE's fine-tuning do).

    Used for rectangular inputs, fine-tuning at a higher resolution, and importing checkpoints trained on another
    grid: the embedding is treated as a smooth image over the field of view, so a token keeps the position of the
    anatomy it covers relative to the whole image.

    Args:
        embedding: (1, rows * columns, D) or (rows * columns, D), row-major over ``source_grid``.
        source_grid: (rows, columns) the embedding was built for.
        target_grid: (rows, columns) wanted.
    Returns:
        Same rank as ``embedding`` with rows * columns of ``target_grid``; the input itself when the grids match.
    """
    if tuple(source_grid) == tuple(target_grid):
        return embedding
    batched = embedding.dim() == 3
    flat = embedding if batched else embedding.unsqueeze(0)
    rows, columns = source_grid
    if flat.shape[1] != rows * columns:
        raise ValueError(f"embedding has {flat.shape[1]} positions, grid {source_grid} needs {rows * columns}")
    image = flat.reshape(1, rows, columns, -1).permute(0, 3, 1, 2)
    # float32 for the interpolation: bicubic in bf16 loses the low-amplitude high-frequency channels.
    resized = F.interpolate(image.float(), size=tuple(target_grid), mode="bicubic", align_corners=False)
    out = resized.permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], -1).to(embedding.dtype)
    return out if batched else out.squeeze(0)
