"""``caries-mim predict``: a JSON line per file, error lines for unreadable files, overlays, exit statuses, and no
patient identifier anywhere."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
import torch
from PIL import Image

from caries_mim.detection import CariesDetector
from caries_mim.package import ModelPackage, save_package
from caries_mim.synth import generate_dataset
from caries_mim.synth.config import SynthConfig
from pipelines.cli import main
from pipelines.predict import overlay_path, run_predict
from tests.detection.tiny import tiny_config

CLASSES = ("caries", "deep_caries")


def make_package(path: Path, threshold: float) -> Path:
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(class_names=CLASSES))
    return save_package(ModelPackage.from_detector(detector, threshold=threshold, version="0.2.0"), path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three small synthetic DICOM files, plus a README the folder walk must skip."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(
        out, n_unlabeled=3, n_labeled=0, seed=1, progress=False, config=SynthConfig(width_px_range=(300, 360))
    )
    (out / "unlabeled" / "README.txt").write_text("not a radiograph, and not reported")
    return out / "unlabeled"


@pytest.fixture(scope="module")
def everything_counts(tmp_path_factory) -> Path:
    """Threshold 0: every detection is a finding."""
    return make_package(tmp_path_factory.mktemp("pkg") / "all.cmpkg", threshold=0.0)


@pytest.fixture(scope="module")
def nothing_counts(tmp_path_factory) -> Path:
    """Threshold 1: an untrained detector's scores never reach it."""
    return make_package(tmp_path_factory.mktemp("pkg") / "none.cmpkg", threshold=1.0)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_line_per_file_and_error_lines_for_unreadable_ones(everything_counts, images, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_text("not an image")
    missing = tmp_path / "missing.dcm"
    out = io.StringIO()
    predicted, seen = run_predict(everything_counts, [images, junk, missing], out=out, device="cpu")
    records = _lines(out.getvalue())
    dicoms = sorted(images.glob("*.dcm"))
    assert (predicted, seen) == (3, 5)
    assert [r["file"] for r in records] == [*map(str, dicoms), str(junk), str(missing)]
    for record in records[:3]:
        assert record["ok"] is True
        assert record["threshold"] == 0.0
        assert record["package_version"] == "0.2.0"
        assert record["findings"], "threshold 0 keeps every detection"
        rows, columns = record["image"]["rows"], record["image"]["columns"]
        for finding in record["findings"]:
            assert finding["above_threshold"] is True
            assert finding["label"] in CLASSES
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 <= x1 <= columns
            assert 0 <= y0 <= y1 <= rows
            assert finding["box_mm"] is not None  # the synthetic DICOM files carry their pixel spacing
        assert "overlay" not in record
    assert records[3]["ok"] is False
    assert records[3]["error"]["code"] == "not_an_image"
    assert records[4]["ok"] is False
    assert records[4]["error"]["code"] == "unreadable_file"
    assert all(record["error"]["message"] for record in records[3:])


def test_only_findings_at_the_operating_point_unless_all_are_asked_for(nothing_counts, images):
    first = sorted(images.glob("*.dcm"))[0]
    out = io.StringIO()
    run_predict(nothing_counts, [first], out=out, device="cpu")
    assert _lines(out.getvalue())[0]["findings"] == []
    out = io.StringIO()
    run_predict(nothing_counts, [first], out=out, device="cpu", include_below_threshold=True)
    findings = _lines(out.getvalue())[0]["findings"]
    assert findings
    assert all(finding["above_threshold"] is False for finding in findings)


def test_overlays_are_written_per_readable_file_at_original_size(everything_counts, images, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG broken")
    folder = tmp_path / "overlays" / "nested"
    out = io.StringIO()
    run_predict(everything_counts, [images, junk], overlay_dir=folder, out=out, device="cpu")
    records = _lines(out.getvalue())
    written = sorted(p.name for p in folder.iterdir())
    assert written == sorted(f"{p.stem}.png" for p in images.glob("*.dcm"))
    for record in records[:-1]:
        with Image.open(record["overlay"]) as overlay:
            assert overlay.size == (record["image"]["columns"], record["image"]["rows"])
    assert "overlay" not in records[-1]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_overlay_names_come_from_the_file_name_and_never_collide(tmp_path):
    used: set[str] = set()
    names = [
        overlay_path(tmp_path, Path(name), used).name
        for name in ("a/scan.dcm", "b/scan.dcm", "c/scan.DCM", "1.2.840.10008.5.1", "vol.nii.gz", "scan-2.png")
    ]
    assert names == ["scan.png", "scan-2.png", "scan-3.png", "1.2.840.10008.5.1.png", "vol.png", "scan-2-2.png"]


def test_cli_exit_status_says_whether_every_file_was_predicted(everything_counts, images, tmp_path, capsys):
    model = ["predict", "--model", str(everything_counts), "--device", "cpu"]
    assert main([*model, str(images)]) == 0
    captured = capsys.readouterr()
    assert len(_lines(captured.out)) == 3
    assert captured.err.strip() == "predict: 3 of 3 file(s) predicted"

    junk = tmp_path / "junk.dcm"
    junk.write_text("x")
    assert main([*model, str(images), str(junk), "--overlay", str(tmp_path / "ov")]) == 2
    captured = capsys.readouterr()
    assert [r["ok"] for r in _lines(captured.out)] == [True, True, True, False]
    assert "predict: 3 of 4 file(s) predicted" in captured.err
    assert len(list((tmp_path / "ov").iterdir())) == 3

    assert main([*model, "--dicom-only", str(tmp_path / "ov")]) == 2  # PNG overlays refused by --dicom-only
    assert {r["error"]["code"] for r in _lines(capsys.readouterr().out)} == {"unsupported_modality"}


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda tmp: tmp / "missing.cmpkg", "invalid_checkpoint"),
        (lambda tmp: _write(tmp / "garbage.cmpkg", b"garbage"), "invalid_checkpoint"),
    ],
    ids=["missing", "corrupt"],
)
def test_cli_bad_package_is_one_line_with_status_2(images, tmp_path, capsys, make, code):
    package = make(tmp_path)
    assert main(["predict", "--model", str(package), str(images)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"caries-mim predict: error [{code}]: ")
    assert "Traceback" not in captured.err


def test_cli_with_nothing_to_predict(everything_counts, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", str(everything_counts), str(empty)]) == 2
    assert "no radiograph files found" in capsys.readouterr().err
    assert main(["predict", "--model", str(everything_counts), "--device", "tpu", str(empty)]) == 2
    assert "[invalid_argument]" in capsys.readouterr().err


def test_no_patient_identifier_in_output_or_overlay_names(everything_counts, images, tmp_path, capsys):
    identifiers = set()
    for path in images.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)}
    assert main(["predict", "--model", str(everything_counts), str(images), "--overlay", str(tmp_path / "ov")]) == 0
    captured = capsys.readouterr()
    seen = captured.out + captured.err + " ".join(p.name for p in (tmp_path / "ov").iterdir())
    assert not [identifier for identifier in identifiers if identifier in seen]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_without_a_model_the_shipped_reference_detector_predicts(
    everything_counts, images, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("caries_mim.package.REFERENCE_DETECTOR", everything_counts)
    assert main(["predict", "--device", "cpu", str(images)]) == 0
    assert len(_lines(capsys.readouterr().out)) == 3
    monkeypatch.setattr("caries_mim.package.REFERENCE_DETECTOR", tmp_path / "models" / "reference_detector.cmpkg")
    assert main(["predict", "--device", "cpu", str(images)]) == 2
    err = capsys.readouterr().err
    assert "no shipped reference detector" in err
    assert "make reference" in err
