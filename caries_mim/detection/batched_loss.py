"""RetinaNet training losses for a whole batch at once: MONAI's ATSS matching, targets and losses, batched.

MONAI's ``RetinaNetDetector.compute_loss`` matches anchors to boxes image by image (``ATSSMatcher``: centre
distances, a top-k per pyramid level, IoU statistics, a scatter) and then builds the classification targets and
decodes the box predictions image by image, with a NaN check per image and tensor. On a GPU each of those is a
small kernel or a host synchronization: about 5,600 launches and 670 synchronizations per step of 16 crops, 65-91%
of the step on an H200 (docs/benchmarks.md, "On an H200"). Here the same steps run on (B, ...) tensors: the images
of a batch share their anchors (one input tensor, one anchor grid), so the boxes are padded to the batch's most
boxes per image and masked, and every image is matched in one set of operations.

The arithmetic is MONAI's, in the same order (``boxes_center_distance``, ``box_iou``'s float32 intersection over
union plus epsilon from :mod:`caries_mim.detection.box_overlap`, the candidates' mean plus unbiased standard
deviation as threshold, the first best box per anchor), so the matches are MONAI's; the losses are the ones
MONAI's loss functions give on the same samples, summed in another order (see the tests, which compare both on
random batches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caries_mim.detection.box_overlap import pairwise_iou

#: MONAI's ``COMPUTE_DTYPE``: box arithmetic runs in float32 whatever the boxes' dtype.
_COMPUTE_DTYPE = torch.float32
#: MONAI's ``Matcher.BELOW_LOW_THRESHOLD``: the anchor is background.
BACKGROUND = -1
#: MONAI's ``Matcher.BETWEEN_THRESHOLDS``: the anchor is left out of the classification loss (here: it lies on an
#: ignore region).
IGNORED = -2


def pad_boxes(
    boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image boxes and labels as padded batch tensors.

    Args:
        boxes: B tensors (M_i, 4) float, ``[a0, b0, a1, b1]`` in the anchors' axis order, all on one device.
        labels: B tensors (M_i,) int64.
    Returns:
        boxes (B, M, 4) float32, labels (B, M) int64 and valid (B, M) bool, M = max M_i (at least 1); padded
        entries are zero boxes with label 0 and ``valid`` False.
    """
    width = max([int(image_boxes.shape[0]) for image_boxes in boxes] + [1])
    device = boxes[0].device
    padded = torch.zeros((len(boxes), width, 4), dtype=_COMPUTE_DTYPE, device=device)
    padded_labels = torch.zeros((len(boxes), width), dtype=torch.long, device=device)
    valid = torch.zeros((len(boxes), width), dtype=torch.bool, device=device)
    for row, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        count = image_boxes.shape[0]
        padded[row, :count] = image_boxes.to(_COMPUTE_DTYPE)
        padded_labels[row, :count] = image_labels
        valid[row, :count] = True
    return padded, padded_labels, valid


