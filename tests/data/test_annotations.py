"""Annotation loaders on fixtures in the published layouts, path resolution, and every error case."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from caries_mim.data import load_annotations
from caries_mim.data.records import box_categories
from caries_mim.errors import InvalidArgumentError, InvalidDatasetError
from tests.data.conftest import FIXTURES

DENTEX_JSON = "train_quadrant_enumeration_disease.json"


def boxes_of(annotation_set, image_id):
    record = next(r for r in annotation_set.records if r.image_id == image_id)
    return record.boxes.tolist(), record.labels.tolist()


def test_dentex_layout_loads_diagnoses_from_level_3():
    source = FIXTURES / "dentex" / "quadrant_enumeration_disease" / DENTEX_JSON
    dataset = load_annotations(source)
    assert dataset.format == "dentex"
    assert dataset.classes == ("caries", "deep_caries")
    assert [r.image_id for r in dataset.records] == [1, 2, 3]
    assert boxes_of(dataset, 1) == ([[10, 5, 22, 25], [40, 8, 50, 26]], [0, 1])
    assert boxes_of(dataset, 2) == ([], [])  # only a periapical lesion: kept as a caries negative
    assert boxes_of(dataset, 3) == ([[50, 10, 58, 18]], [0])
    assert dict(dataset.stats.dropped_unmapped) == {"Impacted": 1, "Periapical Lesion": 1}
    record = dataset.records[0]
    assert record.image_path == source.parent / "xrays" / "train_0.png"  # the release's xrays/ folder
    assert (record.width, record.height) == (96, 48)
    assert record.boxes.dtype == np.float32
    assert record.boxes.shape == (2, 4)
    assert record.labels.dtype == np.int64


def test_dentex_class_map_is_configurable():
    source = FIXTURES / "dentex" / "quadrant_enumeration_disease" / DENTEX_JSON
    dataset = load_annotations(
        source, format="dentex", class_map={"Caries": "caries", "Deep Caries": "caries", "Impacted": "impacted"}
    )
    assert dataset.classes == ("caries", "impacted")
    assert boxes_of(dataset, 1)[1] == [0, 0, 1]
    assert dict(dataset.stats.dropped_unmapped) == {"Periapical Lesion": 1}


def test_dentex_file_without_diagnoses_is_refused(dentex_dir):
    data = json.loads((dentex_dir / DENTEX_JSON).read_text())
    del data["categories_3"]
    quadrant_only = dentex_dir / "train_quadrant_enumeration.json"
    quadrant_only.write_text(json.dumps(data))
    with pytest.raises(InvalidDatasetError, match="categories_3"):
        load_annotations(quadrant_only)


def test_coco_from_the_synthetic_generator():
    source = FIXTURES / "coco" / "annotations.json"
    dataset = load_annotations(source)
    assert dataset.format == "coco"
    assert dataset.classes == ("caries", "deep_caries")
    assert boxes_of(dataset, 0) == ([[4.5, 6.0, 14.5, 14.0], [30.0, 10.0, 42.0, 24.0]], [0, 1])
    assert boxes_of(dataset, 1) == ([], [])
    assert boxes_of(dataset, 2) == ([[50.0, 30.0, 56.0, 35.0]], [0])
    assert dataset.records[2].image_path == source.parent / "images" / "synth_000002.png"
    assert dataset.stats.boxes == 3
    assert dataset.stats.images == 3


def test_the_depth_and_surface_of_each_box_are_kept_and_make_its_repeat_factor_category():
    dataset = load_annotations(FIXTURES / "coco" / "annotations.json")
    first = dataset.records[0]
    assert first.box_attributes == (
        {"depth": "enamel", "surface": "mesial"},
        {"depth": "dentin", "surface": "occlusal"},
    )
    assert box_categories(first) == [0, 1]
    assert box_categories(first, "surface") == [(0, "mesial"), (1, "occlusal")]
    assert box_categories(dataset.records[1], "surface") == []
    bare = dataclasses.replace(first, box_attributes=())  # a format without attributes
    assert box_categories(bare, "surface") == [(0, None), (1, None)]
    with pytest.raises(ValueError, match="attribute must be one of depth, surface"):
        box_categories(first, "conspicuity")


def test_coco_class_map_selects_and_renames():
    dataset = load_annotations(FIXTURES / "coco" / "annotations.json", class_map={"deep_caries": "caries"})
    assert dataset.classes == ("caries",)
    assert boxes_of(dataset, 0) == ([[30.0, 10.0, 42.0, 24.0]], [0])
    assert dict(dataset.stats.dropped_unmapped) == {"caries": 2}


def test_kaggle_csv_layout():
    source = FIXTURES / "kaggle" / "train" / "_annotations.csv"
    dataset = load_annotations(source)
    assert dataset.format == "csv"
    assert dataset.classes == ("caries",)
    assert [r.image_path.name for r in dataset.records] == ["0001_jpg.rf.aa11.png", "0002_jpg.rf.bb22.png"]
    assert boxes_of(dataset, 0) == ([[10, 12, 20, 30], [50, 40, 62, 55]], [0, 0])
    assert boxes_of(dataset, 1) == ([], [])
    assert dict(dataset.stats.dropped_unmapped) == {"Fillings": 1, "Implant": 1, "Impacted Tooth": 1}
    assert (dataset.records[0].width, dataset.records[0].height) == (80, 60)


def test_csv_is_detected_by_its_header_whatever_the_suffix(kaggle_dir):
    renamed = kaggle_dir / "labels.txt"
    shutil.copyfile(kaggle_dir / "_annotations.csv", renamed)
    assert load_annotations(renamed).format == "csv"


def test_image_root_when_annotations_live_apart(tmp_path, coco_dir, kaggle_dir):
    moved = tmp_path / "annotations_only" / "instances.json"
    moved.parent.mkdir()
    shutil.move(coco_dir / "annotations.json", moved)
    with pytest.raises(InvalidDatasetError, match="3 image file") as caught:
        load_annotations(moved)
    assert "synth_000000.png" in caught.value.message
    assert "image_root" in caught.value.message
    dataset = load_annotations(moved, image_root=coco_dir)
    assert dataset.records[0].image_path == coco_dir / "images" / "synth_000000.png"

    csv_moved = tmp_path / "annotations_only" / "boxes.csv"
    shutil.move(kaggle_dir / "_annotations.csv", csv_moved)
    assert load_annotations(csv_moved, image_root=kaggle_dir).records[1].image_path == (
        kaggle_dir / "0002_jpg.rf.bb22.png"
    )


def test_dentex_image_root_overrides_xrays_folder(tmp_path, dentex_dir):
    elsewhere = Path(shutil.move(dentex_dir / "xrays", tmp_path / "pngs"))
    with pytest.raises(InvalidDatasetError, match="not found"):
        load_annotations(dentex_dir / DENTEX_JSON)
    dataset = load_annotations(dentex_dir / DENTEX_JSON, image_root=elsewhere)
    assert dataset.records[0].image_path == elsewhere / "train_0.png"


def test_missing_images_are_listed_with_a_count(coco_dir):
    for name in ("synth_000000.png", "synth_000002.png"):
        (coco_dir / "images" / name).unlink()
    with pytest.raises(InvalidDatasetError, match="2 image file") as caught:
        load_annotations(coco_dir / "annotations.json")
    assert "synth_000000.png" in caught.value.message
    assert "synth_000002.png" in caught.value.message


def edit_coco(coco_dir: Path, edit) -> Path:
    path = coco_dir / "annotations.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _set(key, value):
    def apply(data):
        target = data
        for part in key[:-1]:
            target = target[part]
        target[key[-1]] = value

    return apply


def _delete(key):
    def apply(data):
        target = data
        for part in key[:-1]:
            target = target[part]
        del target[key[-1]]

    return apply


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_delete(("images",)), "missing top-level key 'images'"),
        (_delete(("annotations",)), "missing top-level key 'annotations'"),
        (_set(("categories",), {"1": "caries"}), "'categories' must be a list of objects"),
        (_delete(("annotations", 0, "bbox")), r"annotations\[0\] has no 'bbox'"),
        (_delete(("images", 1, "file_name")), r"images\[1\] has no 'file_name'"),
        (_set(("annotations", 1, "category_id"), 7), r"annotations\[1\] has category_id 7, which is not in"),
        (_set(("annotations", 2, "image_id"), 99), r"annotations\[2\] refers to image id 99"),
        (_set(("annotations", 0, "bbox"), [1, 2, 3]), r"bbox must be \[x, y, width, height\]"),
        (_set(("annotations", 0, "bbox"), [10, 10, -4, 5]), "negative width or height"),
        (_set(("annotations", 0, "bbox"), [10, "a", 4, 5]), "must be a finite number"),
        (_set(("images", 2, "id"), 0), "image id 0 appears twice"),
        (_set(("images", 0, "width"), -64), "width must be a positive integer"),
    ],
)
def test_coco_errors_name_the_file_and_the_problem(coco_dir, edit, expected):
    path = edit_coco(coco_dir, edit)
    with pytest.raises(InvalidDatasetError, match=expected) as caught:
        load_annotations(path)
    assert str(path) in caught.value.message
    assert caught.value.code == "invalid_dataset"


def test_malformed_json_reports_the_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(InvalidDatasetError, match=r"malformed JSON at line 2"):
        load_annotations(path)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(InvalidDatasetError, match="expected a JSON object"):
        load_annotations(path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InvalidDatasetError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.json")


def test_unknown_format_is_an_argument_error():
    with pytest.raises(InvalidArgumentError, match="yolo"):
        load_annotations(FIXTURES / "coco" / "annotations.json", format="yolo")


def test_class_map_matching_no_category(tmp_path):
    with pytest.raises(InvalidDatasetError, match="no box would be kept"):
        load_annotations(FIXTURES / "coco" / "annotations.json", class_map={"Caries": "caries"})


def test_zero_area_boxes_are_dropped_and_overshooting_boxes_clipped(coco_dir, caplog):
    def edit(data):
        data["annotations"] += [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 8]},  # zero width
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [-3, 30, 10, 20]},  # past left and bottom
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [70, 5, 5, 5]},  # wholly right of the image
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 1},
        ]

    dataset = load_annotations(edit_coco(coco_dir, edit))
    assert boxes_of(dataset, 1) == ([[0.0, 30.0, 7.0, 40.0]], [0])
    assert dataset.stats.dropped_degenerate == 2
    assert dataset.stats.clipped == 1
    assert dataset.stats.ignore_regions == 1
    first = next(record for record in dataset.records if record.image_id == 1)
    assert first.ignore_boxes.tolist() == [[1.0, 1.0, 4.0, 4.0]]  # the crowd box: not a finding
    assert "dropped 2 zero-area" in caplog.text
    assert "1 ignore region(s)" in caplog.text


def test_lesions_under_the_visibility_floor_become_ignore_regions(coco_dir):
    """The synthetic generator lists them per image (``subthreshold_lesions``, corners in ``field_box``)."""

    def edit(data):
        data["images"][0]["subthreshold_lesions"] = [
            {"field_box": [20, 2, 26, 9], "conspicuity": 3.1, "label": "caries"},
            {"field_box": [60, 30, 90, 50], "conspicuity": 2.0, "label": "caries"},  # past the right edge: clipped
        ]

    dataset = load_annotations(edit_coco(coco_dir, edit))
    first, *others = dataset.records
    assert first.ignore_boxes.tolist() == [[20.0, 2.0, 26.0, 9.0], [60.0, 30.0, 64.0, 40.0]]
    assert len(first.boxes) == 2  # the findings are as before
    assert all(record.ignore_boxes.shape == (0, 4) for record in others)
    assert dataset.stats.ignore_regions == 2


@pytest.mark.parametrize(
    ("lesions", "message"),
    [
        ({"field_box": [1, 2, 3, 4]}, "subthreshold_lesions must be a list"),
        ([{"conspicuity": 2.0}], r"subthreshold_lesions\[0\] needs a field_box"),
        ([{"field_box": [5, 5, 2, 9]}], "negative width or height"),
    ],
)
def test_malformed_subthreshold_lesions_are_named(coco_dir, lesions, message):
    def edit(data):
        data["images"][0]["subthreshold_lesions"] = lesions

    with pytest.raises(InvalidDatasetError, match=message):
        load_annotations(edit_coco(coco_dir, edit))


def write_csv(folder: Path, text: str) -> Path:
    path = folder / "_annotations.csv"
    path.write_text(text)
    return path


HEADER = "filename,width,height,class,xmin,ymin,xmax,ymax\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("filename,width,height,class,xmin,ymin,xmax\n", "missing CSV column"),
        (HEADER, "no rows"),
        (HEADER + "0001_jpg.rf.aa11.png,80,60,Cavity,10,12,abc,30\n", "line 2: column xmax must be a number"),
        (HEADER + "0001_jpg.rf.aa11.png,80,60,Cavity,10,12,20\n", "line 2: column ymax must be a number"),
        (HEADER + "0001_jpg.rf.aa11.png,80,60,Cavity,20,12,10,30\n", "line 2: box has negative width"),
        (
            HEADER + "0001_jpg.rf.aa11.png,80,60,Cavity,1,1,5,5\n0001_jpg.rf.aa11.png,81,60,Cavity,1,1,5,5\n",
            "line 3: 0001_jpg.rf.aa11.png is 81 x 60 here but 80 x 60 on line 2",
        ),
        (HEADER + ",80,60,Cavity,1,1,5,5\n", "line 2: empty filename"),
        (HEADER + "0001_jpg.rf.aa11.png,80,0,Cavity,1,1,5,5\n", "height must be a positive integer"),
        (HEADER + "missing.png,80,60,Cavity,1,1,5,5\n", "1 image file.*missing.png"),
    ],
)
def test_csv_errors_name_the_file_and_the_line(kaggle_dir, body, expected):
    path = write_csv(kaggle_dir, body)
    with pytest.raises(InvalidDatasetError, match=expected) as caught:
        load_annotations(path)
    assert str(path) in caught.value.message
