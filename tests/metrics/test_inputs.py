"""EvaluatedImage validation: bad input is refused with a message naming the problem and the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import EvaluatedImage, coco_metrics, froc, image_level_metrics, select_operating_point
from tests.metrics.factory import make_image

BOX = [10.0, 20.0, 30.0, 40.0]


def _image(**overrides: object) -> EvaluatedImage:
    fields: dict[str, object] = {
        "image_id": "bw-007",
        "gt_boxes": [BOX],
        "gt_labels": [0],
        "pred_boxes": [BOX],
        "pred_labels": [0],
        "pred_scores": [0.5],
    }
    fields.update(overrides)
    return EvaluatedImage(**fields)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"gt_boxes": [[10.0, 20.0, 30.0]]}, "gt_boxes must have shape (N, 4)"),
        ({"pred_boxes": [[*BOX, 1.0]]}, "pred_boxes must have shape (N, 4)"),
        ({"pred_boxes": [[30.0, 20.0, 10.0, 40.0]]}, "x1 < x0 or y1 < y0"),
        ({"gt_boxes": [[10.0, 40.0, 30.0, 20.0]]}, "x1 < x0 or y1 < y0"),
        ({"gt_boxes": [[np.nan, 20.0, 30.0, 40.0]]}, "NaN or infinite"),
        ({"pred_scores": [np.nan]}, "pred_scores contain NaN"),
        ({"pred_scores": [1.5]}, "pred_scores must lie in [0, 1]"),
        ({"pred_scores": [-0.1]}, "pred_scores must lie in [0, 1]"),
        ({"pred_scores": [0.5, 0.4]}, "2 pred_scores for 1 predicted box"),
        ({"pred_labels": [0, 1]}, "2 pred_labels for 1 box"),
        ({"gt_labels": []}, "0 gt_labels for 1 box"),
        ({"gt_labels": [0.5]}, "whole class indices"),
        ({"pred_labels": [-1]}, "negative class index -1"),
        ({"pred_labels": [[0]]}, "must be one-dimensional"),
    ],
)
def test_bad_input_is_refused_naming_problem_and_image(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        _image(**overrides)
    assert problem in caught.value.message
    assert "'bw-007'" in caught.value.message
    assert caught.value.code == "invalid_argument"


def test_label_beyond_class_names_is_refused_by_class_aware_metrics() -> None:
    image = _image(pred_labels=[2])
    with pytest.raises(
        InvalidArgumentError, match=r"'bw-007': pred_labels contain class index 2, but there are only 2"
    ):
        coco_metrics([image], ("caries", "deep_caries"))


@pytest.mark.parametrize("class_names", [(), ("caries", "caries"), ("caries", "")])
def test_bad_class_names_are_refused(class_names: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgumentError, match="class"):
        coco_metrics([_image()], class_names)


def test_empty_inputs_mean_no_boxes_and_are_stored_read_only() -> None:
    image = EvaluatedImage("negative", gt_boxes=[], gt_labels=[], pred_boxes=[], pred_labels=[], pred_scores=[])
    assert image.gt_boxes.shape == (0, 4)
    assert image.pred_boxes.shape == (0, 4)
    assert image.gt_labels.dtype == np.int64
    assert image.pred_scores.dtype == np.float64
    assert not image.is_positive
    assert image.max_score == 0.0
    with pytest.raises(ValueError, match="read-only"):
        image.gt_boxes[...] = 1.0


def test_torch_tensors_are_accepted() -> None:
    image = EvaluatedImage(
        "tensor",
        gt_boxes=torch.tensor([BOX]),
        gt_labels=torch.tensor([1]),
        pred_boxes=torch.tensor([BOX]),
        pred_labels=torch.tensor([1]),
        pred_scores=torch.tensor([0.25]),
    )
    assert image.gt_boxes.tolist() == [BOX]
    assert image.pred_labels.dtype == np.int64
    assert image.max_score == 0.25


def test_empty_evaluation_set_and_bad_settings_are_refused() -> None:
    image = make_image("a", truth=[(BOX, 0)], predictions=[(BOX, 0, 0.9)])
    with pytest.raises(InvalidArgumentError, match="no images"):
        froc([])
    with pytest.raises(InvalidArgumentError, match="fp_rates"):
        froc([image], fp_rates=(0.5, -1.0))
    with pytest.raises(InvalidArgumentError, match=r"iou_threshold must lie in \(0, 1\]"):
        froc([image], iou_threshold=0.0)
    with pytest.raises(InvalidArgumentError, match=r"threshold must lie in \[0, 1\]"):
        image_level_metrics([image], threshold=1.5)
    with pytest.raises(InvalidArgumentError, match=r"target_sensitivity must lie in \(0, 1\]"):
        select_operating_point([image], target_sensitivity=0.0)
    with pytest.raises(InvalidArgumentError, match="max_detections"):
        coco_metrics([image], ("caries",), max_detections=0)
    with pytest.raises(InvalidArgumentError, match="not an EvaluatedImage"):
        coco_metrics([{"boxes": BOX}], ("caries",))
