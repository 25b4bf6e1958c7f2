"""COCO AP / AP50 / AP75 / AR: hand-computed cases, and agreement with pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from caries_mim.metrics import (
    EvaluatedImage,
    ap50_from_matches,
    coco_metrics,
    coco_metrics_from_matches,
    match_detections,
)
from tests.metrics.factory import make_image, perfect, shifted

CLASSES = ("caries", "deep_caries")
A = [10.0, 10.0, 20.0, 20.0]
B = [50.0, 50.0, 70.0, 60.0]


def _truth_only() -> list[EvaluatedImage]:
    return [
        make_image("p1", truth=[(A, 0), (B, 1)]),
        make_image("p2", truth=[(A, 0)]),
        make_image("negative"),
    ]


def test_perfect_predictions_score_one_everywhere() -> None:
    metrics = coco_metrics(perfect(_truth_only()), CLASSES)
    # pycocotools' precision is tp / (tp + fp + eps), so "1" is 1 - 1e-16 in both libraries.
    for value in (metrics.ap, metrics.ap50, metrics.ap75, metrics.ar):
        assert value == pytest.approx(1.0, abs=1e-12)
    assert metrics.per_class["caries"].n_ground_truth == 2
    assert metrics.per_class["deep_caries"].ap == pytest.approx(1.0, abs=1e-12)


def test_no_predictions_score_zero() -> None:
    metrics = coco_metrics(_truth_only(), CLASSES)
    assert (metrics.ap, metrics.ap50, metrics.ap75, metrics.ar) == (0.0, 0.0, 0.0, 0.0)


def test_box_at_iou_0_6_counts_at_ap50_not_at_ap75() -> None:
    # A 10x10 box shifted 2.5 px: IoU = 7.5 * 10 / (200 - 75) = 0.6, a match at IoU 0.50, 0.55 and 0.60 only.
    image = make_image("p", truth=[(A, 0)], predictions=[(shifted(A, dx=2.5), 0, 0.8)])
    metrics = coco_metrics([image], CLASSES)
    assert metrics.ap50 == pytest.approx(1.0, abs=1e-12)
    assert metrics.ap75 == 0.0
    assert metrics.ap == pytest.approx(0.3, abs=1e-12)
    assert metrics.ar == pytest.approx(0.3)


def test_class_without_ground_truth_reports_none_and_is_left_out_of_the_mean() -> None:
    image = make_image("p", truth=[(A, 0)], predictions=[(A, 0, 0.9), (B, 1, 0.8)])
    metrics = coco_metrics([image], CLASSES)
    absent = metrics.per_class["deep_caries"]
    assert (absent.ap, absent.ap50, absent.ap75, absent.ar, absent.n_ground_truth) == (None, None, None, None, 0)
    # MONAI's own overall AP would average in -1 for deep_caries and report about 0.
    assert metrics.ap50 == pytest.approx(1.0, abs=1e-12)


def test_no_ground_truth_at_all_gives_none() -> None:
    metrics = coco_metrics([make_image("negative", predictions=[(A, 0, 0.9)])], CLASSES)
    assert (metrics.ap, metrics.ap50, metrics.ap75, metrics.ar) == (None, None, None, None)
    json.dumps(metrics.to_dict())


def test_wrong_class_does_not_match() -> None:
    image = make_image("p", truth=[(A, 0)], predictions=[(A, 1, 0.9)])
    metrics = coco_metrics([image], CLASSES)
    assert metrics.ap50 == 0.0


def test_max_detections_keeps_the_highest_scores() -> None:
    image = make_image("p", truth=[(A, 0)], predictions=[(B, 0, 0.9), (shifted(B, dx=30), 0, 0.8), (A, 0, 0.1)])
    assert coco_metrics([image], CLASSES, max_detections=3).ar == pytest.approx(1.0)
    assert coco_metrics([image], CLASSES, max_detections=2).ar == 0.0


def test_two_stage_api_matches_one_shot_and_ap50_shortcut() -> None:
    images = _fixture()
    matchings = match_detections(images, CLASSES)
    full = coco_metrics(images, CLASSES)
    assert coco_metrics_from_matches(matchings, CLASSES) == full
    assert ap50_from_matches(matchings, CLASSES) == pytest.approx(full.ap50, abs=1e-12)


def test_to_dict_is_plain_json() -> None:
    payload = coco_metrics(_fixture(), CLASSES).to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert set(payload["per_class"]) == set(CLASSES)


# ---- agreement with pycocotools -------------------------------------------------------------------------------


def _fixture() -> list[EvaluatedImage]:
    """Four images, two classes: hits at several IoUs, a miss, false positives, a duplicate, a negative image."""
    c0, c1, c2 = [10.0, 10.0, 30.0, 30.0], [60.0, 20.0, 80.0, 35.0], [100.0, 100.0, 117.0, 117.0]
    return [
        make_image(
            "img-1",
            truth=[(c0, 0), (c1, 1), (c2, 0)],
            predictions=[
                (shifted(c0, dx=1.0), 0, 0.95),
                (shifted(c1, dx=4.0, dy=2.0), 1, 0.70),
                # 17x17 box 3 px off: IoU 238/340 = 0.7 exactly, a match at IoU 0.70 only in double precision.
                (shifted(c2, dx=3.0), 0, 0.60),
                (shifted(c0, dx=2.0), 0, 0.40),  # duplicate of c0: a false positive
                ([200.0, 200.0, 220.0, 220.0], 1, 0.55),
            ],
        ),
        make_image(
            "img-2",
            truth=[(c0, 1), (c1, 0)],
            predictions=[(shifted(c1, dy=6.0), 0, 0.85), ([0.0, 0.0, 5.0, 5.0], 0, 0.65)],  # c0 missed
        ),
        make_image("img-3-negative", predictions=[(c0, 0, 0.75), (c1, 1, 0.30)]),
        make_image("img-4", truth=[(c2, 1)], predictions=[(shifted(c2, dx=-2.0, dy=1.0), 1, 0.90)]),
    ]


def _random_fixture(seed: int) -> list[EvaluatedImage]:
    """Twenty images with jittered hits, misses, random false positives and several negatives."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(20):
        truth, predictions = [], []
        for _ in range(rng.integers(0, 4)):
            x0, y0 = rng.integers(0, 400, size=2)
            w, h = rng.integers(8, 60, size=2)
            box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
            label = int(rng.integers(0, 2))
            truth.append((box, label))
            if rng.random() < 0.8:
                jitter = rng.normal(0.0, 0.15 * min(w, h), size=2)
                predictions.append((shifted(box, *jitter), label, float(rng.uniform(0.2, 1.0))))
        for _ in range(rng.integers(0, 3)):
            x0, y0 = rng.uniform(0, 400, size=2)
            predictions.append(([x0, y0, x0 + 30.0, y0 + 20.0], int(rng.integers(0, 2)), float(rng.uniform(0, 0.8))))
        images.append(make_image(f"r{index}", truth=truth, predictions=predictions))
    return images


