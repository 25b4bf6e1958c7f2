"""batched_nms against MONAI's batched_nms (the loop it replaces), image by image."""

from __future__ import annotations

import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.data.box_utils import batched_nms as monai_batched_nms

from caries_mim.detection import CariesDetector, box_selection
from caries_mim.detection.box_selection import batched_nms, padded_nms
from tests.detection.tiny import tiny_config


def _candidates(generator: torch.Generator, count: int, *, spread: float, classes: int = 2):
    """(count, 4) boxes on a 1/8 px grid, scores with ties (MONAI's stable order decides), labels."""
    corner = torch.randint(0, int(spread * 8), (count, 2), generator=generator) / 8
    size = torch.randint(8, 40 * 8, (count, 2), generator=generator) / 8
    scores = torch.randint(0, 200, (count,), generator=generator) / 200  # ties on purpose
    labels = torch.randint(0, classes, (count,), generator=generator)
    return torch.cat([corner, corner + size], dim=1), scores, labels


def _monai(candidates, threshold, max_kept):
    return [
        monai_batched_nms(boxes, scores, labels, threshold, max_proposals=max_kept)
        for boxes, scores, labels in candidates
    ]


@pytest.mark.parametrize(
    ("counts", "spread", "threshold", "max_kept"),
    [
        ([300, 0, 57, 1], 300.0, 0.3, 100),  # an empty image and a lone box among others
        ([2000, 1500], 60.0, 0.3, 100),  # busy: 100 kept within the first prefix
        ([2000, 1500], 8.0, 0.3, 100),  # crowded: fewer than 100 survive, the prefix widens to every candidate
        ([800, 800, 800], 400.0, 0.5, 20),  # max_kept reached early
        ([400], 200.0, 0.0, 1000),  # any overlap suppresses
        ([250, 250], 300.0, 1.0, 1000),  # nothing overlaps more than 1: every box kept
    ],
)
def test_keeps_exactly_monai_boxes_in_monai_order(counts, spread, threshold, max_kept):
    generator = torch.Generator().manual_seed(sum(counts) + int(spread))
    candidates = [_candidates(generator, count, spread=spread) for count in counts]
    ours = batched_nms(*zip(*candidates, strict=True), threshold, max_kept)
    for image, (kept, expected) in enumerate(zip(ours, _monai(candidates, threshold, max_kept), strict=True)):
        assert kept.dtype == torch.long
        assert torch.equal(kept, expected), f"image {image}"
    if threshold == 1.0:
        assert [len(kept) for kept in ours] == counts


def test_a_crowded_image_widens_the_settled_prefix_until_every_candidate(monkeypatch):
    settled = []
    suppression = box_selection._suppression
    monkeypatch.setattr(
        box_selection, "_suppression", lambda boxes, *rest: settled.append(boxes.shape[:2]) or suppression(boxes, *rest)
    )
    generator = torch.Generator().manual_seed(7)
    candidates = [_candidates(generator, 2000, spread=8.0), _candidates(generator, 10, spread=300.0)]
    ours = batched_nms(*zip(*candidates, strict=True), 0.3, 100)
    assert settled == [(2, 600), (1, 1200), (1, 2000)]  # the small image is settled by the first prefix
    for kept, expected in zip(ours, _monai(candidates, 0.3, 100), strict=True):
        assert torch.equal(kept, expected)


def test_labels_never_suppress_each_other():
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]] * 3)
    kept = batched_nms([box], [torch.tensor([0.9, 0.8, 0.7])], [torch.tensor([0, 1, 0])], 0.3, 10)
    assert kept[0].tolist() == [0, 1]


def test_no_images_and_bad_arguments():
    assert batched_nms([], [], [], 0.3, 10) == []
    box, score, label = torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="1 box sets, 2 score sets"):
        batched_nms([box], [score, score], [label], 0.3, 1)
    with pytest.raises(ValueError, match="finite"):
        batched_nms([torch.tensor([[0.0, 0.0, float("nan"), 4.0]])], [score], [label], 0.3, 1)


