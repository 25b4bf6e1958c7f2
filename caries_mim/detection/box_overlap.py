"""Pairwise IoU of batched box sets with MONAI's ``box_iou`` arithmetic, for code that must agree with MONAI exactly.

MONAI's ``box_iou`` takes two unbatched sets and checks its result for NaN (a host synchronization on a GPU). The
batched NMS (:mod:`caries_mim.detection.box_selection`) and the batched anchor matching
(:mod:`caries_mim.detection.batched_loss`) replace MONAI loops and promise MONAI's results exactly, so both compute
the overlaps here, with MONAI's operations in MONAI's order, in float32.
"""

from __future__ import annotations

import torch

#: MONAI's box_iou adds this to the union (``torch.finfo(float32).eps``) so empty boxes give 0, not NaN.
UNION_EPS = torch.finfo(torch.float32).eps


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2``, batch by batch.

    Args:
        boxes1: (..., N, 4) float32 ``[a0, b0, a1, b1]`` with a1 >= a0 and b1 >= b0.
        boxes2: (..., M, 4) float32, the same axis order; leading dimensions broadcast against ``boxes1``'s.
    Returns:
        (..., N, M) float32 in [0, 1]: MONAI's ``_box_inter_union`` and ``box_iou`` for boxes1 = ``boxes1`` (the
        result is the same bits with the two sets swapped: the sums and products involved commute exactly).
    """
    a0, b0, a1, b1 = boxes1.unbind(dim=-1)  # (..., N) each
    c0, d0, c1, d1 = boxes2.unbind(dim=-1)  # (..., M) each
    area1 = (a1 - a0) * (b1 - b0)
    area2 = (c1 - c0) * (d1 - d0)
    width = torch.minimum(a1[..., :, None], c1[..., None, :]) - torch.maximum(a0[..., :, None], c0[..., None, :])
    height = torch.minimum(b1[..., :, None], d1[..., None, :]) - torch.maximum(b0[..., :, None], d0[..., None, :])
    intersection = width.clamp_(min=0).mul_(height.clamp_(min=0))
    union = (area1[..., :, None] + area2[..., None, :]).sub_(intersection)
    return intersection.div_(union.add_(UNION_EPS))
