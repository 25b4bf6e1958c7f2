"""FocalLossPerPositive is RetinaNet's normalization: the focal loss summed over anchors and classes, divided by the
number of positive anchors; the detector trains with it by default."""

from __future__ import annotations

import pytest
import torch
from monai.losses import FocalLoss

from caries_mim.detection import CariesDetector
from caries_mim.detection.losses import FocalLossPerPositive
from tests.detection.tiny import tiny_config


def hand_focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Lin et al. (2017), eq. 5, element by element: -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = torch.sigmoid(logits.double())
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = 1.0 if alpha is None else torch.where(targets > 0, alpha, 1 - alpha)
    return (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).sum()


LOGITS = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.0, -4.0], [1.5, 2.5], [-0.5, -2.0]])
#: Two positive anchors (rows 1 and 3), each of one class.
TARGETS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (0.0, None), (1.0, 0.75)])
def test_it_is_the_sum_over_anchors_and_classes_divided_by_the_positives(gamma, alpha):
    loss = FocalLossPerPositive(gamma=gamma, alpha=alpha)(LOGITS, TARGETS)
    assert loss.shape == ()
    expected = hand_focal(LOGITS, TARGETS, gamma, alpha) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    monai_sum = FocalLoss(gamma=gamma, alpha=alpha, reduction="none", use_softmax=False)(LOGITS, TARGETS).sum()
    assert loss.item() == pytest.approx(monai_sum.item() / 2, rel=1e-6)


def test_it_is_not_monai_s_sum_reduction_which_averages_two_dimensional_input():
    """MONAI's reduction="sum" first averages over the dimensions after (batch, class); for (anchors, classes)
    input that is an empty list, which torch reads as every dimension, so it returns the mean. The loss must not
    shrink with the number of anchors like that."""
    many_negatives = torch.cat([LOGITS, torch.full((995, 2), -4.0)])
    targets = torch.cat([TARGETS, torch.zeros(995, 2)])
    ours = FocalLossPerPositive()(many_negatives, targets)
    assert ours.item() == pytest.approx(hand_focal(many_negatives, targets, 2.0, 0.25).item() / 2, rel=1e-5)
    monai_sum = FocalLoss(gamma=2.0, alpha=0.25, reduction="sum", use_softmax=False)(many_negatives, targets)
    assert ours.item() > 100 * monai_sum.item() / 2


def test_without_positives_it_divides_by_one():
    targets = torch.zeros_like(LOGITS)
    loss = FocalLossPerPositive()(LOGITS, targets)
    assert loss.item() == pytest.approx(hand_focal(LOGITS, targets, 2.0, 0.25).item(), rel=1e-5)


def test_gradients_flow_to_the_logits_and_integer_targets_are_accepted():
    logits = LOGITS.clone().requires_grad_(True)
    FocalLossPerPositive()(logits, TARGETS.long()).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    # Positives are pushed up, negatives down.
    assert (logits.grad[[1, 3], [1, 0]] < 0).all()
    assert (logits.grad[[0, 3], [0, 1]] > 0).all()


def test_the_detector_trains_with_it_by_default_and_bce_is_monai_s_own():
    focal = CariesDetector(tiny_config())
    assert isinstance(focal.retinanet.cls_loss_func, FocalLossPerPositive)
    assert focal.retinanet.fg_bg_sampler is None
    bce = CariesDetector(tiny_config(classification_loss="bce", hard_negative_sampling=True))
    assert isinstance(bce.retinanet.cls_loss_func, torch.nn.BCEWithLogitsLoss)
    assert bce.retinanet.fg_bg_sampler is not None


def test_an_untrained_detector_s_classification_loss_is_per_positive_anchor():
    """With the heads' prior of 0.01, each positive anchor costs about alpha * log(100) = 1.15 and every negative
    almost nothing, so the loss is ~1.1 whatever the number of anchors (a mean over anchors would be ~1e-3)."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).train()
    images = torch.rand(2, 1, 64, 64)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 26.0, 30.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[30.0, 30.0, 48.0, 44.0]]), "labels": torch.tensor([0])},
    ]
    loss = detector.losses(images, targets)["classification"].item()
    assert 0.5 < loss < 2.0
