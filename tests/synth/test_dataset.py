"""generate_dataset: layout, COCO files, manifest, determinism, folder policy, argument checks."""

from __future__ import annotations

import hashlib
import json

import pydicom
import pytest
from pycocotools.coco import COCO

from caries_mim.errors import InvalidArgumentError
from caries_mim.synth import SynthConfig, generate_dataset

#: Small images keep the dataset tests fast; everything else is the default distribution.
SMALL = SynthConfig(width_px_range=(400.0, 480.0), spacing_mm_range=(0.02, 0.09))


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate_dataset(out, n_unlabeled=3, n_labeled=14, seed=7, config=SMALL, progress=False)
    return out, summary


def test_layout_and_summary(dataset):
    out, summary = dataset
    assert len(list((out / "unlabeled").glob("*.dcm"))) == 3
    assert len(list((out / "labeled" / "images").glob("*.dcm"))) == 14
    assert summary.n_images == 17
    assert summary.splits == {"train": 10, "val": 2, "test": 2}
    assert summary.transfer_syntaxes == {"explicit_vr_little_endian": 6, "rle_lossless": 6, "jpeg2000_lossless": 5}
    json.dumps(summary.to_dict())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["seed"] == 7
    assert SynthConfig.from_dict(manifest["config"]) == SMALL
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_coco_files_load_and_are_consistent(dataset):
    out, summary = dataset
    seen_images, n_annotations, n_subthreshold = set(), 0, 0
    for name in ("train", "val", "test"):
        coco = COCO(str(out / "labeled" / f"{name}.json"))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"caries", "deep_caries"}
        for image_id, info in coco.imgs.items():
            assert image_id not in seen_images
            seen_images.add(image_id)
            ds = pydicom.dcmread(out / "labeled" / info["file_name"], stop_before_pixels=True)
            assert (ds.Rows, ds.Columns) == (info["height"], info["width"])
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
                x, y, w, h = ann["bbox"]
                assert min(x, y) >= 0
                assert min(w, h) > 0
                assert x + w <= info["width"]
                assert y + h <= info["height"]
                assert ann["area"] == pytest.approx(w * h)
                assert ann["depth"] in ("enamel", "outer_dentin", "inner_dentin")
                assert ann["iscrowd"] == 0
                assert ann["conspicuity"] >= SMALL.visibility_floor
                assert len(ann["field_bbox"]) == 4
                n_annotations += 1
            n_subthreshold += len(info["subthreshold_lesions"])
            for lesion in info["subthreshold_lesions"]:
                assert lesion["conspicuity"] < SMALL.visibility_floor
                assert lesion["label"] in ("caries", "deep_caries")
    assert len(seen_images) == 14
    assert n_annotations == sum(summary.lesions.values())
    assert n_subthreshold == summary.subthreshold_lesions


def test_same_seed_same_files_with_any_worker_count(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, n_unlabeled=3, n_labeled=14, seed=7, config=SMALL, progress=False, workers=2)
    assert _digests(again) == _digests(out)
    for name in ("train", "val", "test"):
        assert (again / "labeled" / f"{name}.json").read_text() == (out / "labeled" / f"{name}.json").read_text()


def test_rerun_into_previous_output_replaces_only_our_files(tmp_path):
    out = tmp_path / "out"
    generate_dataset(out, n_unlabeled=2, n_labeled=0, seed=1, config=SMALL, progress=False)
    (out / "notes.txt").write_text("keep me")
    generate_dataset(out, n_unlabeled=1, n_labeled=1, seed=1, config=SMALL, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(list((out / "unlabeled").glob("*.dcm"))) == 1


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "data.dcm").write_bytes(b"not ours")
    with pytest.raises(InvalidArgumentError, match="not empty"):
        generate_dataset(tmp_path, n_unlabeled=1, n_labeled=0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data.dcm"]


def test_an_output_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(InvalidArgumentError, match="cannot create the output folders"):
        generate_dataset(tmp_path / "file" / "out", n_unlabeled=1, n_labeled=0, progress=False)


@pytest.mark.parametrize(
    ("n_unlabeled", "n_labeled", "seed", "workers"),
    [(-1, 2, 0, 1), (2, -1, 0, 1), (0, 0, 0, 1), (1, 1, -3, 1), (1, 1, 0, 0), (1.5, 1, 0, 1)],
)
def test_bad_arguments(tmp_path, n_unlabeled, n_labeled, seed, workers):
    with pytest.raises(InvalidArgumentError):
        generate_dataset(tmp_path / "o", n_unlabeled, n_labeled, seed=seed, progress=False, workers=workers)
    assert not (tmp_path / "o").exists()


def test_bad_config_values():
    with pytest.raises(InvalidArgumentError):
        SynthConfig(lesion_free_fraction=1.5)
    with pytest.raises(InvalidArgumentError):
        SynthConfig(transfer_syntaxes=("jpeg_baseline",))
    with pytest.raises(InvalidArgumentError):
        SynthConfig.from_dict({"no_such_knob": 1})
