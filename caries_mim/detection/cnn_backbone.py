"""A convolutional yardstick backbone: MONAI's ResNet under a small feature pyramid network, the same heads.

The detector's product is the ViT encoder that masked image modeling pretrains. A CNN from scratch answers the
question every ablation needs first: what do these data and this training budget allow a detector to reach? It
runs under exactly the detector the ViT does (MONAI's RetinaNet heads, anchors, matching and losses, the same
strides p/2, p and 2p, and p/4 for a four-level pyramid), so the comparison isolates the backbone.

MONAI's own FPN helpers import torchvision, which does not install beside this project's torch, so the top-down
pathway (Lin et al., "Feature Pyramid Networks for Object Detection", 2017) is written out here: 1x1 lateral
convolutions on the stride-8, 16 and 32 stages (and the stride-4 stage for four levels), nearest-neighbour
upsampling added top-down, and a 3x3 convolution per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.nets import ResNet
from torch import nn

from caries_mim.detection.heads import keep_head_convs

#: Residual blocks per stage of the named ResNets, and their widths: half the classic ones (CPU-sized).
RESNET_LAYERS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}
RESNET_WIDTHS = (32, 64, 128, 256)


class ResNetFeaturePyramid(nn.Module):
    """(B, 1, H, W) images in [0, 1] -> [(B, C, H/8, W/8), (B, C, H/16, W/16), (B, C, H/32, W/32)], with
    (B, C, H/4, W/4) first for four levels.

    Args:
        name: a key of :data:`RESNET_LAYERS`.
        channels: C, the width of every level (and of MONAI's heads).
        input_mean, input_std: the standardization the ViT encoder applies, applied here too.
        levels: 3 or 4 pyramid levels.
    """

    def __init__(
        self, name: str, channels: int, input_mean: float = 0.0, input_std: float = 1.0, levels: int = 3
    ) -> None:
        super().__init__()
        self.resnet = ResNet(
            block="basic",
            layers=list(RESNET_LAYERS[name]),
            block_inplanes=list(RESNET_WIDTHS),
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            num_classes=1,
            feed_forward=False,
        )
        self.input_mean = input_mean
        self.input_std = input_std
        # layer2, layer3, layer4: strides 8, 16, 32; layer1 (stride 4) too for four levels.
        stage_widths = RESNET_WIDTHS[4 - levels :]
        self.lateral = nn.ModuleList(nn.Conv2d(width, channels, kernel_size=1) for width in stage_widths)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in stage_widths)
        #: Read by MONAI's RetinaNet to size its heads.
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.resnet
        x = (images - self.input_mean) / self.input_std
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))  # stride 4
        stages = [net.layer1(x)]  # stride 4
        for layer in (net.layer2, net.layer3, net.layer4):
            stages.append(layer(stages[-1]))
        stages = stages[len(stages) - len(self.lateral) :]
        # Top-down: each level adds the upsampled level above it.
        merged = [self.lateral[-1](stages[-1])]
        for lateral, stage in zip(self.lateral[-2::-1], stages[-2::-1], strict=True):
            merged.insert(0, lateral(stage) + F.interpolate(merged[0], size=stage.shape[-2:], mode="nearest"))
        return [output(level) for output, level in zip(self.output, merged, strict=True)]


class ResNetRetinaNet(RetinaNet):
    """MONAI's RetinaNet heads on :class:`ResNetFeaturePyramid`, the contract of the ViT network
    (:class:`~caries_mim.detection.network.ViTRetinaNet`) with strides 8, 16 and 32 (and 4 for four levels)."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        num_anchors: int,
        channels: int,
        input_mean: float,
        input_std: float,
        levels: int = 3,
        head_convs: int = 4,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=num_anchors,
            feature_extractor=ResNetFeaturePyramid(name, channels, input_mean, input_std, levels),
            size_divisible=32,
        )
        keep_head_convs(self, head_convs)
