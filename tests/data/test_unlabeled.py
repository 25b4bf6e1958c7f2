"""Folder discovery and the unlabeled dataset: what is found, what is skipped, and how it is reported."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caries_mim.data import (
    DecodeCache,
    UnlabeledRadiographs,
    contrastive_view_transform,
    find_radiographs,
    mim_pretrain_transform,
)
from caries_mim.errors import InvalidDatasetError
from tests.data.conftest import write_dicom
from tests.dicom_factory import make_dataset, ramp, to_bytes


def write_png(path: Path, height: int = 30, width: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.linspace(0, 255, height * width).reshape(height, width).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """Readable files of several kinds and names, plus things a scan must not pick up."""
    root = tmp_path / "tree"
    write_dicom(root / "b_study" / "IM0001")  # PACS export without a suffix
    write_dicom(root / "b_study" / "1.2.840.113619.2.55.3.4")  # named by its UID: numeric "suffix"
    write_dicom(root / "a.DCM")
    write_png(root / "nested" / "deeper" / "scan.png")
    write_dicom(root / "DICOMDIR")  # a media-set index, never an image
    write_dicom(root / ".hidden.dcm")
    write_dicom(root / ".cache" / "inside_hidden_folder.dcm")
    (root / "README").write_text("not an image")
    (root / "notes.txt").write_text("not an image either")
    return root


def relative(paths: list[Path], root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path in paths]


def test_scan_finds_suffixed_and_unnamed_dicom_and_skips_the_rest(mixed_tree):
    found = find_radiographs(mixed_tree)
    assert relative(found, mixed_tree) == [
        "a.DCM",
        "b_study/1.2.840.113619.2.55.3.4",
        "b_study/IM0001",
        "nested/deeper/scan.png",
    ]
    assert find_radiographs(mixed_tree) == found


def test_scan_keeps_root_order_and_lists_each_file_once(mixed_tree):
    nested = mixed_tree / "nested"
    found = find_radiographs([nested, mixed_tree, mixed_tree / "a.DCM"])
    assert relative(found, mixed_tree) == [
        "nested/deeper/scan.png",
        "a.DCM",
        "b_study/1.2.840.113619.2.55.3.4",
        "b_study/IM0001",
    ]


def test_scan_of_missing_folder_names_it(tmp_path):
    with pytest.raises(InvalidDatasetError, match="not_there"):
        find_radiographs([tmp_path, tmp_path / "not_there"])


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> Path:
    root = tmp_path / "unlabeled"
    write_dicom(root / "good_1.dcm", seed=1)
    write_dicom(root / "good_2", seed=2)
    write_png(root / "good_3.png")
    (root / "garbage.dcm").write_bytes(b"this is not an image" * 20)
    (root / "empty.png").write_bytes(b"")
    truncated = to_bytes(make_dataset(ramp(64, 64)))
    (root / "truncated.dcm").write_bytes(truncated[: len(truncated) - 2000])
    write_dicom(root / "chest.dcm", modality="CT")
    return root


def test_dataset_skips_unreadable_files_with_one_summarized_warning(folder_with_bad_files, caplog):
    with caplog.at_level(logging.WARNING, logger="caries_mim.data"):
        dataset = UnlabeledRadiographs(folder_with_bad_files, progress=False)
    assert [path.name for path in dataset.paths] == ["good_1.dcm", "good_2", "good_3.png"]
    assert dict(dataset.skipped.counts) == {"not_an_image": 2, "corrupt_pixel_data": 1, "unsupported_modality": 1}
    assert dataset.skipped.total == 4
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 4 of 7" in message
    assert "not_an_image: 2" in message
    assert "corrupt_pixel_data: 1" in message
    assert "truncated.dcm" in message
    assert "TEST^PATIENT" not in message
    assert "TEST-0001" not in message


def test_items_are_single_channel_float_tensors(folder_with_bad_files):
    dataset = UnlabeledRadiographs(folder_with_bad_files, progress=False)
    item = dataset[2]
    assert item.dtype == torch.float32
    assert item.shape == (1, 30, 40)
    assert float(item.min()) >= 0.0
    assert float(item.max()) <= 1.0

    augmented = UnlabeledRadiographs(folder_with_bad_files, transform=mim_pretrain_transform(32), progress=False)
    for index in range(len(augmented)):
        tensor = augmented[index]
        assert tensor.shape == (1, 32, 32)
        assert tensor.dtype == torch.float32


def test_second_scan_reads_everything_from_the_cache(folder_with_bad_files, tmp_path):
    cache = DecodeCache(tmp_path / "cache")
    first = UnlabeledRadiographs(folder_with_bad_files, cache=cache, progress=False)
    misses = cache.misses
    second = UnlabeledRadiographs(folder_with_bad_files, cache=cache, progress=False)
    assert cache.misses == misses, "the validation pass decoded again"
    assert second.paths == first.paths
    assert dict(second.skipped.counts) == dict(first.skipped.counts)
    torch.testing.assert_close(second[0], first[0], rtol=0, atol=0)


def test_dataset_pickles_for_dataloader_workers(folder_with_bad_files, tmp_path):
    dataset = UnlabeledRadiographs(folder_with_bad_files, cache=DecodeCache(tmp_path / "cache"), progress=False)
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[1], dataset[1], rtol=0, atol=0)


def test_empty_folder_raises_naming_it(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InvalidDatasetError, match="empty_folder") as caught:
        UnlabeledRadiographs(empty, progress=False)
    assert "no radiograph files" in caught.value.message


def test_folder_of_only_unreadable_files_raises(tmp_path):
    root = tmp_path / "all_bad"
    root.mkdir()
    (root / "a.dcm").write_bytes(b"junk")
    (root / "b.png").write_bytes(b"junk")
    with pytest.raises(InvalidDatasetError, match="2 candidate file"):
        UnlabeledRadiographs(root, progress=False)


def test_dataloader_workers_draw_different_augmentations(tmp_path):
    root = tmp_path / "same_images"
    for index in range(4):
        write_png(root / f"copy_{index}.png", 64, 64)  # identical pixels: only the augmentation differs
    dataset = UnlabeledRadiographs(root, transform=mim_pretrain_transform(16, seed=0), progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    first_worker_batch, second_worker_batch = list(loader)
    assert not torch.equal(first_worker_batch, second_worker_batch)


def test_two_views_of_one_decode_differ_and_repeat_with_their_seed(tmp_path, monkeypatch):
    root = tmp_path / "views"
    write_png(root / "a.png", 64, 64)
    write_png(root / "b.png", 48, 64)
    dataset = UnlabeledRadiographs(root, transform=contrastive_view_transform(32), views=2, progress=False)
    reads = []
    real_load = dataset.load
    monkeypatch.setattr(dataset, "load", lambda path: reads.append(path) or real_load(path))
    pair = dataset[(0, 123)]
    assert pair.shape == (2, 1, 32, 32)
    assert pair.dtype == torch.float32
    assert len(reads) == 1, "each view decoded the image again"
    assert not torch.equal(pair[0], pair[1])
    torch.testing.assert_close(dataset[(0, 123)], pair, rtol=0, atol=0)
    assert not torch.equal(dataset[(0, 124)], pair)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch.shape == (2, 2, 1, 32, 32)


def test_more_than_one_view_needs_a_transform(folder_with_bad_files):
    with pytest.raises(ValueError, match="views"):
        UnlabeledRadiographs(folder_with_bad_files, views=2, progress=False)
