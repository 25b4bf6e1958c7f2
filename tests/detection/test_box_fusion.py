"""Box voting and the fusion of a mirrored pass, on hand-checked boxes; the detector's use of both."""

from __future__ import annotations

import pytest
import torch

from caries_mim.detection import CariesDetector
from caries_mim.detection.box_fusion import fuse_passes, vote_boxes
from caries_mim.detection.detector import _unmirror
from caries_mim.errors import InvalidArgumentError
from tests.detection.tiny import tiny_config


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_a_kept_box_becomes_the_score_weighted_mean_of_its_class_overlapping_it():
    kept = _boxes([10, 10, 30, 30])
    candidates = _boxes(
        [10, 10, 30, 30],  # the kept box itself, score 0.6
        [12, 10, 32, 30],  # IoU 0.82 with it, score 0.2
        [10, 10, 30, 30],  # same place, other class: no vote
        [25, 25, 45, 45],  # IoU 0.06: no vote
    )
    scores = torch.tensor([0.6, 0.2, 0.9, 0.9])
    labels = torch.tensor([0, 0, 1, 0])
    voted = vote_boxes(kept, torch.tensor([0]), candidates, scores, labels, 0.5)
    # x: (0.6 * 10 + 0.2 * 12) / 0.8 = 10.5, (0.6 * 30 + 0.2 * 32) / 0.8 = 30.5; y unchanged.
    torch.testing.assert_close(voted, _boxes([10.5, 10, 30.5, 30]))


def test_a_box_no_candidate_votes_for_stays_and_empty_sets_pass_through():
    kept = _boxes([0, 0, 8, 8])
    far = _boxes([50, 50, 60, 60])
    unchanged = vote_boxes(kept, torch.tensor([0]), far, torch.tensor([0.9]), torch.tensor([0]), 0.5)
    torch.testing.assert_close(unchanged, kept)
    zero_scores = vote_boxes(kept, torch.tensor([0]), kept, torch.tensor([0.0]), torch.tensor([0]), 0.5)
    torch.testing.assert_close(zero_scores, kept)
    assert vote_boxes(
        _boxes(), torch.zeros(0, dtype=torch.long), far, torch.tensor([0.9]), torch.tensor([0]), 0.5
    ).shape == (0, 4)
    torch.testing.assert_close(
        vote_boxes(kept, torch.tensor([0]), _boxes(), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5), kept
    )


