"""Class scores as P(lesion) x P(class | lesion): the scores, the loss, the detector trained with them, the config."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from caries_mim.detection import CariesDetector, DetectorConfig
from caries_mim.detection.lesion_times_class import LesionTimesClassLoss, lesion_times_class_scores
from caries_mim.detection.losses import FocalLossPerPositive
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import ViTConfig
from tests.detection.tiny import fit, tiny_config

TWO_CLASSES = ("caries", "deep_caries")


def test_class_scores_split_the_lesion_probability_by_the_class_softmax():
    logits = torch.tensor([[2.0, 0.0, 3.0], [0.0, 0.0, -1.0], [-5.0, 5.0, 0.0]])
    scores = lesion_times_class_scores(logits)
    assert scores.shape == (3, 2)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=-1), torch.sigmoid(logits[:, -1]))
    # Equal class logits halve the lesion probability; the class ranking follows the class logits.
    torch.testing.assert_close(scores[1], torch.sigmoid(torch.tensor(-1.0)).repeat(2) / 2)
    assert scores[0, 0] > scores[0, 1]
    assert scores[2, 1] > scores[2, 0]


def test_the_loss_trains_the_lesion_logit_everywhere_and_the_classes_on_matched_anchors_only():
    focal = FocalLossPerPositive()
    loss = LesionTimesClassLoss(focal, class_weight=2.0)
    # Anchor 0 on a deep lesion (class 1), anchor 1 on a shallow one (class 0), anchor 2 background.
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logits = torch.tensor([[0.5, -0.5, 1.0], [0.3, 0.1, 2.0], [4.0, -4.0, -3.0]], requires_grad=True)
    value = loss(logits, targets)
    lesion = focal(logits[:, -1:], torch.tensor([[1.0], [1.0], [0.0]]))
    classes = torch.nn.functional.cross_entropy(logits[:2, :2], torch.tensor([1, 0]))
    torch.testing.assert_close(value, lesion + 2.0 * classes)
    value.backward()
    # The background anchor's class logits get no gradient: its class says nothing.
    assert torch.equal(logits.grad[2, :2], torch.zeros(2))
    assert logits.grad[2, 2] > 0  # its lesion logit is pushed down
    # Without matched anchors only the lesion term is left, and every logit stays in the graph.
    empty = torch.zeros(2, 3)
    background = torch.randn(2, 3, requires_grad=True)
    torch.testing.assert_close(loss(background, empty), focal(background[:, -1:], empty[:, -1:]))


def test_a_lesion_times_class_detector_finds_two_lesions_and_tells_their_classes():
    """Two lesions of different look in one image, labelled with different classes: after a few steps each is
    found at IoU > 0.5 and its own class scores higher than the other on it."""
    torch.manual_seed(0)
    encoder = ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=16)
    config = tiny_config(
        encoder=encoder, backbone="resnet10", class_names=TWO_CLASSES, class_scores="lesion_times_class"
    )
    assert config.head_outputs == 3
    detector = CariesDetector(config)
    image = torch.zeros(2, 1, 64, 128)
    image[..., 10:30, 10:30] = 1.0  # a bright square: class 0
    image[..., 30:50, 80:100] = 0.5  # a dim square: class 1
    image[..., 36:44, 86:94] = 1.0  # with a bright core
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [80.0, 30.0, 100.0, 50.0]])
    maps = detector.network(image)[detector.retinanet.cls_key]
    assert maps[0].shape[1] == len(config.anchor_shapes) * 3
    found = fit(detector, image, [{"boxes": boxes, "labels": torch.tensor([0, 1])}] * 2, steps=60, lr=2e-3)
    assert found["scores"].max() <= 1.0
    assert bool((found["labels"] < 2).all())
    for label, box in enumerate(boxes):
        overlaps = box_iou(found["boxes"], box[None])[:, 0] > 0.5
        best = {c: max(found["scores"][overlaps & (found["labels"] == c)].tolist(), default=0.0) for c in (0, 1)}
        assert best[label] > best[1 - label], (label, best)


def test_lesion_times_class_config_is_checked_and_round_trips():
    config = tiny_config(class_names=TWO_CLASSES, class_scores="lesion_times_class", class_loss_weight=0.5)
    again = DetectorConfig.from_dict(config.to_dict())
    assert (again.class_scores, again.class_loss_weight, again.head_outputs) == ("lesion_times_class", 0.5, 3)
    # A package written before the option loads as RetinaNet's per-class scores.
    older = {key: value for key, value in config.to_dict().items() if key not in ("class_scores", "class_loss_weight")}
    assert DetectorConfig.from_dict(older).class_scores == "per_class"
    assert tiny_config(class_names=TWO_CLASSES).head_outputs == 2
    with pytest.raises(InvalidArgumentError, match="needs two or more classes"):
        tiny_config(class_scores="lesion_times_class")
    with pytest.raises(InvalidArgumentError, match="lesion score with classification_loss focal"):
        tiny_config(
            class_names=TWO_CLASSES,
            class_scores="lesion_times_class",
            classification_loss="bce",
            hard_negative_sampling=True,
        )
    with pytest.raises(InvalidArgumentError, match="class_scores must be one of per_class, lesion_times_class"):
        tiny_config(class_scores="softmax")
    with pytest.raises(InvalidArgumentError, match=r"class_loss_weight must be in \(0, 100\]"):
        tiny_config(class_loss_weight=0.0)
