"""Non-maximum suppression for a whole batch of images at once.

MONAI's ``non_max_suppression`` (behind ``BoxSelector`` and ``RetinaNetDetector``) is a Python loop per image with
one pass per kept box, each pass re-running ``box_iou``'s conversions and NaN checks (a device sync on a GPU). A
detector whose boxes score above the selection threshold keeps up to ``detections_per_image`` of them, so that loop
cost 73 ms per image on two CPU cores (a quarter of the demo model's prediction) and grew with every image of a
service micro-batch. :func:`batched_nms` makes the same greedy choices for all images of a batch together, from a
matrix of overlaps computed in a few tensor operations. It shifts each class's boxes apart as MONAI's
``batched_nms`` does and computes the IoU with MONAI's ``box_iou`` formula in the same order of operations, so the
boxes kept are MONAI's, bit for bit (see the tests, which compare on random boxes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from caries_mim.detection.box_overlap import pairwise_iou

#: The first prefix of ranks settled (see padded_nms) is this many times ``max_kept``.
_FIRST_PREFIX_PER_KEPT = 6
#: Most (image, kept rank, candidate rank) triples whose overlap is computed at once (about 16 MB per float
#: temporary); past 2,048 ranks one image at a time, P * P floats each.
_PAIRS_PER_GROUP = 1 << 22


def batched_nms(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    iou_threshold: float,
    max_kept: int,
) -> list[torch.Tensor]:
    """Greedy per-class non-maximum suppression, for several images in one go: MONAI's ``batched_nms`` per image.

    For each image, candidates are visited from the highest score down (ties: lower index first, MONAI's stable
    sort); a candidate is kept unless a kept candidate of the same label overlaps it with IoU > ``iou_threshold``;
    the visit stops after ``max_kept`` boxes. As in MONAI, labels are kept apart by shifting each label's boxes by
    ``label * (largest coordinate + 1)`` before the overlaps are computed.

    Args:
        boxes: per image, (N_i, 4) finite float ``[a0, b0, a1, b1]`` with a1 >= a0 and b1 >= b0 (either axis order,
            the same for every box), all on one device.
        scores: per image, (N_i,) float.
        labels: per image, (N_i,) int64, >= 0.
        iou_threshold: overlap in [0, 1] above which the lower-scoring box of a pair is dropped.
        max_kept: most boxes kept per image; < 1 means no limit (MONAI's ``max_proposals=-1``).
    Returns:
        per image, int64 (K_i,) indices into its candidates, by descending score.
    Raises:
        ValueError: the three sequences differ in length, or a box is not finite (MONAI's ``box_iou`` refuses
            those too).
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
    if not bool(torch.isfinite(padded_boxes).all()):
        raise ValueError("boxes must be finite: NaN or infinite coordinates given")
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
        boxes: (B, W, 4) float32, as :func:`batched_nms` (entries outside ``valid`` may hold anything finite).
        scores: (B, W) float32.
        labels: (B, W) int64.
        valid: (B, W) bool: which entries are candidates; the others are ignored wherever they are in the row.
        iou_threshold, max_kept: as :func:`batched_nms`.
    Returns:
        per image, int64 (K_i,) positions in its row, by descending score (ties: lower position first).
    """
    images, width = scores.shape
    device = scores.device
    if images == 0:
        return []
    limit = max_kept if max_kept >= 1 else max(width, 1)
    # Non-candidates sort among the lowest scores, candidates keep their relative order (the stable sort): the
    # order MONAI sorts an image's candidates in, with the others interleaved.
    ranked = scores.to(torch.float32).masked_fill(~valid, float("-inf"))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)  # (B, W): position at each rank
    rows = torch.arange(images, device=device)[:, None]
    sorted_valid = valid[rows, order]
    sorted_boxes = _class_shifted(boxes.to(torch.float32), labels, valid)[rows, order]
    # Ranks past a row's last candidate need never be settled.
    extents = torch.where(sorted_valid, torch.arange(1, width + 1, device=device), 0).amax(dim=1).tolist()

    # Greedy NMS decides a candidate from the higher-ranked ones only, so the first P ranks can be settled alone.
    # An image is done once it has max_kept boxes or P covers its last candidate; the others go on with 2P. A busy
    # image (the demo model's: 100 kept from 2,000) settles in the first prefix; one with fewer survivors than
    # max_kept is settled whole, in one to three prefixes.
    kept: dict[int, np.ndarray] = {row: np.zeros(0, dtype=np.int64) for row in range(images) if extents[row] == 0}
    pending = [row for row in range(images) if extents[row] > 0]
    prefix = min(width, _FIRST_PREFIX_PER_KEPT * limit)
    while pending:
        kept_in_prefix = _greedy(
            _suppression(sorted_boxes[pending, :prefix], iou_threshold),
            sorted_valid[pending, :prefix].cpu().numpy(),
            limit,
        )
        still_pending = []
        for row, ranks in zip(pending, kept_in_prefix, strict=True):
            if len(ranks) < limit and extents[row] > prefix:
                still_pending.append(row)
            else:
                kept[row] = ranks
        pending, prefix = still_pending, min(width, 2 * prefix)
    return [order[row, torch.as_tensor(kept[row], dtype=torch.long, device=device)] for row in range(images)]


def _class_shifted(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MONAI's batched_nms separation of labels: each box moved by ``label * (largest coordinate + 1)``, the
    largest coordinate over the image's candidates, so boxes of different labels never overlap.

    Args:
        boxes: (B, W, 4) float32; labels: (B, W) int64; valid: (B, W) bool.
    Returns:
        (B, W, 4) float32.
    """
    largest = boxes.masked_fill(~valid[..., None], float("-inf")).amax(dim=(1, 2))  # (B,)
    largest = torch.where(valid.any(dim=1), largest, torch.zeros_like(largest))
    offsets = labels.to(boxes.dtype) * (largest[:, None] + 1)
    return boxes + offsets[..., None]


def _suppression(boxes: torch.Tensor, iou_threshold: float) -> np.ndarray:
    """Which box would suppress which, were it kept.

    Args:
        boxes: (B, P, 4) float32, by descending score, labels already shifted apart (:func:`_class_shifted`).
    Returns:
        (B, P, P) bool on the host: ``[b, k, c]`` is True when rank k is above rank c (k < c) and their IoU is
        above the threshold.
    """
    count, prefix = boxes.shape[:2]
    above = torch.ones((prefix, prefix), dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    group = max(1, _PAIRS_PER_GROUP // (prefix * prefix))
    parts = []
    for first in range(0, count, group):
        members = boxes[first : first + group]  # (G, P, 4)
        # MONAI's box_iou of kept rank k (row) and candidate rank c (column); the same bits either way round.
        overlaps = pairwise_iou(members, members).gt(iou_threshold)
        overlaps &= above
        parts.append(overlaps)
    # (B, P, P) bools go to the host once per prefix: 5.8 MB for 16 images at the first prefix of 600.
    return torch.cat(parts).cpu().numpy()


def _greedy(suppression: np.ndarray, alive: np.ndarray, max_kept: int) -> list[np.ndarray]:
    """The greedy pass over a suppression matrix (see :func:`_suppression`): per image, the ranks kept, ascending.

    Args:
        suppression: (B, P, P) bool.
        alive: (B, P) bool, which ranks are candidates (modified).
    """
    images, prefix = alive.shape
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
