"""DetectionDataset items, the collate function, and the validation pass on annotated images."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from caries_mim.data import (
    DecodeCache,
    DetectionDataset,
    DetectionRecord,
    Letterbox,
    ResumableEpochSampler,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
    load_annotations,
)
from caries_mim.data.transforms import TrainTransform
from caries_mim.errors import InvalidDatasetError
from tests.data.conftest import FIXTURES, write_dicom


@pytest.fixture
def coco_set():
    return load_annotations(FIXTURES / "coco" / "annotations.json")


def test_items_without_transform_carry_original_boxes(coco_set, tmp_path):
    dataset = DetectionDataset(coco_set.records, cache=DecodeCache(tmp_path / "cache"), progress=False)
    item = dataset[0]
    assert item["image"].shape == (1, 40, 64)
    assert item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0
    assert float(item["image"].max()) <= 1.0
    assert item["boxes"].dtype == torch.float32
    assert item["labels"].dtype == torch.int64
    assert item["boxes"].tolist() == [[4.5, 6.0, 14.5, 14.0], [30.0, 10.0, 42.0, 24.0]]
    assert item["labels"].tolist() == [0, 1]
    assert item["image_id"] == 0
    assert item["original_size"] == (40, 64)
    assert item["spacing_mm"] is None  # PNG carries no spacing

    negative = dataset[1]
    assert negative["boxes"].shape == (0, 4)
    assert negative["labels"].shape == (0,)


def test_dicom_records_report_spacing(tmp_path):
    image = write_dicom(tmp_path / "bitewing.dcm", 48, 64)
    record = DetectionRecord(
        image_path=image,
        boxes=np.array([[5, 5, 20, 30]], np.float32),
        labels=np.array([0], np.int64),
        image_id="bw-1",
        width=64,
        height=48,
    )
    item = DetectionDataset([record], progress=False)[0]
    assert item["spacing_mm"] == (0.035, 0.035)
    assert item["image_id"] == "bw-1"


def test_eval_transform_and_letterbox_map_back(coco_set):
    size = 32
    dataset = DetectionDataset(coco_set.records, transform=detection_eval_transform(size), progress=False)
    item = dataset[0]
    assert item["image"].shape == (1, size, size)
    back = Letterbox.for_image(*item["original_size"], size).to_original(item["boxes"].numpy())
    np.testing.assert_allclose(back, coco_set.records[0].boxes, atol=1e-3)


def test_collate_batches_variable_box_counts(coco_set):
    dataset = DetectionDataset(coco_set.records, transform=detection_train_transform(32, seed=0), progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_detection)))
    assert batch["image"].shape == (3, 1, 32, 32)
    assert [boxes.shape[1] for boxes in batch["boxes"]] == [4, 4, 4]
    assert [len(boxes) for boxes in batch["boxes"]] == [len(labels) for labels in batch["labels"]]
    assert batch["image_id"] == [0, 1, 2]
    assert batch["original_size"] == [(40, 64)] * 3


def test_collate_refuses_images_of_different_sizes(coco_set, tmp_path):
    dicom = write_dicom(tmp_path / "other.dcm", 20, 30)
    record = DetectionRecord(dicom, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "x")
    dataset = DetectionDataset([coco_set.records[0], record], progress=False)
    with pytest.raises(ValueError, match="different sizes"):
        collate_detection([dataset[0], dataset[1]])


def test_image_size_contradicting_annotations_raises(coco_dir):
    path = coco_dir / "annotations.json"
    data = json.loads(path.read_text())
    data["images"][2]["width"] = 128
    path.write_text(json.dumps(data))
    records = load_annotations(path).records
    with pytest.raises(InvalidDatasetError, match=r"synth_000002.png \(annotated 128 x 40, decoded 64 x 40\)"):
        DetectionDataset(records, progress=False)
    unchecked = DetectionDataset(records, validate=False)
    with pytest.raises(InvalidDatasetError, match="decoded 64 x 40 but annotated 128 x 40"):
        unchecked[2]


def test_unreadable_annotated_image_is_skipped_with_one_warning(coco_dir, caplog):
    (coco_dir / "images" / "synth_000001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = load_annotations(coco_dir / "annotations.json").records
    with caplog.at_level(logging.WARNING, logger="caries_mim.data"):
        dataset = DetectionDataset(records, progress=False)
    assert [record.image_id for record in dataset.records] == [0, 2]
    assert dataset.skipped.total == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "synth_000001.png" in caplog.text


def test_no_readable_annotated_image_raises(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    record = DetectionRecord(bad, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0)
    with pytest.raises(InvalidDatasetError, match="none of the 1 annotated images"):
        DetectionDataset([record], progress=False)
    with pytest.raises(InvalidDatasetError, match="no annotated images"):
        DetectionDataset([], progress=False)


def test_boxes_outside_an_unsized_image_are_clipped(tmp_path):
    image = write_dicom(tmp_path / "unsized.dcm", 30, 40)
    record = DetectionRecord(
        image,
        np.array([[-5, 2, 10, 12], [35, 25, 60, 50], [45, 0, 50, 5]], np.float32),
        np.array([0, 1, 0], np.int64),
        0,
    )
    item = DetectionDataset([record], progress=False)[0]
    assert item["boxes"].tolist() == [[0, 2, 10, 12], [35, 25, 40, 30]]
    assert item["labels"].tolist() == [0, 1]


def test_dataset_pickles_for_spawned_workers(coco_set, tmp_path):
    dataset = DetectionDataset(coco_set.records, cache=DecodeCache(tmp_path / "cache"), progress=False)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[0]["boxes"].tolist() == dataset[0]["boxes"].tolist()


def _assert_same_item(first: dict, second: dict) -> None:
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["boxes"], second["boxes"])
    assert torch.equal(first["labels"], second["labels"])


def test_a_keyed_item_is_the_same_whenever_and_in_whatever_order_it_is_read(coco_set):
    """``(index, augmentation_seed)`` keys (what ResumableEpochSampler yields) seed the transform for that item
    alone: the same key gives the same crop, flip and noise, whatever was read before."""
    transform = detection_train_transform(32, seed=0, crop_size=32)
    dataset = DetectionDataset(coco_set.records, transform=transform, progress=False)
    first = dataset[(0, 1234)]
    for key in [(1, 99), (2, 5), 0, (0, 777)]:
        dataset[key]
    _assert_same_item(dataset[(0, 1234)], first)
    # A fresh dataset (another worker, a resumed run) agrees too.
    fresh = DetectionDataset(coco_set.records, transform=detection_train_transform(32, seed=9), progress=False)
    _assert_same_item(fresh[(0, 1234)], first)
    # Other seeds give other augmentations.
    others = [dataset[(0, seed)]["image"] for seed in range(1, 9)]
    assert any(not torch.equal(image, first["image"]) for image in others)


def test_plain_indices_still_work_and_keep_the_original_boxes_without_a_transform(coco_set):
    dataset = DetectionDataset(coco_set.records, progress=False)
    _assert_same_item(dataset[(0, 42)], dataset[0])
    assert dataset[(0, 42)]["boxes"].tolist() == coco_set.records[0].boxes.tolist()


def test_batches_do_not_depend_on_the_number_of_workers(coco_set):
    dataset = DetectionDataset(coco_set.records, transform=detection_train_transform(32, seed=0), progress=False)

    def epoch(workers: int) -> list[dict]:
        sampler = ResumableEpochSampler(len(dataset), batch_size=1, seed=3)
        sampler.set_position(epoch=2)
        loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers, collate_fn=collate_detection)
        return list(loader)

    in_process, in_worker = epoch(0), epoch(1)
    assert len(in_process) == len(in_worker) == 3
    for first, second in zip(in_process, in_worker, strict=True):
        assert torch.equal(first["image"], second["image"])
        assert all(torch.equal(a, b) for a, b in zip(first["boxes"], second["boxes"], strict=True))


def test_kept_scaled_images_give_the_same_crops(coco_set):
    """With a memory budget each image is scaled once and kept; every keyed crop is the one an unkept dataset
    draws, before and after a consumer wrote to its batch."""
    kept = DetectionDataset(
        coco_set.records, transform=detection_train_transform(32, seed=0, crop_size=16), progress=False, memo_mb=64
    )
    plain = DetectionDataset(
        coco_set.records, transform=detection_train_transform(32, seed=0, crop_size=16), progress=False
    )
    keys = [(index, seed) for seed in range(12) for index in range(len(kept))]
    for key in keys:
        item = kept[key]
        _assert_same_item(item, plain[key])
        item["image"].fill_(7.0)  # a consumer writing to its batch
    assert len(kept._memo) == len(kept)
    for key in keys:
        _assert_same_item(kept[key], plain[key])


class _TopRowsView:
    """An augment stage that returns its input's top 8 rows as a contiguous view (no copy), boxes dropped."""

    def __call__(self, image, bboxes, labels, **_):
        return {"image": image[:8], "bboxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}

    def set_random_seed(self, seed):
        pass


def test_a_crop_that_is_a_view_of_a_kept_image_is_copied_before_it_leaves(coco_set):
    scale = detection_train_transform(32, seed=0, crop_size=16).scale
    dataset = DetectionDataset(
        coco_set.records, transform=TrainTransform(scale, _TopRowsView()), progress=False, memo_mb=64
    )
    before = dataset[0]["image"].clone()
    dataset[0]["image"].fill_(7.0)
    torch.testing.assert_close(dataset[0]["image"], before, atol=0, rtol=0)
    assert float(dataset._memo[0].image.max()) <= 1.0


def test_the_memory_budget_bounds_what_is_kept_and_a_new_transform_forgets_it(coco_set):
    transform = detection_train_transform(32, seed=0, crop_size=16)
    dataset = DetectionDataset(coco_set.records, transform=transform, progress=False, memo_mb=0)
    for index in range(len(dataset)):
        dataset[index]
    assert not dataset._memo
    dataset.memo_bytes = 2**20
    dataset[0]
    assert list(dataset._memo) == [0]
    assert dataset._memo[0].image.shape == (20, 32)  # the 40 x 64 fixture image, long side to 32
    dataset.transform = detection_train_transform(64, seed=0, crop_size=16)
    assert not dataset._memo
    # An image scaled for 32 px must not be served to the 64 px transform.
    dataset[0]
    assert dataset._memo[0].image.shape == (40, 64)
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(InvalidDatasetError, match="memo_mb must be a finite number >= 0"):
            DetectionDataset(coco_set.records, progress=False, memo_mb=bad)


def test_box_weights_choose_the_lesion_a_positive_crop_holds(coco_set):
    """Image 0 (64 x 40) has a caries box at x 4.5-14.5 and a deep caries box at x 30-42: a 16 px crop holds one."""
    transform = detection_train_transform(64, seed=0, crop_size=16, positive_fraction=1.0)
    dataset = DetectionDataset(coco_set.records, transform=transform, progress=False, memo_mb=64)

    def deep_share() -> float:
        items = [dataset[(0, seed)] for seed in range(200)]
        return sum(1 in item["labels"].tolist() for item in items) / len(items)

    assert 0.35 <= deep_share() <= 0.65  # uniform: one in two
    dataset.box_weights = [np.array([1.0, 9.0], np.float32)] + [
        np.ones(len(record.boxes), np.float32) for record in dataset.records[1:]
    ]
    assert not dataset._memo  # the kept images carried the old weights
    assert deep_share() >= 0.82  # nine in ten
    dataset.box_weights = None
    assert 0.35 <= deep_share() <= 0.65


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (lambda records: [np.ones(len(record.boxes)) for record in records[1:]], "one weight per box"),
        (lambda records: [np.ones(len(record.boxes) + 1) for record in records], "one weight per box"),
        (lambda records: [np.zeros(len(record.boxes)) for record in records], "finite and > 0"),
        (lambda records: [np.full(len(record.boxes), np.nan) for record in records], "finite and > 0"),
    ],
)
def test_bad_box_weights_are_refused(coco_set, weights, message):
    dataset = DetectionDataset(coco_set.records, progress=False)
    with pytest.raises(InvalidDatasetError, match=message):
        dataset.box_weights = weights(dataset.records)
    assert dataset.box_weights is None


