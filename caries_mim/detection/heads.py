"""The length of MONAI's RetinaNet heads, for both detector networks (ViT and CNN yardstick)."""

from __future__ import annotations

from monai.apps.detection.networks.retinanet_network import RetinaNet
from torch import nn


def keep_head_convs(network: RetinaNet, blocks: int) -> None:
    """Keep the first ``blocks`` (1 to 4) of the four convolution blocks (3x3 convolution, GroupNorm, ReLU) that
    MONAI builds into each RetinaNet head before its output convolution.

    MONAI's heads have RetinaNet's four blocks and no argument for it. With a stride-4 pyramid level they are
    most of a fine-tuning step's cost on a CPU (benchmarks/detector_step.py); shorter towers are the usual cut
    (e.g. FCOS/ATSS ablations, and lighter one-stage heads). Each block is initialized as MONAI does; only the
    tower's length changes.
    """
    for head in (network.classification_head, network.regression_head):
        layers = list(head.conv.children())
        if len(layers) % 3 or not 1 <= blocks <= len(layers) // 3:
            raise ValueError(f"cannot keep {blocks} of the head's {len(layers) // 3} convolution blocks")
        head.conv = nn.Sequential(*layers[: 3 * blocks])