def batched_atss_matches(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    anchors: torch.Tensor,
    locations_per_level: Sequence[int],
    anchors_per_location: int,
    candidates_per_level: int,
    center_in_gt: bool = False,
    min_center_distance: float = 0.01,
) -> torch.Tensor:
    """ATSS matching (Zhang et al. 2020) of every image of a batch: MONAI's ``ATSSMatcher.compute_matches``, batched.

    For each box, the ``candidates_per_level * anchors_per_location`` anchors (at most the level's locations) whose
    centres lie closest to the box's centre on each pyramid level are its candidates; those whose IoU with the box
    reaches the mean plus the (unbiased) standard deviation of the candidates' IoUs are positive (with
    ``center_in_gt``, only if their centre also lies inside the box by more than ``min_center_distance``). An anchor
    positive for several boxes goes to the one it overlaps most (the first of equals).

    Args:
        boxes: (B, M, 4) float ``[a0, b0, a1, b1]``, a1 >= a0 and b1 >= b0, in the anchors' pixels and axis order.
        valid: (B, M) bool; False marks padding (never matched).
        anchors: (A, 4) float, the same for every image, level after level, ``anchors_per_location`` per location.
        locations_per_level: anchor locations (H_l * W_l) of each level, summing to A / ``anchors_per_location``.
    Returns:
        (B, A) int64: the matched box index in [0, M) per anchor, or ``BACKGROUND`` (-1).
    Raises:
        ValueError: the levels hold fewer than two candidates in all (MONAI's degenerate case, not batched here).
    """
    anchors = anchors.to(_COMPUTE_DTYPE)
    boxes = boxes.to(_COMPUTE_DTYPE)
    box_centres = (boxes[..., :2] + boxes[..., 2:]) / 2.0  # (B, M, 2)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2.0  # (A, 2)
    distances = (box_centres[:, :, None, :] - anchor_centres[None, None]).pow(2).sum(-1).sqrt()  # (B, M, A)

    candidates = []
    start = 0
    for locations in locations_per_level:
        end = start + locations * anchors_per_location
        # MONAI bounds the top-k by the level's locations, not its anchors; kept for identical candidates.
        top = min(candidates_per_level * anchors_per_location, locations)
        candidates.append(distances[..., start:end].topk(top, dim=-1, largest=False).indices + start)
        start = end
    candidate_index = torch.cat(candidates, dim=-1)  # (B, M, K)
    if candidate_index.shape[-1] <= 1:
        raise ValueError("ATSS needs at least two candidate anchors per box; the pyramid is too small")

    overlaps = pairwise_iou(boxes, anchors[None])  # (B, M, A)
    candidate_overlaps = overlaps.gather(-1, candidate_index)  # (B, M, K)
    threshold = candidate_overlaps.mean(dim=-1) + candidate_overlaps.std(dim=-1)  # (B, M)
    positive = (candidate_overlaps >= threshold[..., None]) & valid[..., None]
    if center_in_gt:
        centres = anchor_centres[candidate_index]  # (B, M, K, 2)
        to_border = torch.cat([centres - boxes[:, :, None, :2], boxes[:, :, None, 2:] - centres], dim=-1)
        positive &= to_border.min(dim=-1).values > min_center_distance

    kept = torch.full_like(overlaps, float("-inf"))
    kept.scatter_(-1, candidate_index, candidate_overlaps.masked_fill(~positive, float("-inf")))
    best, matches = kept.max(dim=1)  # over boxes: (B, A)
    return matches.masked_fill(best == float("-inf"), BACKGROUND)


def classification_targets(matches: torch.Tensor, labels: torch.Tensor, num_classes: int, dtype: torch.dtype):
    """One-hot class targets of every anchor: (B, A) matches and (B, M) labels -> (B, A, num_classes) in {0, 1}
    of ``dtype``, all zero for background anchors (MONAI's ``gt_classes_target``)."""
    foreground = matches >= 0
    matched_labels = labels.gather(1, matches.clamp(min=0))  # (B, A); background rows read box 0, then masked
    targets = torch.zeros((*matches.shape, num_classes), dtype=dtype, device=matches.device)
    return targets.scatter_(-1, matched_labels[..., None], foreground[..., None].to(dtype))


def foreground_box_pairs(
    box_regression: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor, matches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The predictions, anchors and matched boxes of the foreground anchors of all images, image after image.

    Args:
        box_regression: (B, A, 4) predicted offsets; boxes (B, M, 4); anchors (A, 4); matches (B, A).
    Returns:
        (K, 4) offsets, (K, 4) anchors and (K, 4) matched boxes of the K foreground anchors, in MONAI's order
        (image by image, anchors ascending).
    """
    image, anchor = torch.nonzero(matches >= 0, as_tuple=True)
    return box_regression[image, anchor], anchors[anchor], boxes[image, matches[image, anchor]]
