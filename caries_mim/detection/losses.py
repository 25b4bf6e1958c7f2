"""The classification loss of RetinaNet as its paper defines it, built on MONAI's focal loss.

MONAI's ``RetinaNetDetector`` hands its classification loss the logits and one-hot targets of the anchors it
trains on, and reduces them with the loss's own reduction. RetinaNet (Lin et al., 2017) instead sums the focal
loss over every anchor and class and divides by the number of anchors assigned to a lesion: a mean over all
anchors would shrink the loss by the ~10^4 background anchors of a radiograph and let the box regression term
(a mean over positives only) dominate the sum. This wrapper is that normalization and nothing else.
"""

from __future__ import annotations

import torch
from monai.losses import FocalLoss
from torch import nn


class FocalLossPerPositive(nn.Module):
    """Sigmoid focal loss summed over anchors and classes, divided by the number of positive anchors (at least 1).

    Args:
        gamma: focusing exponent (2.0 in RetinaNet): easy, confidently classified anchors are down-weighted.
        alpha: weight of the positive class in [0, 1] (0.25 in RetinaNet), or None for no class weighting.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25) -> None:
        super().__init__()
        # reduction="none" and a sum here: MONAI's "sum" first averages over the dimensions after (batch, class),
        # and for (N, C) input that empty list of dimensions means every dimension, so it would return the mean.
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, reduction="none", use_softmax=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, C) raw scores and ``targets`` (N, C) one-hot in {0, 1} of the N trained anchors -> scalar
        loss."""
        positives = targets.sum().clamp(min=1.0)
        return self.focal(logits, targets.to(logits.dtype)).sum() / positives
