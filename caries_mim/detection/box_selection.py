"""Non-maximum suppression for a whole batch of images at once.

MONAI's ``non_max_suppression`` (behind ``BoxSelector`` and ``RetinaNetDetector``) is a Python loop per image with
one pass per kept box, each pass re-running ``box_iou``'s conversions and NaN checks (a device sync on a GPU). A
detector whose boxes score above the selection threshold keeps up to ``detections_per_image`` of them, so that loop
cost 73 ms per image on two CPU cores (a quarter of the demo model's prediction) and grew with every image of a
service micro-batch. :func:`batched_nms` makes the same greedy choices for all images of a batch together: one pass
per kept box of the busiest image, each a handful of tensor operations over the whole batch. Its IoU is MONAI's
``box_iou`` formula, in the same order of operations, so the boxes kept are MONAI's (see the tests, which compare).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The first prefix of ranks settled (see batched_nms) is this many times ``max_kept``.
_FIRST_PREFIX_PER_KEPT = 6
#: Most (image, kept rank, candidate rank) triples whose overlap is computed at once.
_PAIRS_PER_GROUP = 1 << 22
#: MONAI's box_iou adds this to the union (``torch.finfo(float32).eps``) so empty boxes give 0, not NaN.
_UNION_EPS = torch.finfo(torch.float32).eps


def batched_nms(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    iou_threshold: float,
    max_kept: int,
) -> list[torch.Tensor]:
    """Greedy per-class non-maximum suppression, for several images in one go.

    For each image, candidates are visited from the highest score down (ties: lower index first, MONAI's stable
    sort); a candidate is kept unless a kept candidate of the same label overlaps it with IoU > ``iou_threshold``;
    the visit stops after ``max_kept`` boxes. This is MONAI's ``batched_nms`` per image, except that labels are
    kept apart by comparing them instead of by shifting each class's boxes far away (which rounds the shifted
    coordinates in float32).

    Args:
        boxes: per image, (N_i, 4) float ``[a0, b0, a1, b1]`` with a1 >= a0 and b1 >= b0 (either axis order,
            the same for every box), all on one device.
        scores: per image, (N_i,) float.
        labels: per image, (N_i,) int64.
        iou_threshold: overlap in [0, 1] above which the lower-scoring box of a pair is dropped.
        max_kept: most boxes kept per image (>= 1).
    Returns:
        per image, int64 (K_i,) indices into its candidates, K_i <= max_kept, by descending score.
    """
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{len(boxes)} box sets, {len(scores)} score sets and {len(labels)} label sets")
    counts = [int(image_boxes.shape[0]) for image_boxes in boxes]
    if not counts:
        return []
    device = boxes[0].device
    width = max(counts)
    padded_boxes = torch.zeros((len(counts), width, 4), dtype=torch.float32, device=device)
    padded_scores = torch.zeros((len(counts), width), dtype=torch.float32, device=device)
    padded_labels = torch.zeros((len(counts), width), dtype=torch.long, device=device)
    for row, (image_boxes, image_scores, image_labels) in enumerate(zip(boxes, scores, labels, strict=True)):
        padded_boxes[row, : counts[row]] = image_boxes.to(torch.float32)
        padded_scores[row, : counts[row]] = image_scores.to(torch.float32)
        padded_labels[row, : counts[row]] = image_labels
    valid = torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    return padded_nms(padded_boxes, padded_scores, padded_labels, valid, iou_threshold, max_kept)


def padded_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    max_kept: int,
) -> list[torch.Tensor]:
    """:func:`batched_nms` on candidates already laid out in rows, one row per image.

    Args:
        boxes: (B, W, 4) float32, as :func:`batched_nms`.
        scores: (B, W) float32.
        labels: (B, W) int64.
        valid: (B, W) bool: which entries are candidates (the others are ignored wherever they are in the row).
    Returns:
        per image, int64 (K_i,) positions in its row, by descending score (ties: lower position first).
    """
    if max_kept < 1:
        raise ValueError(f"max_kept must be >= 1, got {max_kept}")
    images, width = scores.shape
    device = scores.device
    if images == 0:
        return []
    # Non-candidates sort last, so each row's candidates keep their own relative order (the stable sort) in front.
    ranked = scores.to(torch.float32).masked_fill(~valid, float("-inf"))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)  # (B, W): position at each rank
    rows = torch.arange(images, device=device)[:, None]
    sorted_boxes = boxes.to(torch.float32)[rows, order]
    sorted_labels = labels[rows, order]
    counts = valid.sum(dim=1).tolist()

    # Greedy NMS decides a candidate from the higher-ranked ones only, so the first P ranks can be settled alone;
    # they are widened until each image has max_kept boxes or no candidates left. Kept boxes cluster near the top
    # (the 100th of a busy image is near rank 500 of 2,000), so usually one prefix does.
    kept: dict[int, np.ndarray] = {row: np.zeros(0, dtype=np.int64) for row in range(images) if counts[row] == 0}
    pending = [row for row in range(images) if counts[row] > 0]
    prefix = min(width, _FIRST_PREFIX_PER_KEPT * max_kept)
    while pending:
        kept_in_prefix = _greedy(
            _suppression(sorted_boxes[pending, :prefix], sorted_labels[pending, :prefix], iou_threshold),
            [min(counts[row], prefix) for row in pending],
            max_kept,
        )
        still_pending = []
        for row, ranks in zip(pending, kept_in_prefix, strict=True):
            if len(ranks) < max_kept and counts[row] > prefix:
                still_pending.append(row)
            else:
                kept[row] = ranks
        pending, prefix = still_pending, min(width, 2 * prefix)
    return [order[row, torch.as_tensor(kept[row], dtype=torch.long, device=device)] for row in range(images)]


def _suppression(boxes: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> np.ndarray:
    """Which box would suppress which, were it kept.

    Args:
        boxes: (B, P, 4) float32, by descending score.
        labels: (B, P) int64.
    Returns:
        (B, P, P) bool on the host: ``[b, k, c]`` is True when rank k is above rank c (k < c), both have the same
        label and their IoU is above the threshold.
    """
    count, prefix = labels.shape
    above = torch.ones((prefix, prefix), dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    # In groups of images small enough that the (group, P, P) float temporaries stay near 16 MB.
    group = max(1, _PAIRS_PER_GROUP // (prefix * prefix))
    parts = []
    for first in range(0, count, group):
        x0, y0, x1, y1 = boxes[first : first + group].unbind(dim=-1)  # (G, P) each
        group_labels = labels[first : first + group]
        # MONAI's _box_inter_union and box_iou with boxes1 = the candidates (last axis), boxes2 = the kept box.
        areas = (x1 - x0) * (y1 - y0)
        width = torch.minimum(x1[:, None, :], x1[:, :, None]) - torch.maximum(x0[:, None, :], x0[:, :, None])
        height = torch.minimum(y1[:, None, :], y1[:, :, None]) - torch.maximum(y0[:, None, :], y0[:, :, None])
        inter = width.clamp_(min=0).mul_(height.clamp_(min=0))
        union = (areas[:, None, :] + areas[:, :, None]).sub_(inter)
        overlaps = inter.div_(union.add_(_UNION_EPS)).gt(iou_threshold)
        overlaps &= group_labels[:, :, None] == group_labels[:, None, :]
        overlaps &= above
        parts.append(overlaps)
    return torch.cat(parts).cpu().numpy()


def _greedy(suppression: np.ndarray, counts: Sequence[int], max_kept: int) -> list[np.ndarray]:
    """The greedy pass over a suppression matrix (see :func:`_suppression`): per image, the ranks kept, ascending.

    Args:
        counts: per image, how many of the P ranks are real candidates (the rest is padding).
    """
    images, prefix = suppression.shape[:2]
    alive = np.arange(prefix)[None, :] < np.asarray(counts)[:, None]  # (B, P)
    kept: list[list[int]] = [[] for _ in range(images)]
    for rank in range(prefix):
        keeping = np.flatnonzero(alive[:, rank])
        if keeping.size == 0:
            if not alive.any():
                break
            continue
        for image in keeping.tolist():
            kept[image].append(rank)
            if len(kept[image]) == max_kept:
                alive[image] = False
        alive[keeping] &= ~suppression[keeping, rank]
    return [np.asarray(ranks, dtype=np.int64) for ranks in kept]
