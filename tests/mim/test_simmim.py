"""SimMIM: coarse block masks, mask token in place of removed embeddings, L1 on removed pixels only."""

from __future__ import annotations

import math

import pytest
import torch

from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from caries_mim.mim import SimMIM, SimMIMOptions, block_masking, build_objective, patchify
from caries_mim.mim.objective import MASKED_FILL
from caries_mim.models import VisionTransformer, ViTConfig

SMALL = ViTConfig(image_size=(64, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4)


def make_simmim(seed: int = 0, **options) -> SimMIM:
    torch.manual_seed(seed)
    return SimMIM(VisionTransformer(SMALL), SimMIMOptions(**options))


def removed_block_count(blocks: int, mask_ratio: float) -> int:
    """SimMIM's count, ``ceil(blocks * mask_ratio)``, kept below ``blocks``."""
    return min(blocks - 1, math.ceil(blocks * mask_ratio))


def coarse_blocks(mask: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """(B, N) patch mask -> (B, block rows, block columns) value at each block's first patch."""
    return mask.reshape(-1, *grid)[:, ::cells, ::cells]


# ---------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("grid", "cells"),
    [((4, 4), 2), ((14, 14), 2), ((16, 12), 2), ((12, 12), 3), ((6, 6), 1)],
)
def test_block_mask_is_constant_per_block_with_exact_count(grid, cells):
    torch.manual_seed(0)
    mask = block_masking(16, grid, cells, 0.6, torch.device("cpu"))
    rows, columns = grid
    assert mask.shape == (16, rows * columns)
    blocks = mask.reshape(16, rows // cells, cells, columns // cells, cells)
    assert torch.all(blocks == blocks[:, :, :1, :, :1]), "every block must be wholly kept or wholly removed"
    expected = removed_block_count((rows // cells) * (columns // cells), 0.6)
    assert torch.all(coarse_blocks(mask, grid, cells).sum(dim=(1, 2)) == expected)
    assert torch.all(mask.sum(dim=1) == expected * cells * cells)


@pytest.mark.parametrize(("grid", "cells"), [((5, 7), 2), ((3, 5), 2), ((7, 4), 3)])
def test_block_mask_on_grids_that_are_not_block_multiples(grid, cells):
    """Partial last block row/column: still constant per (cropped) block, count of removed blocks exact."""
    torch.manual_seed(0)
    rows, columns = grid
    mask = block_masking(16, grid, cells, 0.6, torch.device("cpu")).reshape(16, rows, columns)
    block_rows, block_columns = math.ceil(rows / cells), math.ceil(columns / cells)
    removed = torch.zeros(16)
    for block_row in range(block_rows):
        for block_column in range(block_columns):
            cell = mask[
                :, block_row * cells : (block_row + 1) * cells, block_column * cells : (block_column + 1) * cells
            ]
            assert torch.all(cell == cell[:, :1, :1])
            removed += cell[:, 0, 0]
    assert torch.all(removed == removed_block_count(block_rows * block_columns, 0.6))


def test_block_mask_ratio_is_about_sixty_percent():
    torch.manual_seed(0)
    mask = block_masking(64, (14, 14), 2, 0.6, torch.device("cpu"))  # 224 px, 32 px blocks: 7x7 blocks
    assert mask.mean(dim=1).unique().tolist() == pytest.approx([30 / 49])
    assert abs(mask.mean().item() - 0.6) < 0.02


def test_block_mask_differs_between_samples_and_covers_every_block():
    torch.manual_seed(0)
    mask = block_masking(200, (8, 8), 2, 0.6, torch.device("cpu"))
    assert len({tuple(row.tolist()) for row in mask}) > 150
    frequency = coarse_blocks(mask, (8, 8), 2).mean(dim=0)
    assert frequency.min() > 0.35, "blocks must be drawn uniformly"
    assert frequency.max() < 0.85, "blocks must be drawn uniformly"


@pytest.mark.parametrize(("blocks_grid", "ratio", "expected"), [((2, 1), 0.6, 1), ((2, 2), 0.95, 3), ((3, 3), 0.01, 1)])
def test_block_mask_never_removes_all_or_nothing(blocks_grid, ratio, expected):
    mask = block_masking(4, blocks_grid, 1, ratio, torch.device("cpu"))
    assert torch.all(mask.sum(dim=1) == expected)


# ---------------------------------------------------------------------------------------------------- forward


def test_mask_token_replaces_removed_embeddings_before_positions():
    simmim = make_simmim()
    seen = []
    handle = simmim.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    images = torch.rand(3, 1, 64, 96)
    try:
        output = simmim(images)
    finally:
        handle.remove()
    tokens = seen[0][:, 1:]
    assert tokens.shape == (3, 24, 64), "SimMIM's encoder sees every patch"
    with torch.no_grad():
        embedded, grid = simmim.encoder.embed_patches(images)
        positions = simmim.encoder.position_embedding(grid)
    removed = output.mask.bool()
    assert removed.any()
    assert (~removed).any()
    expected = torch.where(removed.unsqueeze(-1), simmim.mask_token.detach(), embedded) + positions
    assert torch.allclose(tokens, expected, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96), (48, 80)])
def test_forward_shapes(height, width):
    simmim = make_simmim()
    output = simmim(torch.rand(2, 1, height, width))
    grid = (height // 16, width // 16)
    assert output.grid == grid
    assert output.mask.shape == (2, grid[0] * grid[1])
    assert output.prediction.shape == (2, grid[0] * grid[1], 256)
    assert torch.isfinite(output.loss)


def test_loss_gradient_reaches_removed_pixels_only():
    """d loss / d reconstruction is zero on every visible pixel."""
    simmim = make_simmim()
    captured = []

    def keep_gradient(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = simmim.head.register_forward_hook(keep_gradient)
    try:
        output = simmim(torch.rand(2, 1, 64, 96))
        output.loss.backward()
    finally:
        handle.remove()
    gradient = patchify(captured[0].grad.abs(), 16).sum(dim=-1)  # (B, N)
    removed = output.mask.bool()
    assert torch.all(gradient[~removed] == 0)
    assert torch.all(gradient[removed] > 0)


def test_loss_is_mean_l1_over_removed_pixels():
    simmim = make_simmim()
    images = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        output = simmim(images)
    target = patchify(images, 16)
    removed = output.mask.unsqueeze(-1)

    def recomputed(prediction: torch.Tensor) -> torch.Tensor:
        return ((prediction - target).abs() * removed).sum() / (removed.sum() * 256)

    assert torch.allclose(output.loss, recomputed(output.prediction), rtol=1e-4)
    changed = output.prediction + 5.0 * (1 - removed)  # perturb visible pixels only
    assert torch.allclose(recomputed(changed), output.loss, rtol=1e-4)


def test_reconstruct_keeps_visible_patches_exactly():
    simmim = make_simmim()
    images = torch.rand(2, 1, 64, 64)
    torch.manual_seed(3)
    pictures = simmim.reconstruct(images)
    torch.manual_seed(3)
    with torch.no_grad():
        mask = simmim(images).mask
    visible = (mask == 0).unsqueeze(-1).expand(-1, -1, 256)
    assert torch.equal(patchify(pictures.reconstruction, 16)[visible], patchify(images, 16)[visible])
    assert torch.all(patchify(pictures.masked, 16)[~visible] == MASKED_FILL)
    assert pictures.reconstruction.min() >= 0
    assert pictures.reconstruction.max() <= 1


def test_mask_patch_size_equal_to_patch_size_masks_single_patches():
    simmim = make_simmim(mask_patch_size=16)
    assert simmim.cells_per_block == 1
    assert simmim(torch.rand(2, 1, 64, 64)).mask.sum(dim=1).tolist() == [10.0, 10.0]  # round(16 * 0.6)


# ---------------------------------------------------------------------------------------------------- options


def test_default_options_are_simmim_reference():
    assert SimMIMOptions() == SimMIMOptions(mask_ratio=0.6, mask_patch_size=32)
    assert make_simmim().cells_per_block == 2


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"mask_patch_size": 24}, "mask_patch_size"),
        ({"mask_patch_size": 8}, "mask_patch_size"),
        ({"mask_patch_size": 0}, "mask_patch_size"),
        ({"mask_ratio": 1.2}, "mask_ratio"),
        ({"mask_size": 32}, "mask_size"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(options, key):
    with pytest.raises(InvalidConfigError) as caught:
        build_objective("simmim", VisionTransformer(SMALL), options)
    assert key in caught.value.message
    assert "'simmim'" in caught.value.message


def test_an_image_holding_one_mask_block_is_a_clear_error():
    """A 32 px image is one 32 px block: nothing could be both masked and visible (the loss would be a silent 0)."""
    with pytest.raises(InvalidArgumentError, match="1 mask block"):
        make_simmim()(torch.rand(1, 1, 32, 32))
