"""A convolutional yardstick backbone: MONAI's ResNet under a small feature pyramid network, the same heads.

The detector's product is the ViT encoder that masked image modeling pretrains. A CNN from scratch answers the
question every ablation needs first: what do these data and this training budget allow a detector to reach? It
runs under exactly the detector the ViT does (MONAI's RetinaNet heads, anchors, matching and losses, the same
three strides p/2, p and 2p), so the comparison isolates the backbone.

MONAI's own FPN helpers import torchvision, which does not install beside this project's torch, so the top-down
pathway (Lin et al., "Feature Pyramid Networks for Object Detection", 2017) is written out here: 1x1 lateral
convolutions on the stride-8, 16 and 32 stages, nearest-neighbour upsampling added top-down, and a 3x3 convolution
per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.nets import ResNet
from torch import nn

#: Residual blocks per stage of the named ResNets, and their widths: half the classic ones (CPU-sized).
RESNET_LAYERS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}
RESNET_WIDTHS = (32, 64, 128, 256)


class ResNetFeaturePyramid(nn.Module):
    """(B, 1, H, W) images in [0, 1] -> [(B, C, H/8, W/8), (B, C, H/16, W/16), (B, C, H/32, W/32)].

    Args:
        name: a key of :data:`RESNET_LAYERS`.
        channels: C, the width of every level (and of MONAI's heads).
        input_mean, input_std: the standardization the ViT encoder applies, applied here too.
    """

    def __init__(self, name: str, channels: int, input_mean: float = 0.0, input_std: float = 1.0) -> None:
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
        stage_widths = RESNET_WIDTHS[1:]  # layer2, layer3, layer4: strides 8, 16, 32
        self.lateral = nn.ModuleList(nn.Conv2d(width, channels, kernel_size=1) for width in stage_widths)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in stage_widths)
        #: Read by MONAI's RetinaNet to size its heads.
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.resnet
        x = (images - self.input_mean) / self.input_std
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))  # stride 4
        stride8 = net.layer2(net.layer1(x))
        stride16 = net.layer3(stride8)
        stride32 = net.layer4(stride16)
        top = self.lateral[2](stride32)
        middle = self.lateral[1](stride16) + F.interpolate(top, size=stride16.shape[-2:], mode="nearest")
        fine = self.lateral[0](stride8) + F.interpolate(middle, size=stride8.shape[-2:], mode="nearest")
        return [output(level) for output, level in zip(self.output, (fine, middle, top), strict=True)]


class ResNetRetinaNet(RetinaNet):
    """MONAI's RetinaNet heads on :class:`ResNetFeaturePyramid`, the contract of the ViT network
    (:class:`~caries_mim.detection.network.ViTRetinaNet`) with strides 8, 16 and 32."""

    def __init__(
        self, name: str, num_classes: int, num_anchors: int, channels: int, input_mean: float, input_std: float
    ) -> None:
        super().__init__(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=num_anchors,
            feature_extractor=ResNetFeaturePyramid(name, channels, input_mean, input_std),
            size_divisible=32,
        )
