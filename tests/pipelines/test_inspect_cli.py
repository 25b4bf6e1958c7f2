"""``caries-mim inspect``: a JSON line for every file, whatever it holds, and never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_files

from caries_mim.io.isolation import READER_ERROR_CODES
from pipelines.cli import main
from tests.dicom_factory import make_dataset, ramp, to_bytes


def pydicom_test_files() -> list[str]:
    """pydicom's bundled test files plus those of the pydicom-data package (installed by the dev extra)."""
    files = sorted(f for f in get_testdata_files() if os.path.isfile(f))
    assert len(files) > 200, "pydicom-data must be installed: make setup installs the dev extra"
    return files


def run_inspect(capsys, *args: str) -> tuple[int, list[dict], str]:
    status = main(["inspect", *args])
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_every_pydicom_test_file_gets_a_json_line(capsys):
    files = pydicom_test_files()
    status, records, err = run_inspect(capsys, *files)
    assert status == 2  # many of them are CT/MR/colour/multi-frame: not all readable as radiographs
    assert [r["file"] for r in records] == files
    assert "Traceback" not in err
    for record in records:
        if record["ok"]:
            assert 0.0 <= record["pixel_mean"] <= 1.0
        else:
            assert record["error"]["code"] in READER_ERROR_CODES, record
            assert record["error"]["message"]


def test_every_pydicom_file_with_any_modality_decodes_or_fails_cleanly(capsys):
    """With the modality allow-list opened, the decoders themselves meet every file (the hard part)."""
    files = pydicom_test_files()
    modalities = "CT,MR,OT,US,NM,PT,RTIMAGE,XA,SC,MG,DX,IO,PX,CR,RG,SM,ES,XC"
    _status, records, err = run_inspect(capsys, "--modalities", modalities, *files)
    assert "Traceback" not in err
    codes = [r["error"]["code"] for r in records if not r["ok"]]
    assert "internal_error" not in codes
    readable = sum(r["ok"] for r in records)
    assert readable >= 60, f"only {readable} files decoded"


def test_readable_files_exit_zero_and_hash_uids(tmp_path, capsys):
    ds = make_dataset(ramp(), window=(2048, 4096))
    path = tmp_path / "ok.dcm"
    path.write_bytes(to_bytes(ds))
    status, records, _ = run_inspect(capsys, str(path))
    assert status == 0
    assert records[0]["ok"] is True
    assert records[0]["modality"] == "IO"
    assert ds.SOPInstanceUID not in json.dumps(records)
    assert "TEST^PATIENT" not in json.dumps(records)
    _, revealed, _ = run_inspect(capsys, "--reveal-uids", str(path))
    assert revealed[0]["sop_instance_uid"] == ds.SOPInstanceUID


def test_folders_are_walked_and_one_bad_file_sets_exit_two(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.dcm").write_bytes(to_bytes(make_dataset(ramp(), window=(2048, 4096))))
    (tmp_path / "notes.txt").write_text("not an image")
    status, records, _ = run_inspect(capsys, str(tmp_path))
    assert status == 2
    assert {Path(r["file"]).name: r["ok"] for r in records} == {"good.dcm": True, "notes.txt": False}


def test_empty_folder_is_a_user_error(tmp_path, capsys):
    status = main(["inspect", str(tmp_path)])
    assert status == 2
    assert "no files found" in capsys.readouterr().err


def test_console_script_never_prints_a_traceback(tmp_path):
    """The real entry point in a subprocess, on garbage, a truncated DICOM and a missing path."""
    data = to_bytes(make_dataset(ramp(), window=(2048, 4096)))
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "inspect", str(tmp_path), str(tmp_path / "missing.dcm")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    codes = sorted(json.loads(line)["error"]["code"] for line in result.stdout.splitlines())
    assert codes == ["corrupt_pixel_data", "not_an_image", "unreadable_file"]


@pytest.mark.parametrize("bad", [["inspect"], ["nope"], ["inspect", "--max-pixels", "-3", "x"]])
def test_bad_arguments_exit_two_without_traceback(bad, capsys):
    with pytest.raises(SystemExit) as exited:
        main(bad)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
