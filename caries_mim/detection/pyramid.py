"""ViTDet's simple feature pyramid: three detection levels from the single stride-p map of a plain ViT.

A ViT keeps one resolution throughout, so instead of an FPN over backbone stages the pyramid is built from the last
patch-token map alone (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022): a 2x2
transposed convolution for stride p/2, the map itself for stride p, 2x2 max pooling for stride 2p. For p = 16 the
strides are 8, 16 and 32: the stride-8 level is what resolves caries of 15-30 px on a 512 px image. A fourth level
at stride p/4 is ViTDet's 4x branch: two 2x2 transposed convolutions with LayerNorm and GELU between them.
"""

from __future__ import annotations

import torch
from torch import nn


def pyramid_strides(patch_size: int, levels: int) -> tuple[int, ...]:
    """Strides in pixels of the pyramid's levels, finest first: p/2, p, 2p, with p/4 before them for four levels."""
    three = (patch_size // 2, patch_size, 2 * patch_size)
    return three if levels == 3 else (patch_size // 4, *three)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map at every position (ViTDet's "LN" for conv features).

    Unlike GroupNorm(1, C) it does not mix statistics across positions, so a level's features at one place do not
    depend on how much black padding the image has elsewhere.
    """

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return super().forward(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _output_block(in_channels: int, channels: int) -> nn.Sequential:
    """ViTDet's per-level head: 1x1 conv to ``channels``, LN, 3x3 conv, LN (no biases: each conv feeds a norm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
        ChannelLayerNorm(channels, eps=1e-6),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        ChannelLayerNorm(channels, eps=1e-6),
    )


class SimpleFeaturePyramid(nn.Module):
    """(B, D, h, w) patch-token map at stride p -> three (B, C, ., .) maps at strides p/2, p and 2p (four with
    p/4 first).

    Args:
        in_channels: D, the encoder width.
        channels: C, the width of every output level.
        levels: 3 or 4.
        prior_widths: channels of extra per-level maps (the spatial prior,
            :mod:`caries_mim.detection.spatial_prior`), finest first, concatenated with each rescaled ViT map before
            the level's output block; empty for the plain pyramid.

    The input's h and w must be even (images divisible by 2p, which the detector's padding guarantees) so that
    the stride-2p level tiles the image exactly and its anchors line up.
    """

    def __init__(
        self, in_channels: int, channels: int = 256, levels: int = 3, prior_widths: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        self.out_channels = channels
        # ViTDet halves the width at each 2x upsampling: the map has 4x the positions.
        rescale: list[nn.Module] = [
            nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ]
        widths = [in_channels // 2, in_channels, in_channels]
        if levels == 4:
            rescale.insert(
                0,
                nn.Sequential(
                    nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2),
                    ChannelLayerNorm(in_channels // 2, eps=1e-6),
                    nn.GELU(),
                    nn.ConvTranspose2d(in_channels // 2, in_channels // 4, kernel_size=2, stride=2),
                ),
            )
            widths.insert(0, in_channels // 4)
        if prior_widths and len(prior_widths) != levels:
            raise ValueError(f"prior_widths needs one width per level ({levels}), got {list(prior_widths)}")
        self.prior_widths = tuple(prior_widths)
        self.rescale = nn.ModuleList(rescale)
        self.output = nn.ModuleList(
            [
                _output_block(width + extra, channels)
                for width, extra in zip(widths, prior_widths or (0,) * levels, strict=True)
            ]
        )

    def forward(self, feature_map: torch.Tensor, priors: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """(B, D, h, w) -> [(B, C, 2h, 2w), (B, C, h, w), (B, C, h/2, w/2)], finest level first, with
        (B, C, 4h, 4w) before them for four levels.

        ``priors``: with ``prior_widths``, one (B, prior_widths[i], ., .) map per level at that level's size."""
        if bool(priors) != bool(self.prior_widths):
            raise ValueError("priors must be given exactly when the pyramid was built with prior_widths")
        levels = [rescale(feature_map) for rescale in self.rescale]
        if priors:
            levels = [torch.cat([level, prior], dim=1) for level, prior in zip(levels, priors, strict=True)]
        return [output(level) for output, level in zip(self.output, levels, strict=True)]
