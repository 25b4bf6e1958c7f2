"""Box voting after NMS, and the fusion of a mirrored inference pass with the plain one.

Greedy NMS keeps the best-scoring box of a cluster and throws the others away, yet the others are independent
estimates of the same lesion's extent: averaging them, weighted by score, places the box better (Gidaris and
Komodakis' box voting, 2015). A lesion's visible edge is fuzzy, so single estimates scatter; on the shipped reference
detector, voting at IoU 0.5 moved fresh-seed test AP50 from 0.802 to 0.817 with the same detections found, and
voting with a fused mirrored pass to 0.849, and with the upside-down and turned passes too to 0.860
(docs/detection_recipe.md, "Box fusion and test-time flips").

Test-time flipping runs the detector on the image and on its mirror (caries look the same mirrored; training flips
too), optionally upside down as well (a bitewing with its jaws swapped), and fuses the passes as weighted box fusion
does (Solovyev et al., 2021): clusters of same-class boxes that overlap at IoU >= the fusion threshold become one
box, the score-weighted mean of the members, scored by the mean over the passes of each pass's best member (0 for a
pass that missed it), so a detection every pass agrees on keeps its score and one only a single pass of two saw is
halved. The ``ensemble-boxes`` package implements WBF but pulls in pandas
and numba for it; the clusters here come from the NMS the detector already has (:func:`batched_nms`), which also
keeps the fusion on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caries_mim.detection.box_overlap import pairwise_iou
from caries_mim.detection.box_selection import batched_nms


def vote_boxes(
    kept_boxes: torch.Tensor,
    kept_labels: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Each kept box replaced by the score-weighted mean of the candidates of its class overlapping it.

    Args:
        kept_boxes: (K, 4) float ``[a0, b0, a1, b1]`` (either axis order, the same for all boxes), the boxes NMS
            kept; each is normally among ``boxes`` too, so it votes for itself.
        kept_labels: (K,) int64 class indices.
        boxes: (C, 4) float, every candidate NMS chose from.
        scores: (C,) float in [0, 1].
        labels: (C,) int64.
        iou_threshold: in (0, 1]: candidates overlapping a kept box at IoU >= this vote for it.
    Returns:
        (K, 4) in ``kept_boxes``' dtype. A kept box no candidate votes for (none of its class overlaps it enough,
        or their scores are all 0) stays as it was.
    """
    if kept_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        return kept_boxes.clone()
    members = _members(kept_boxes, kept_labels, boxes, labels, iou_threshold)
    return _weighted_mean(kept_boxes, torch.where(members, scores.to(torch.float32)[None, :], 0.0), boxes)


def _members(
    kept_boxes: torch.Tensor, kept_labels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, iou: float
) -> torch.Tensor:
    """(K, C) bool: candidate c is of kept box k's class and overlaps it at IoU >= ``iou``."""
    overlap = pairwise_iou(kept_boxes.to(torch.float32), boxes.to(torch.float32))
    return (overlap >= iou) & (kept_labels[:, None] == labels[None, :])


def _weighted_mean(kept_boxes: torch.Tensor, weights: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each kept box as the ``weights``-weighted (K, C) mean of ``boxes`` (C, 4); unweighted ones stay."""
    total = weights.sum(dim=1, keepdim=True)  # (K, 1)
    voted = (weights @ boxes.to(torch.float32)) / total.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, voted, kept_boxes.to(torch.float32)).to(kept_boxes.dtype)


def fuse_passes(
    passes: Sequence[dict[str, torch.Tensor]],
    *,
    iou_threshold: float,
    max_kept: int,
) -> dict[str, torch.Tensor]:
    """One set of detections from several inference passes over the same image (weighted box fusion).

    Args:
        passes: P >= 1 dicts with ``boxes`` (N_p, 4) float ``[x0, y0, x1, y1]`` in the same image's pixels,
            ``scores`` (N_p,) float in [0, 1] and ``labels`` (N_p,) int64, all on one device.
        iou_threshold: in (0, 1]: the clusters' heads are what NMS at this overlap keeps of all passes together,
            and a head's members are the boxes of its class overlapping it at IoU >= this.
        max_kept: most detections returned (the detector's ``detections_per_image``).
    Returns:
        ``boxes`` (K, 4) float32, ``scores`` (K,) float32 in [0, 1] descending, ``labels`` (K,) int64: per cluster,
        the score-weighted mean box of its members and the mean over passes of each pass's best member score.
    """
    if not passes:
        raise ValueError("need at least one inference pass to fuse")
    boxes = torch.cat([found["boxes"].to(torch.float32) for found in passes])
    scores = torch.cat([found["scores"].to(torch.float32) for found in passes])
    labels = torch.cat([found["labels"] for found in passes])
    origin = torch.cat(
        [torch.full((len(found["scores"]),), index, device=boxes.device) for index, found in enumerate(passes)]
    )
    if boxes.shape[0] == 0:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    (heads,) = batched_nms([boxes], [scores], [labels], iou_threshold, max_kept)
    head_boxes, head_labels = boxes[heads], labels[heads]
    member_scores = torch.where(_members(head_boxes, head_labels, boxes, labels, iou_threshold), scores[None, :], 0.0)
    fused_boxes = _weighted_mean(head_boxes, member_scores, boxes)
    # Each pass's best score among the cluster's members: (K, C) member scores, maximum within each pass.
    # A zero column per pass stands for "no member" (an empty maximum); scores are never negative.
    nothing = member_scores.new_zeros((member_scores.shape[0], 1))
    per_pass = torch.stack(
        [torch.cat([member_scores[:, origin == index], nothing], dim=1).amax(dim=1) for index in range(len(passes))]
    )  # (P, K)
    fused_scores = per_pass.mean(dim=0)
    order = torch.argsort(fused_scores, descending=True, stable=True)
    return {"boxes": fused_boxes[order], "scores": fused_scores[order], "labels": head_labels[order]}
