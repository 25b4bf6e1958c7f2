"""The batched ATSS matching and losses against MONAI's per-image ones (the path they replace)."""

from __future__ import annotations

import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher

from caries_mim.detection import CariesDetector
from caries_mim.detection import detector as detector_module
from caries_mim.detection.batched_loss import BACKGROUND, batched_atss_matches, pad_boxes
from caries_mim.errors import InvalidArgumentError
from tests.detection.tiny import tiny_config


def _anchors(levels: list[int], size: int, shapes: list[tuple[float, float]]) -> tuple[torch.Tensor, list[int]]:
    """Anchors level after level (grid of ``size / stride`` locations, every shape at each), as MONAI lays them."""
    rows = []
    locations = []
    for stride in levels:
        cells = size // stride
        centre = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride
        a, b = torch.meshgrid(centre, centre, indexing="ij")
        grid = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)  # (cells^2, 2)
        half = torch.tensor(shapes, dtype=torch.float32) / 2  # (S, 2)
        rows.append(torch.cat([grid[:, None] - half[None], grid[:, None] + half[None]], dim=-1).reshape(-1, 4))
        locations.append(cells * cells)
    return torch.cat(rows), locations


def _boxes(generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    """Boxes on a 1/4 px grid, 4-40 px a side, some sharing a corner (ties in distance and overlap)."""
    corner = torch.randint(0, (size - 40) * 4, (count, 2), generator=generator) / 4
    extent = torch.randint(16, 160, (count, 2), generator=generator) / 4
    boxes = torch.cat([corner, corner + extent], dim=1)
    if count > 2:
        boxes[1] = boxes[0]  # a duplicate: the same anchors are positive for both, the first box wins
    return boxes


@pytest.mark.parametrize("center_in_gt", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [12, 12], [0, 0]])
def test_matches_are_monai_atss_matches_image_by_image(center_in_gt, counts):
    generator = torch.Generator().manual_seed(sum(counts) + 10 * center_in_gt)
    anchors, locations = _anchors([4, 8, 16, 32], 128, [(12.0, 12.0), (9.0, 15.0), (15.0, 9.0)])
    per_image = [_boxes(generator, count, 128) for count in counts]
    boxes, _, valid = pad_boxes(per_image, [torch.zeros(len(b), dtype=torch.long) for b in per_image])

    ours = batched_atss_matches(boxes, valid, anchors, locations, 3, 4, center_in_gt)

    matcher = ATSSMatcher(num_candidates=4, center_in_gt=center_in_gt)
    assert ours.shape == (len(counts), anchors.shape[0])
    for image, image_boxes in enumerate(per_image):
        if len(image_boxes) == 0:
            assert (ours[image] == BACKGROUND).all()
            continue
        _, expected = matcher(image_boxes, anchors, locations, 3)
        assert torch.equal(ours[image], expected), f"image {image}"
        assert (ours[image] >= 0).any(), "every image with boxes has positive anchors"