def _found(boxes, scores, labels):
    return {"boxes": _boxes(*boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_two_passes_agreeing_keep_the_score_and_average_the_box():
    plain = _found([[10, 10, 30, 30]], [0.8], [0])
    mirrored = _found([[12, 10, 32, 30]], [0.8], [0])
    fused = fuse_passes([plain, mirrored], iou_threshold=0.5, max_kept=10)
    torch.testing.assert_close(fused["boxes"], _boxes([11, 10, 31, 30]))
    torch.testing.assert_close(fused["scores"], torch.tensor([0.8]))
    assert fused["labels"].tolist() == [0]


def test_a_detection_one_pass_missed_is_halved_and_classes_do_not_fuse():
    plain = _found([[10, 10, 30, 30], [60, 60, 70, 70]], [0.9, 0.4], [0, 0])
    mirrored = _found([[10, 10, 30, 30]], [0.5], [1])  # the same place, the other class
    fused = fuse_passes([plain, mirrored], iou_threshold=0.5, max_kept=10)
    # Class 0 at (10, 10): 0.9 and nothing from the mirror -> 0.45; class 1 there: 0.5 from the mirror only -> 0.25;
    # the lone (60, 60) box -> 0.2. Scores descend.
    torch.testing.assert_close(fused["scores"], torch.tensor([0.45, 0.25, 0.2]))
    assert fused["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(fused["boxes"], _boxes([10, 10, 30, 30], [10, 10, 30, 30], [60, 60, 70, 70]))


def test_a_pass_counts_its_best_member_once_and_max_kept_bounds_the_clusters():
    # Two boxes of one pass in the same cluster: the pass contributes its best score (0.6), not their sum.
    plain = _found([[10, 10, 30, 30], [11, 10, 31, 30]], [0.6, 0.3], [0, 0])
    mirrored = _found([[10, 10, 30, 30], [80, 80, 90, 90]], [0.4, 0.9], [0, 0])
    fused = fuse_passes([plain, mirrored], iou_threshold=0.5, max_kept=10)
    torch.testing.assert_close(fused["scores"], torch.tensor([0.5, 0.45]))
    assert fuse_passes([plain, mirrored], iou_threshold=0.5, max_kept=1)["scores"].shape == (1,)


def test_fusing_nothing_returns_nothing_and_no_pass_is_an_error():
    empty = _found([], [], [])
    empty["labels"] = empty["labels"].long()
    fused = fuse_passes([empty, empty], iou_threshold=0.5, max_kept=10)
    assert fused["boxes"].shape == (0, 4)
    assert fused["scores"].shape == (0,)
    assert fused["labels"].shape == (0,)
    with pytest.raises(ValueError, match="at least one"):
        fuse_passes([], iou_threshold=0.5, max_kept=10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"box_fusion_iou": 0.0}, "box_fusion_iou must be in"),
        ({"box_fusion_iou": 1.5}, "box_fusion_iou must be in"),
        ({"test_time_flip": True}, "test_time_flip fuses the passes' boxes: it needs box_fusion_iou"),
        ({"test_time_vertical_flip": True}, "test_time_vertical_flip fuses the passes' boxes: it needs box_fusion_iou"),
    ],
)
def test_fusion_settings_are_checked(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_config(**overrides)


def test_a_config_saved_before_fusion_existed_predicts_with_plain_nms():
    saved = tiny_config().to_dict()
    del saved["box_fusion_iou"], saved["test_time_flip"], saved["test_time_vertical_flip"]
    config = type(tiny_config()).from_dict(saved)
    assert config.box_fusion_iou is None
    assert config.test_time_flip is False
    assert config.test_time_vertical_flip is False
    assert config.test_time_mirrors == ((False, False),)


@pytest.mark.parametrize(
    ("horizontal", "vertical", "mirrors"),
    [
        (False, False, ((False, False),)),
        (True, False, ((False, False), (True, False))),
        (False, True, ((False, False), (False, True))),
        (True, True, ((False, False), (True, False), (False, True), (True, True))),
    ],
)
def test_the_flip_settings_name_the_passes_plain_image_first(horizontal, vertical, mirrors):
    config = tiny_config(box_fusion_iou=0.5, test_time_flip=horizontal, test_time_vertical_flip=vertical)
    assert config.test_time_mirrors == mirrors


def _image(seed: int, height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.rand((1, 1, height, width), generator=torch.Generator().manual_seed(seed))


def test_voting_moves_the_boxes_plain_nms_kept_and_nothing_else():
    torch.manual_seed(0)
    plain = CariesDetector(tiny_config()).eval()
    voting = CariesDetector(tiny_config(box_fusion_iou=0.5)).eval()
    voting.load_state_dict(plain.state_dict())
    image = _image(1)
    before, after = plain.predict(image)[0], voting.predict(image)[0]
    torch.testing.assert_close(after["scores"], before["scores"])
    assert torch.equal(after["labels"], before["labels"])
    assert not torch.equal(after["boxes"], before["boxes"])  # an untrained detector's candidates overlap a lot
    assert bool(((after["boxes"] >= 0) & (after["boxes"] <= torch.tensor([96, 64, 96, 64]))).all())


def test_the_mirrored_pass_is_unflipped_and_fused_with_the_plain_one():
    torch.manual_seed(0)
    flipping = CariesDetector(tiny_config(box_fusion_iou=0.5, test_time_flip=True)).eval()
    image = _image(2)
    plain = flipping._predict_once(image)[0]
    mirrored = flipping._predict_once(image.flip(-1))[0]
    unflipped = mirrored["boxes"].clone()
    unflipped[:, 0], unflipped[:, 2] = 96 - mirrored["boxes"][:, 2], 96 - mirrored["boxes"][:, 0]
    expected = fuse_passes([plain, {**mirrored, "boxes": unflipped}], iou_threshold=0.5, max_kept=20)
    found = flipping.predict(image)[0]
    torch.testing.assert_close(found["boxes"], expected["boxes"])
    torch.testing.assert_close(found["scores"], expected["scores"])
    assert torch.equal(found["labels"], expected["labels"])
    assert bool((found["scores"][:-1] >= found["scores"][1:]).all())
    assert bool(((found["boxes"] >= 0) & (found["boxes"] <= torch.tensor([96, 64, 96, 64]))).all())


def test_boxes_found_on_mirrors_map_back_onto_the_image():
    # One box on a 96 x 64 image, [10, 5, 30, 25], as each mirror shows it; mapped back it is the box again.
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    seen = {
        (True, False): [[66.0, 5.0, 86.0, 25.0]],
        (False, True): [[10.0, 39.0, 30.0, 59.0]],
        (True, True): [[66.0, 39.0, 86.0, 59.0]],
    }
    for (mirror_x, mirror_y), mirrored in seen.items():
        torch.testing.assert_close(_unmirror(torch.tensor(mirrored), 96, 64, mirror_x, mirror_y), box)


def test_four_passes_are_each_mapped_back_and_fused():
    torch.manual_seed(0)
    config = tiny_config(box_fusion_iou=0.5, test_time_flip=True, test_time_vertical_flip=True)
    detector = CariesDetector(config).eval()
    image = _image(3)
    passes = []
    for flipped_dims, mirror_x, mirror_y in (([], False, False), ([-1], True, False), ([-2], False, True),
                                              ([-1, -2], True, True)):  # fmt: skip
        found = detector._predict_once(image.flip(flipped_dims) if flipped_dims else image)[0]
        boxes = found["boxes"].clone()
        if mirror_x:
            boxes[:, 0], boxes[:, 2] = 96 - found["boxes"][:, 2], 96 - found["boxes"][:, 0]
        if mirror_y:
            boxes[:, 1], boxes[:, 3] = 64 - found["boxes"][:, 3], 64 - found["boxes"][:, 1]
        passes.append({**found, "boxes": boxes})
    expected = fuse_passes(passes, iou_threshold=0.5, max_kept=config.detections_per_image)
    found = detector.predict(image)[0]
    torch.testing.assert_close(found["boxes"], expected["boxes"])
    torch.testing.assert_close(found["scores"], expected["scores"])
    assert torch.equal(found["labels"], expected["labels"])
    assert bool(((found["boxes"] >= 0) & (found["boxes"] <= torch.tensor([96, 64, 96, 64]))).all())