def _pycocotools(images: list[EvaluatedImage], n_classes: int) -> COCOeval:
    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    annotations: list[dict[str, object]] = []
    detections: list[dict[str, object]] = []
    for image_index, image in enumerate(images):
        for box, label in zip(image.gt_boxes, image.gt_labels, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index,
                    "category_id": int(label) + 1,
                    "bbox": xywh(box),
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
        for box, label, score in zip(image.pred_boxes, image.pred_labels, image.pred_scores, strict=True):
            detections.append(
                {"image_id": image_index, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(score)}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {
            "images": [{"id": index} for index in range(len(images))],
            "annotations": annotations,
            "categories": [{"id": label + 1, "name": str(label)} for label in range(n_classes)],
        }
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _class_values(evaluation: COCOeval, label: int) -> tuple[float, float, float]:
    """pycocotools' (AP, AP50, AR@100) of one class, read from its accumulated arrays like ``summarize`` does."""
    precision = evaluation.eval["precision"][:, :, label, 0, -1]  # (T, 101) at area "all", maxDets 100
    recall = evaluation.eval["recall"][:, label, 0, -1]  # (T,)
    return float(precision.mean()), float(precision[0].mean()), float(recall.mean())


@pytest.mark.parametrize("images", [_fixture(), _random_fixture(1), _random_fixture(2)], ids=["hand", "r1", "r2"])
def test_agrees_with_pycocotools(images: list[EvaluatedImage]) -> None:
    ours = coco_metrics(images, CLASSES)
    reference = _pycocotools(images, len(CLASSES))
    stats = reference.stats  # AP, AP50, AP75, ..., AR@100 at index 8
    # Same matching, same 101-point interpolation, float64 IoU: AP agrees to rounding. AR only to ~1e-8, because
    # MONAI divides float32 true-positive counts (see coco.py); seed 0 also hits the AP side of that quirk, pinned
    # in test_monai_float32_recall_reads_the_next_detection.
    assert ours.ap == pytest.approx(stats[0], abs=1e-9)
    assert ours.ap50 == pytest.approx(stats[1], abs=1e-9)
    assert ours.ap75 == pytest.approx(stats[2], abs=1e-9)
    assert ours.ar == pytest.approx(stats[8], abs=1e-6)
    for label, name in enumerate(CLASSES):
        ap, ap50, ar = _class_values(reference, label)
        assert ours.per_class[name].ap == pytest.approx(ap, abs=1e-9)
        assert ours.per_class[name].ap50 == pytest.approx(ap50, abs=1e-9)
        assert ours.per_class[name].ar == pytest.approx(ar, abs=1e-6)
    assert 0.0 < ours.ap < ours.ap50 < 1.0


def test_monai_float32_recall_reads_the_next_detection() -> None:
    """The one explained difference from pycocotools: 9 of 10 lesions is recall 0.9, which float32 rounds to
    0.89999998, so MONAI takes the precision at recall point 0.90 from the next true positive (10/11) where
    pycocotools takes it from the 9th (1.0): AP50 is lower by (1 - 10/11) / 101."""
    lesions = [[40.0 * index, 0.0, 40.0 * index + 20.0, 20.0] for index in range(10)]
    scores = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.89]
    image = make_image(
        "ten",
        truth=[(box, 0) for box in lesions],
        predictions=[(box, 0, score) for box, score in zip(lesions, scores, strict=True)]
        + [([0.0, 500.0, 9.0, 509.0], 0, 0.90)],
    )
    reference = _pycocotools([image], len(CLASSES)).stats[1]
    assert reference == pytest.approx((91 + 10 * 10 / 11) / 101, abs=1e-9)
    assert coco_metrics([image], CLASSES).ap50 == pytest.approx(reference - (1 - 10 / 11) / 101, abs=1e-9)

    # The seeded set r0 hits it at recall 9/20 = 0.45 for deep_caries: small, but not zero.
    images = _random_fixture(0)
    difference = _pycocotools(images, len(CLASSES)).stats[1] - coco_metrics(images, CLASSES).ap50
    assert 0.0 < difference < 1e-3


def test_class_without_ground_truth_agrees_with_pycocotools() -> None:
    images = [
        make_image("p", truth=[(A, 0)], predictions=[(shifted(A, dx=1.0), 0, 0.9), (B, 0, 0.95)]),
        make_image("n", predictions=[(B, 1, 0.8)]),
    ]
    ours = coco_metrics(images, CLASSES)
    stats = _pycocotools(images, len(CLASSES)).stats
    assert ours.ap == pytest.approx(stats[0], abs=1e-9)
    assert ours.ap50 == pytest.approx(stats[1], abs=1e-9)
    assert ours.per_class["deep_caries"].ap is None


def test_monai_float32_iou_would_miss_the_on_threshold_match() -> None:
    """Why coco.py passes a float64 IoU to MONAI: with MONAI's float32 box_iou the IoU-0.7 pair in the hand
    fixture is no match at 0.70, and AP (0.50:0.95) drifts from pycocotools'."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou as monai_box_iou

    images = _fixture()
    metric = COCOMetric(classes=list(CLASSES), iou_list=(0.5, 0.75), iou_range=(0.5, 0.95, 0.05), verbose=False)
    matchings = matching_batch(
        iou_fn=monai_box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[image.pred_boxes for image in images],
        pred_classes=[image.pred_labels for image in images],
        pred_scores=[image.pred_scores for image in images],
        gt_boxes=[image.gt_boxes for image in images],
        gt_classes=[image.gt_labels for image in images],
    )
    float32_ap = metric(matchings)[0]["caries_mAP_IoU_0.50_0.95_0.05_MaxDet_100"]
    reference_ap = _class_values(_pycocotools(images, len(CLASSES)), 0)[0]
    assert coco_metrics(images, CLASSES).per_class["caries"].ap == pytest.approx(reference_ap, abs=1e-9)
    assert float32_ap < reference_ap - 1e-3
