"""The demo (what `make demo` runs) and the `synth` command, end to end on small synthetic sets."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DigitalIntraOralXRayImageStorageForPresentation

from caries_mim.package import FOUNDATION_ENCODER, load_package
from pipelines.cli import main
from pipelines.demo import DEMO_BUDGET_SECONDS, DEMO_LABELED, DEMO_PRETRAIN_STEPS, DEMO_UNLABELED


def test_synth_command_writes_a_dataset_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["synth", str(out), "--unlabeled", "2", "--labeled", "3", "--seed", "5", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["unlabeled"] == 2
    assert summary["labeled"] == 3
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 5
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "IO"
    assert ds.SOPClassUID == DigitalIntraOralXRayImageStorageForPresentation
    assert {p.name for p in (out / "labeled").glob("*.json")} == {"train.json", "val.json", "test.json"}


def test_synth_refuses_a_foreign_folder_with_a_one_line_error(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("user data")
    assert main(["synth", str(tmp_path), "--labeled", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "invalid_argument" in err
    assert "Traceback" not in err
    assert (tmp_path / "precious.txt").read_text() == "user data"


def test_synth_with_nothing_to_do_is_a_user_error(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "out")]) == 2
    assert "nothing to generate" in capsys.readouterr().err


def test_synth_settings_change_the_generator_and_land_in_the_manifest(tmp_path, capsys):
    out = tmp_path / "noisy"
    args = ["synth", str(out), "--labeled", "1", "--quiet", "--set", "exposure_photons=[300, 600]"]
    assert main([*args, "--set", "spacing_mm_range=[0.05, 0.06]", "--set", "width_px_range=[400, 420]"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["exposure_photons"] == [300, 600]
    ds = pydicom.dcmread(next(out.rglob("*.dcm")), stop_before_pixels=True)
    assert 0.05 <= float(ds.ImagerPixelSpacing[0]) <= 0.06


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("bogus=1", "unknown SynthConfig key(s): bogus"),
        ("exposure_photons=fast", "exposure_photons: expected a list"),
        ("exposure_photons=[9, 1]", "low <= high"),
        ("a.b=1", "plain fields"),
    ],
)
def test_bad_synth_settings_are_one_line_errors(tmp_path, capsys, setting, message):
    assert main(["synth", str(tmp_path / "out"), "--labeled", "1", "--quiet", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo", "--out", str(out), "--unlabeled", "3", "--labeled", "16", "--seed", "1",
        "--pretrain-steps", "4", "--finetune-steps", "3",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "caries-mim demo finished" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["read_back"]["files"] == 19
    assert sum(summary["read_back"]["transfer_syntaxes"].values()) == 19
    assert sum(split["images"] for split in summary["splits"].values()) == 16
    for picture in summary["pictures"].values():
        with open(picture, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    pretrain = summary["pretrain"]
    assert pretrain["steps"] == 4
    # MAE continued from the shipped foundation encoder, and the detector fine-tuned from that continuation.
    assert summary["encoder"] == pretrain["init_from"] == str(FOUNDATION_ENCODER)
    assert pretrain["images_in_dataset"] == 19
    assert (out / "pretrain" / "encoder.pt").is_file()
    with open(pretrain["reconstructions"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # The detector was fine-tuned from that encoder, packaged, evaluated on the test split and used to predict.
    finetune = summary["finetune"]
    assert finetune["steps"] == 3
    assert finetune["encoder"] == pretrain["encoder"]
    predictor = load_package(finetune["package"])
    assert predictor.class_names == ("caries", "deep_caries")
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["data"]["images"] == summary["splits"]["test"]["images"]
    assert 0.0 <= summary["evaluate"]["ap50"] <= 1.0
    assert summary["evaluate"]["ap50"] == metrics["coco"]["ap50"]
    assert "AP50" in printed
    assert "false positives per image" in printed
    assert summary["evaluate"]["sensitivity_by_depth"] == {
        name: stratum["sensitivity"] for name, stratum in metrics["operating_point"]["by_depth"].items()
    }
    rows = [json.loads(line) for line in (out / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == min(4, summary["splits"]["test"]["images"])
    assert all(row["ok"] for row in rows)
    # The service answered over HTTP in all three forms, and the SR references the DICOM it was sent.
    service = summary["service"]
    assert service["exit_status"] in (0, -15)
    served = json.loads(Path(service["outputs"]["application/json"]).read_text())
    assert served["findings"] == service["findings"]
    report = pydicom.dcmread(service["outputs"]["application/dicom"])
    assert report.Modality == "SR"
    source = pydicom.dcmread(out / "synthetic" / "labeled" / "images" / service["file"], stop_before_pixels=True)
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert Path(service["outputs"]["image/png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "service:" in printed
    assert set(summary["stage_seconds"]) == {
        "synth", "read_back", "splits", "previews", "pretrain", "finetune", "evaluate", "predict", "service"
    }  # fmt: skip
    # A second run replaces the demo's own runs instead of refusing them; by default (no MAE continuation) the
    # detector starts from the shipped foundation encoder itself.
    capsys.readouterr()
    assert main([*argv[:-4], "--pretrain-steps", "0", "--finetune-steps", "2"]) == 0
    again = json.loads((out / "demo_summary.json").read_text())
    assert again["pretrain"] is None
    assert not (out / "pretrain").exists()
    assert again["finetune"]["encoder"] == str(FOUNDATION_ENCODER)
    assert again["finetune"]["steps"] == 2
    assert "pretrain" not in again["stage_seconds"]
    assert f"from {FOUNDATION_ENCODER}" in capsys.readouterr().out


def test_the_demo_without_a_foundation_encoder_says_how_to_get_one_before_writing_anything(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("caries_mim.package.FOUNDATION_ENCODER", tmp_path / "models" / "foundation_encoder.pt")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--labeled", "16", "--finetune-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no shipped foundation encoder" in err
    assert "make reference-cpu" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_demo_help_names_the_demo_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"labeled images, split 70/15/15 into train/val/test (default: {DEMO_LABELED})" in text
    assert f"unlabeled images (default: {DEMO_UNLABELED})" in text
    assert f"0 skips them (default: {DEMO_PRETRAIN_STEPS})" in text
    assert f"(default: {DEMO_BUDGET_SECONDS / 60:g}, inside the 15-minute promise)" in text


@pytest.mark.parametrize("minutes", ["0", "-3", "nan", "soon"])
def test_a_bad_demo_budget_is_a_usage_error(minutes, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--budget-minutes", minutes])
    assert stopped.value.code == 2
    assert "--budget-minutes" in capsys.readouterr().err
