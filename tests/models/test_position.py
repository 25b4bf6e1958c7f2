"""2D sin-cos position embeddings (MAE's exact layout) and their resampling to other patch grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caries_mim.models import VisionTransformer, ViTConfig, resample_position_embedding, sincos_position_embedding


def mae_1d_sincos(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py ``get_1d_sincos_pos_embed_from_grid``, re-implemented."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed`` (square grids only, as in the reference)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([mae_1d_sincos(embed_dim // 2, grid[0]), mae_1d_sincos(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize(("embed_dim", "grid_size"), [(64, 4), (192, 14), (768, 14), (384, 16)])
def test_sincos_equals_mae_reference(embed_dim, grid_size):
    ours = sincos_position_embedding(embed_dim, (grid_size, grid_size))
    reference = torch.from_numpy(mae_2d_sincos(embed_dim, grid_size)).float()
    assert ours.dtype == torch.float32
    assert ours.shape == (grid_size * grid_size, embed_dim)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_encoder_buffer_equals_mae_reference_with_cls_slot():
    """A MAE checkpoint's (frozen) pos_embed, CLS slot included, equals a fresh encoder's buffer."""
    encoder = VisionTransformer(ViTConfig(image_size=64, patch_size=16, embed_dim=64, depth=1, num_heads=4))
    reference = torch.from_numpy(mae_2d_sincos(64, 4, cls_token=True)).float().unsqueeze(0)
    assert torch.allclose(encoder.pos_embed, reference, atol=1e-6)


def test_rectangular_sincos_first_half_columns_second_half_rows():
    embed = sincos_position_embedding(32, (3, 5)).reshape(3, 5, 32)
    # Along a row only the column half changes; along a column only the row half changes.
    assert torch.equal(embed[0, :, 16:], embed[0, :1, 16:].expand(5, -1))
    assert torch.equal(embed[:, 0, :16], embed[:1, 0, :16].expand(3, -1))
    assert torch.allclose(embed[2, 4, :16], sincos_position_embedding(32, (1, 5))[4, :16])
    assert embed.abs().max() <= 1.0


def test_sincos_rejects_width_not_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(30, (4, 4))


@pytest.mark.parametrize("batched", [True, False])
def test_resample_to_same_grid_returns_input(batched):
    embedding = sincos_position_embedding(64, (4, 6))
    if batched:
        embedding = embedding.unsqueeze(0)
    assert resample_position_embedding(embedding, (4, 6), (4, 6)) is embedding


@pytest.mark.parametrize(
    ("source", "target"), [((8, 8), (16, 16)), ((14, 14), (16, 16)), ((8, 8), (6, 10)), ((4, 6), (12, 3))]
)
@pytest.mark.parametrize("batched", [True, False])
def test_resample_shapes(source, target, batched):
    embedding = sincos_position_embedding(64, source)
    if batched:
        embedding = embedding.unsqueeze(0)
    out = resample_position_embedding(embedding, source, target)
    expected = (target[0] * target[1], 64)
    assert out.shape == ((1, *expected) if batched else expected)
    assert out.dtype == embedding.dtype


def test_resample_up_and_down_again_stays_close():
    """The embedding is smooth over the field of view, so 8x8 -> 16x16 -> 8x8 nearly recovers it."""
    embedding = sincos_position_embedding(64, (8, 8))
    there = resample_position_embedding(embedding, (8, 8), (16, 16))
    back = resample_position_embedding(there, (16, 16), (8, 8))
    assert (back - embedding).abs().max() < 0.05
    assert (back - embedding).abs().mean() < 0.005


def sincos_at(embed_dim: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """MAE's 2D sin-cos evaluated at fractional (row, column) positions: (len(rows), len(columns), D)."""
    row_grid, column_grid = np.meshgrid(rows, columns, indexing="ij")
    emb = np.concatenate([mae_1d_sincos(embed_dim // 2, column_grid), mae_1d_sincos(embed_dim // 2, row_grid)], 1)
    return emb.reshape(len(rows), len(columns), embed_dim)


@pytest.mark.parametrize(("source", "target"), [((8, 8), (16, 16)), ((14, 14), (16, 16)), ((8, 8), (6, 10))])
def test_resampled_embedding_follows_the_field_of_view(source, target):
    """Each target cell gets (nearly) the sin-cos value of its centre's position on the source grid, so a token
    keeps the position of the anatomy it covers. Border cells are left out (bicubic clamps there)."""
    embedding = sincos_position_embedding(64, source)
    out = resample_position_embedding(embedding, source, target).reshape(*target, 64).double()
    rows = (np.arange(target[0]) + 0.5) * source[0] / target[0] - 0.5
    columns = (np.arange(target[1]) + 0.5) * source[1] / target[1] - 0.5
    error = (out - torch.from_numpy(sincos_at(64, rows, columns))).abs()[2:-2, 2:-2]
    assert error.max() < 0.06
    assert error.mean() < 0.006


def test_upsampled_embedding_keeps_corner_positions_and_range():
    embedding = sincos_position_embedding(64, (8, 8)).reshape(8, 8, 64)
    up = resample_position_embedding(embedding.reshape(64, 64), (8, 8), (16, 16)).reshape(16, 16, 64)
    # Low-frequency channels (the last of each sin/cos quarter) vary slowly: corners map near the source corners.
    slow = [15, 31, 47, 63]
    assert torch.allclose(up[0, 0, slow], embedding[0, 0, slow], atol=1e-3)
    assert torch.allclose(up[-1, -1, slow], embedding[-1, -1, slow], atol=1e-3)
    assert up.abs().max() < 1.1


def test_resample_rectangular_is_separable_per_axis():
    """Resampling only the columns of a rectangular grid leaves the row half of every channel untouched."""
    embedding = sincos_position_embedding(32, (4, 6))
    out = resample_position_embedding(embedding, (4, 6), (4, 9)).reshape(4, 9, 32)
    reference_rows = embedding.reshape(4, 6, 32)[:, :1, 16:]
    assert torch.allclose(out[:, :, 16:], reference_rows.expand(4, 9, 16), atol=1e-5)


def test_resample_rejects_wrong_position_count():
    with pytest.raises(ValueError, match="positions"):
        resample_position_embedding(torch.zeros(1, 15, 8), (4, 4), (8, 8))


def test_resample_keeps_half_precision_dtype():
    embedding = sincos_position_embedding(64, (8, 8)).to(torch.bfloat16)
    out = resample_position_embedding(embedding, (8, 8), (4, 4))
    assert out.dtype == torch.bfloat16


def test_encoder_position_embedding_for_other_grids():
    encoder = VisionTransformer(ViTConfig(image_size=64, patch_size=16, embed_dim=64, depth=1, num_heads=4))
    same = encoder.position_embedding((4, 4))
    assert torch.equal(same, encoder.pos_embed[:, 1:])
    for grid in [(2, 2), (4, 7), (8, 8)]:
        positions = encoder.position_embedding(grid)
        assert positions.shape == (1, grid[0] * grid[1], 64)
        assert torch.equal(positions, resample_position_embedding(encoder.pos_embed[:, 1:], (4, 4), grid))
