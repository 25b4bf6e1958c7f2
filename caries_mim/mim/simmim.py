"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al. 2022), after microsoft/SimMIM.

The encoder sees every patch; removed ones have their embedding replaced by one learned mask token (before the
position embedding is added, as in SimMIM's ViT). Masks are drawn on a coarse grid of ``mask_patch_size`` pixels
(32 px, ratio 0.6) and upsampled to the patch grid, so whole blocks of anatomy disappear. The head is one linear
layer per token (1x1 convolution to p*p*C values, then pixel shuffle) and the loss is L1 on removed pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from caries_mim.errors import InvalidArgumentError
from caries_mim.mim.objective import MaskedImageObjective, MIMOutput
from caries_mim.mim.patches import mask_to_pixels, patchify
from caries_mim.models.vit import VisionTransformer


@dataclass(frozen=True)
class SimMIMOptions:
    """SimMIM hyper-parameters (the paper's ViT defaults)."""

    mask_ratio: float = 0.6
    mask_patch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size < 1:
            raise ValueError(f"mask_patch_size must be >= 1, got {self.mask_patch_size}")


def block_masking(
    batch: int, grid: tuple[int, int], cells_per_block: int, mask_ratio: float, device: torch.device
) -> torch.Tensor:
    """Per-sample random block mask on the patch grid.

    The grid is covered by ``ceil(rows / s) x ceil(columns / s)`` blocks of s = ``cells_per_block`` patches per
    side; exactly ``ceil(blocks * mask_ratio)`` blocks are removed per image (SimMIM's ``MaskGenerator`` count, kept
    below the total so something stays visible), then the block mask is upsampled to patches and cropped to the
    grid (a partial last block row/column only when the grid is not a multiple of s).

    Returns:
        (B, rows * columns) float, 1 = removed, row-major.
    """
    rows, columns = grid
    block_rows, block_columns = math.ceil(rows / cells_per_block), math.ceil(columns / cells_per_block)
    blocks = block_rows * block_columns
    if blocks < 2:
        raise InvalidArgumentError(
            f"a {rows}x{columns} patch grid holds {blocks} mask block(s) of {cells_per_block} patches: "
            "nothing could be both masked and visible (use larger images or a smaller mask_patch_size)"
        )
    removed = min(blocks - 1, math.ceil(blocks * mask_ratio))
    order = torch.rand(batch, blocks, device=device).argsort(dim=1)
    coarse = torch.zeros(batch, blocks, device=device)
    coarse.scatter_(1, order[:, :removed], 1.0)
    coarse = coarse.reshape(batch, block_rows, block_columns)
    fine = coarse.repeat_interleave(cells_per_block, dim=1).repeat_interleave(cells_per_block, dim=2)
    return fine[:, :rows, :columns].reshape(batch, rows * columns)


class SimMIM(MaskedImageObjective):
    """SimMIM around a :class:`~caries_mim.models.VisionTransformer`."""

    name = "simmim"
    Options = SimMIMOptions

    def __init__(self, encoder: VisionTransformer, options: SimMIMOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options = options or SimMIMOptions()
        config = encoder.config
        if options.mask_patch_size % config.patch_size:
            raise ValueError(
                f"mask_patch_size {options.mask_patch_size} must be a multiple of the patch size {config.patch_size}"
            )
        self.cells_per_block = options.mask_patch_size // config.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.patch_size**2 * config.in_channels, kernel_size=1),
            nn.PixelShuffle(config.patch_size),
        )

    def forward(self, images: torch.Tensor) -> MIMOutput:
        encoder = self.encoder
        tokens, grid = encoder.embed_patches(images)  # (B, N, D)
        mask = block_masking(tokens.shape[0], grid, self.cells_per_block, self.options.mask_ratio, tokens.device)
        removed = mask.unsqueeze(-1).to(tokens.dtype)  # (B, N, 1)
        tokens = tokens * (1 - removed) + self.mask_token.to(tokens.dtype) * removed
        tokens = tokens + encoder.position_embedding(grid)
        features = encoder.encode(tokens, grid).feature_map()  # (B, D, rows, columns)
        reconstruction = self.head(features)  # (B, C, H, W)

        pixel_mask = mask_to_pixels(mask, grid, encoder.patch_size)  # (B, 1, H, W)
        error = (reconstruction.float() - images.float()).abs() * pixel_mask
        loss = error.sum() / (pixel_mask.sum() * images.shape[1] + 1e-5)
        return MIMOutput(loss=loss, mask=mask, prediction=patchify(reconstruction, encoder.patch_size), grid=grid)