def _with_region(coco_set, region: list[float]) -> list[DetectionRecord]:
    first = dataclasses.replace(coco_set.records[0], ignore_boxes=np.array([region], np.float32))
    return [first, *coco_set.records[1:]]


def test_ignore_regions_come_out_apart_from_the_lesions_only_when_asked_for(coco_set, tmp_path):
    records = _with_region(coco_set, [50.0, 30.0, 70.0, 45.0])  # past the image (64 x 40): clipped
    cache = DecodeCache(tmp_path / "cache")
    plain = DetectionDataset(records, cache=cache, progress=False)[0]
    assert plain["ignore_boxes"].shape == (0, 4)
    item = DetectionDataset(records, cache=cache, progress=False, ignore_regions=True)[0]
    assert item["ignore_boxes"].tolist() == [[50.0, 30.0, 64.0, 40.0]]
    assert item["ignore_boxes"].dtype == torch.float32
    assert item["boxes"].tolist() == plain["boxes"].tolist()
    assert item["labels"].tolist() == [0, 1]
    batch = collate_detection([item, DetectionDataset(records, progress=False, ignore_regions=True)[1]])
    assert [regions.shape[0] for regions in batch["ignore_boxes"]] == [1, 0]


def test_ignore_regions_follow_the_crop_and_never_centre_a_positive_one(coco_set):
    """Image 0 (64 x 40): lesions at x 4.5-14.5 and 30-42; a region at x 50-60. Positive 16 px crops hold a lesion
    (never only the region), and the region, where it is in the crop, is in the crop's pixels."""
    records = _with_region(coco_set, [50.0, 12.0, 60.0, 22.0])
    transform = detection_train_transform(64, seed=0, crop_size=16, positive_fraction=1.0, min_visibility=0.0)
    dataset = DetectionDataset(records, transform=transform, progress=False, memo_mb=64, ignore_regions=True)
    items = [dataset[(0, seed)] for seed in range(60)]
    assert all(len(item["labels"]) >= 1 for item in items)
    for item in items:
        assert item["image"].shape == (1, 16, 16)
        for regions in (item["boxes"], item["ignore_boxes"]):
            assert ((regions >= 0) & (regions <= 16)).all()
    mirrored = dataset[(0, 1)]  # the transform is seeded per item: the same draw twice
    assert torch.equal(mirrored["ignore_boxes"], items[1]["ignore_boxes"])
