"""ViT-Adapter's spatial prior: a small convolutional stem beside the ViT that gives each pyramid level fine detail.

A plain ViT sees the image through its patch embedding only: one token per p x p patch (0.96 mm at p = 16 and 0.06
mm/px), so an enamel lesion of 0.3-1 mm and the healthy proximal surface beside it can fall in the same token.
ViTDet's simple pyramid upsamples that map for its stride-p/2 and p/4 levels but cannot add detail the tokens never
held, and it has to learn locality the convolution gets for free. Measured here (docs/detection_recipe.md): from
random initialization the ViT reaches about half the AP50 of a ResNet-18 on the same pyramid and heads.

ViT-Adapter (Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023) pairs the plain ViT, the
one masked image modeling pretrains, with a "spatial prior module": a ResNet-style stem (three 3x3 convolutions,
the first with stride 2, then 2x max pooling, stride 4) and one stride-2 3x3 convolution per coarser level. Its
maps are injected into and extracted from the ViT by cross-attention. Here they join at the pyramid instead: each
level's ViT map is concatenated with the prior's map at the same stride before the level's output block (its 1x1
convolution mixes them). That keeps the encoder exactly the one MIM pretrained (no new layers inside it), and costs a
few small convolutions. The module is trained from scratch in fine-tuning, like the pyramid and heads.
"""

from __future__ import annotations

import torch
from torch import nn

#: Stride of the stem's output (ViT-Adapter's, and a ResNet's): the finest level the prior can serve.
STEM_STRIDE = 4


def servable_stride(stride: int) -> bool:
    """Whether the prior can give a map at ``stride``: the stem's stride times a power of two."""
    return stride >= STEM_STRIDE and not stride & (stride - 1)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm (as ViT-Adapter's and the ResNet yardstick's stems), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _stem(kind: str, width: int) -> nn.Sequential:
    """(B, 1, H, W) -> (B, width, H/4, W/4).

    ``vit_adapter``: ViT-Adapter's ResNet-style stem, three 3x3 convolutions (the first with stride 2) and 2x max
    pooling. Its two stride-1 convolutions run on the H/2 x W/2 map: on a CPU, at 256 px crops, they cost about a
    quarter of a whole fine-tuning step (benchmarks/detector_step.py).
    ``strided``: two stride-2 3x3 convolutions (to ``width // 2``, then ``width``) and one 3x3 convolution at
    stride 4: the same receptive field (15 px) and output shape, with only 16 channels at stride 2.
    """
    if kind == "vit_adapter":
        return nn.Sequential(
            _conv_bn_relu(1, width, stride=2),
            _conv_bn_relu(width, width, stride=1),
            _conv_bn_relu(width, width, stride=1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    if kind == "strided":
        return nn.Sequential(
            _conv_bn_relu(1, width // 2, stride=2),
            _conv_bn_relu(width // 2, width, stride=2),
            _conv_bn_relu(width, width, stride=1),
        )
    raise ValueError(f"unknown spatial prior stem {kind!r}")


class SpatialPriorModule(nn.Module):
    """(B, 1, H, W) images in [0, 1] -> one (B, C_s, H/s, W/s) map per requested stride s, finest first.

    Args:
        strides: the pyramid strides to serve, finest first; each a power of two times :data:`STEM_STRIDE`
            (4, 8, 16, 32 ...).
        width: C_s of the stride-4 map; every coarser map has twice that (as ViT-Adapter's 64 / 128 / 256 / 256,
            scaled down).
        input_mean, input_std: the standardization the ViT encoder applies, applied here too.
        stem: ``vit_adapter`` (ViT-Adapter's) or ``strided`` (the same stride-4 map from 4x fewer multiply-adds),
            see :func:`_stem`.

    H and W must be multiples of the coarsest stride (the detector's padding guarantees it), so each map tiles
    the image exactly like the ViT level it joins.
    """

    def __init__(
        self,
        strides: tuple[int, ...],
        width: int,
        input_mean: float = 0.0,
        input_std: float = 1.0,
        stem: str = "vit_adapter",
    ) -> None:
        super().__init__()
        if not all(map(servable_stride, strides)) or list(strides) != sorted(set(strides)):
            raise ValueError(
                f"spatial prior strides must be increasing powers of two >= {STEM_STRIDE}, got {list(strides)}"
            )
        self.strides = tuple(strides)
        self.input_mean = input_mean
        self.input_std = input_std
        self.stem = _stem(stem, width)
        # One stride-2 step per octave from 4 up to the coarsest requested stride.
        octaves = (max(strides) // STEM_STRIDE).bit_length() - 1
        widths = [width] + [2 * width] * octaves
        self.downsample = nn.ModuleList(_conv_bn_relu(widths[i], widths[i + 1], stride=2) for i in range(octaves))
        # Which of the stem's and downsampling steps' maps (stride 4, 8, 16 ...) each requested stride is.
        self._map_index = tuple((s // STEM_STRIDE).bit_length() - 1 for s in strides)
        #: Channels of each returned map, finest first (what the pyramid's output blocks add to their input).
        self.out_widths = tuple(widths[i] for i in self._map_index)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) -> [(B, out_widths[i], H / strides[i], W / strides[i])], finest first."""
        maps = [self.stem((images - self.input_mean) / self.input_std)]  # stride 4
        for step in self.downsample:
            maps.append(step(maps[-1]))
        return [maps[i] for i in self._map_index]
