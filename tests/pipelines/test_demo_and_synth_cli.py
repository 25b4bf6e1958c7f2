"""The demo (what `make demo` runs) and the `synth` command, end to end on small synthetic sets."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.uid import DigitalIntraOralXRayImageStorageForPresentation

from pipelines.cli import main


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


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--unlabeled", "3", "--labeled", "12", "--seed", "1", "--pretrain-steps", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "caries-mim demo finished" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["read_back"]["files"] == 15
    assert sum(summary["read_back"]["transfer_syntaxes"].values()) == 15
    assert sum(split["images"] for split in summary["splits"].values()) == 12
    for picture in summary["pictures"].values():
        with open(picture, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    pretrain = summary["pretrain"]
    assert pretrain["steps"] == 4
    assert pretrain["images_in_dataset"] == 15
    assert (out / "pretrain" / "encoder.pt").is_file()
    with open(pretrain["reconstructions"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # A second run replaces the demo's own pretraining run instead of refusing it.
    assert main(argv) == 0