def test_too_few_candidates_is_refused_not_matched_wrongly():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    boxes, _, valid = pad_boxes([torch.tensor([[1.0, 1.0, 5.0, 5.0]])], [torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="at least two candidate"):
        batched_atss_matches(boxes, valid, anchors, [1], 1, 4)


def _batch(generator: torch.Generator, counts: list[int]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.rand(len(counts), 1, 64, 64, generator=generator)
    targets = []
    for count in counts:
        corner = torch.randint(0, 40, (count, 2), generator=generator).float()
        extent = torch.randint(4, 20, (count, 2), generator=generator).float()
        targets.append(
            {
                "boxes": torch.cat([corner, corner + extent], dim=1),
                "labels": torch.randint(0, 2, (count,), generator=generator),
            }
        )
    return images, targets


def _losses_and_gradients(detector: CariesDetector, images, targets) -> tuple[dict[str, torch.Tensor], list]:
    detector.zero_grad(set_to_none=True)
    losses = detector.losses(images, targets)
    losses["total"].backward()
    return {key: value.detach() for key, value in losses.items()}, [
        parameter.grad.clone() for parameter in detector.parameters() if parameter.grad is not None
    ]


def _count_batched_matching(monkeypatch) -> list[int]:
    """A list that grows by one whenever the detector runs the batched ATSS matching."""
    calls: list[int] = []
    monkeypatch.setattr(
        detector_module, "batched_atss_matches", lambda *args: calls.append(1) or batched_atss_matches(*args)
    )
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        {"box_regression_loss": "giou"},
        {"box_regression_loss": "smooth_l1"},
        {"class_scores": "lesion_times_class"},
        {"atss_center_in_gt": True},
    ],
)
@pytest.mark.parametrize("counts", [[2, 0, 5, 1], [0, 0]])
def test_losses_and_gradients_are_monais(monkeypatch, overrides, counts):
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries"), **overrides))
    images, targets = _batch(torch.Generator().manual_seed(len(counts)), counts)

    batched_calls = _count_batched_matching(monkeypatch)
    batched, batched_gradients = _losses_and_gradients(detector, images, targets)
    assert batched_calls == [1], "the batched path ran"
    monkeypatch.setattr(type(detector.retinanet), "compute_loss", RetinaNetDetector.compute_loss)
    monai, monai_gradients = _losses_and_gradients(detector, images, targets)

    for key in ("classification", "box_regression", "total"):
        torch.testing.assert_close(batched[key], monai[key].to(batched[key].device), rtol=1e-5, atol=1e-7)
    assert len(batched_gradients) == len(monai_gradients)
    for ours, theirs in zip(batched_gradients, monai_gradients, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    if sum(counts):
        assert batched["box_regression"] > 0
    else:
        assert batched["box_regression"] == 0


def test_hard_negative_sampling_keeps_monais_per_image_path(monkeypatch):
    detector = CariesDetector(
        tiny_config(class_names=("caries", "deep_caries"), classification_loss="bce", hard_negative_sampling=True)
    )
    per_image = type(detector.retinanet).compute_anchor_matched_idxs
    calls = []
    monkeypatch.setattr(
        type(detector.retinanet),
        "compute_anchor_matched_idxs",
        lambda self, *args: calls.append(len(args[0])) or per_image(self, *args),
    )
    images, targets = _batch(torch.Generator().manual_seed(3), [1, 2])
    losses = detector.losses(images, targets)
    assert calls == [2]
    assert torch.isfinite(losses["total"])


def test_a_nan_prediction_is_named_while_training():
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries")))
    images, targets = _batch(torch.Generator().manual_seed(4), [1])
    with torch.no_grad():
        next(iter(detector.retinanet.network.classification_head.parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        detector.losses(images, targets)


def test_an_image_whose_boxes_no_anchor_matches_is_warned_about():
    """centre_in_gt with a box smaller than the anchors' spacing: no candidate's centre lies inside it."""
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries"), atss_center_in_gt=True))
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[0.2, 0.2, 0.6, 0.6]]), "labels": torch.tensor([1])},
    ]
    with pytest.warns(UserWarning, match="No anchor is matched"):
        losses = detector.losses(images, targets)
    assert torch.isfinite(losses["total"])


def _with_ignore_regions(targets: list[dict[str, torch.Tensor]], regions: list[list[list[float]]]) -> list[dict]:
    return [
        {**target, "ignore_boxes": torch.tensor(image_regions, dtype=torch.float32).reshape(-1, 4)}
        for target, image_regions in zip(targets, regions, strict=True)
    ]


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 0]])
def test_ignore_regions_leave_their_anchors_out_as_monais_between_thresholds_anchors(monkeypatch, counts):
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries")))
    images, targets = _batch(torch.Generator().manual_seed(5), counts)
    # Image 0: a region apart from its lesions; image 1: none; image 2: two regions, one of them on its first box.
    on_lesion = targets[2]["boxes"][:1].tolist()
    regions = [[[44.0, 44.0, 60.0, 58.0]], [], [[30.0, 2.0, 41.0, 12.0], *on_lesion]]
    ignoring = _with_ignore_regions(targets, regions)

    batched_calls = _count_batched_matching(monkeypatch)
    batched, batched_gradients = _losses_and_gradients(detector, images, ignoring)
    assert batched_calls == [1, 1], "the batched path matched the lesions, then the ignore regions"
    plain, _ = _losses_and_gradients(detector, images, targets)
    # MONAI's per-image path, through the detector's matching override that marks the anchors BETWEEN_THRESHOLDS.
    monkeypatch.setattr(type(detector.retinanet), "compute_loss", RetinaNetDetector.compute_loss)
    monai, monai_gradients = _losses_and_gradients(detector, images, ignoring)

    for key in ("classification", "box_regression", "total"):
        torch.testing.assert_close(batched[key], monai[key].to(batched[key].device), rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(batched_gradients, monai_gradients, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # Fewer background anchors in the sum: a smaller classification loss; the box loss only reads lesions.
    assert batched["classification"] < plain["classification"]
    torch.testing.assert_close(batched["box_regression"], plain["box_regression"])


def test_an_ignore_region_on_a_lesion_changes_nothing():
    """Anchors matched to a lesion stay positive: only background anchors are ever ignored."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries")))
    images, targets = _batch(torch.Generator().manual_seed(6), [3, 1])
    on_lesions = _with_ignore_regions(targets, [targets[0]["boxes"].tolist(), targets[1]["boxes"].tolist()])
    with torch.no_grad():
        plain = detector.losses(images, targets)
        ignoring = detector.losses(images, on_lesions)
    for key in ("classification", "box_regression"):
        torch.testing.assert_close(ignoring[key], plain[key])


def test_an_ignore_region_without_area_is_refused():
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries")))
    images, targets = _batch(torch.Generator().manual_seed(7), [1])
    with pytest.raises(InvalidArgumentError, match="ignore region without area"):
        detector.losses(images, _with_ignore_regions(targets, [[[5.0, 5.0, 5.0, 9.0]]]))
