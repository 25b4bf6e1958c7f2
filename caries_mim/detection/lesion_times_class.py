"""Class scores as P(lesion) x P(class | lesion): one lesion score per anchor and a softmax over the classes.

RetinaNet scores every class with its own sigmoid, trained with the focal loss: an anchor on a deep lesion is a
negative for ``caries`` and an anchor on a shallow one a negative for ``deep_caries``. When the depth of a lesion is
hard to tell, both of its scores are pushed down, so the detector also loses confidence that there *is* a lesion,
and the lesion drops in the ranking of both classes. Depth classes of one finding are exclusive and share the
question "is this a lesion?", so here the head answers the two questions apart:

- channel ``C`` (the last) is the lesion logit, trained with the detector's focal loss against "matched to any
  lesion" over every anchor;
- channels ``0..C-1`` are class logits, trained with cross-entropy on the anchors matched to a lesion only;
- the score of class ``c`` is ``sigmoid(lesion) * softmax(classes)[c]``. An uncertain depth then splits one
  confident finding between the classes (each ranked by how likely it is) instead of erasing it.

This is the objectness-times-class factorization of YOLO-style detectors and of Faster R-CNN's two stages, on
MONAI's RetinaNet heads: the heads get ``C + 1`` outputs per anchor, MONAI's matching and one-hot targets are used
as they are (its one-hot rows mark the class channel of a matched anchor and leave channel ``C`` at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LesionTimesClassLoss(nn.Module):
    """Loss of a lesion-times-class head, in the place of MONAI's classification loss.

    Args:
        lesion_loss: binary loss of the lesion logit, called as ``lesion_loss(logits (N, 1), targets (N, 1))``
            (:class:`~caries_mim.detection.losses.FocalLossPerPositive` in the detector).
        class_weight: weight of the class cross-entropy (a mean over the matched anchors) in the sum.
    """

    def __init__(self, lesion_loss: nn.Module, class_weight: float = 1.0) -> None:
        super().__init__()
        self.lesion_loss = lesion_loss
        self.class_weight = class_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, C + 1): class logits then the lesion logit, of the N trained anchors; ``targets``
        (N, C + 1) MONAI's one-hot rows (a 1 in the class channel of each anchor matched to a lesion, zeros
        elsewhere; the last channel is never set) -> scalar loss."""
        class_targets = targets[:, :-1]
        matched = class_targets.sum(dim=1) > 0
        lesion = self.lesion_loss(logits[:, -1:], matched[:, None].to(logits.dtype))
        if not bool(matched.any()):
            # Keeps the class logits in the graph (DDP expects every parameter to receive a gradient).
            return lesion + 0.0 * logits[:, :-1].sum()
        classes = F.cross_entropy(logits[matched, :-1].float(), class_targets[matched].argmax(dim=1))
        return lesion + self.class_weight * classes.to(lesion.dtype)


def lesion_times_class_scores(logits: torch.Tensor) -> torch.Tensor:
    """(..., C + 1) head logits (class logits, then the lesion logit) -> (..., C) float32 scores in [0, 1]:
    ``sigmoid(lesion) * softmax(classes)``. The scores of one anchor sum to its lesion probability."""
    logits = logits.to(torch.float32)
    return torch.sigmoid(logits[..., -1:]) * torch.softmax(logits[..., :-1], dim=-1)