@pytest.mark.parametrize("max_kept", [0, -1])
def test_max_kept_below_one_means_no_limit_as_in_monai(max_kept):
    generator = torch.Generator().manual_seed(3)
    candidates = [_candidates(generator, 400, spread=300.0)]
    (kept,) = batched_nms(*zip(*candidates, strict=True), 0.3, max_kept)
    assert torch.equal(kept, _monai(candidates, 0.3, -1)[0])
    assert len(kept) > 100


def test_boxes_off_the_grid_with_three_labels_match_monai_bit_for_bit():
    """MONAI shifts label k's boxes by k * (largest coordinate + 1), which rounds them in float32; so does ours."""
    generator = torch.Generator().manual_seed(11)
    candidates = []
    for count in (700, 350):
        corner = torch.rand(count, 2, generator=generator) * 300
        boxes = torch.cat([corner, corner + 2 + torch.rand(count, 2, generator=generator) * 40], dim=1)
        candidates.append((boxes, torch.rand(count, generator=generator), torch.randint(0, 3, (count,))))
    for threshold in (0.1, 0.3, 0.5):
        ours = batched_nms(*zip(*candidates, strict=True), threshold, 100)
        for kept, expected in zip(ours, _monai(candidates, threshold, 100), strict=True):
            assert torch.equal(kept, expected)


def test_entries_outside_the_mask_are_ignored_wherever_they_sit():
    """A candidate scoring -inf sorts among the masked entries; it is still a candidate, they are not."""
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 30.0, 30.0]]])
    scores = torch.tensor([[0.9, 0.5, float("-inf")]])
    valid = torch.tensor([[True, False, True]])
    (kept,) = padded_nms(boxes, scores, torch.zeros(1, 3, dtype=torch.long), valid, 0.3, 10)
    assert kept.tolist() == [0, 2]


@pytest.mark.parametrize(
    ("score_quantile", "per_level", "sizes"),
    [
        (None, 1000, [[64, 64]] * 3),  # the tiny config's threshold 0: every anchor is a candidate
        (0.6, 1000, [[64, 64]] * 3),  # some images have fewer candidates above the threshold than others
        (0.3, 50, [[64, 64], [40, 64], [64, 30]]),  # top-k cuts; each image clipped to its own size
        ("logits", 1000, [[64, 64]] * 3),  # a selector without the sigmoid: the threshold is on the logits
    ],
)
def test_detector_selection_equals_monai_postprocessing_for_a_batch(score_quantile, per_level, sizes):
    """The override (MONAI's steps on the whole batch; one NMS) gives what MONAI's own postprocess_detections gives
    image by image, on an untrained detector's dense outputs."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(detections_per_image=50, candidates_per_level=per_level)).eval()
    retinanet = detector.retinanet
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        head = retinanet.network(images)
    retinanet.generate_anchors(images, head)
    locations = [level.shape[2:].numel() for level in head[retinanet.cls_key]]
    reshaped = {key: retinanet._reshape_maps(head[key]) for key in (retinanet.cls_key, retinanet.box_reg_key)}
    if score_quantile == "logits":
        retinanet.box_selector.apply_sigmoid = False
        retinanet.box_selector.score_thresh = float(torch.quantile(reshaped[retinanet.cls_key].flatten(), 0.5))
    elif score_quantile is not None:
        scores = torch.sigmoid(reshaped[retinanet.cls_key])
        retinanet.box_selector.score_thresh = float(torch.quantile(scores.flatten(), score_quantile))
    ours = retinanet.postprocess_detections(reshaped, retinanet.anchors, sizes, locations)
    theirs = RetinaNetDetector.postprocess_detections(retinanet, reshaped, retinanet.anchors, sizes, locations)
    assert sum(len(found[retinanet.pred_score_key]) for found in ours) > 30  # dense enough to need NMS
    for found, expected in zip(ours, theirs, strict=True):
        assert set(found) == set(expected)
        for key in (retinanet.target_box_key, retinanet.pred_score_key, retinanet.target_label_key):
            assert torch.equal(found[key], expected[key]), key
