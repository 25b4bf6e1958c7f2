"""Synthetic patient identifiers written by the generator never reach logs or command output."""

from __future__ import annotations

import logging

import pydicom

from caries_mim.data import DetectionDataset, UnlabeledRadiographs, load_annotations
from caries_mim.synth import generate_dataset
from pipelines.cli import main


def test_patient_identifiers_stay_out_of_logs_and_inspect_output(tmp_path, caplog, capsys):
    out = tmp_path / "synthetic"
    generate_dataset(out, n_unlabeled=2, n_labeled=3, seed=3, progress=False)
    identifiers = set()
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName).startswith("SYNTH^PATIENT^")
        identifiers |= {str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID)}

    caplog.set_level(logging.DEBUG)
    UnlabeledRadiographs([out / "unlabeled"], progress=False)
    annotations = load_annotations(out / "labeled" / "train.json")
    DetectionDataset(annotations.records, progress=False)
    assert main(["inspect", str(out)]) == 2  # the json/manifest files are not images
    printed = capsys.readouterr()

    seen = caplog.text + printed.out + printed.err
    assert "sop_instance_uid_hash" in printed.out
    leaked = sorted(identifier for identifier in identifiers if identifier in seen)
    assert not leaked, f"identifiers in logs/output: {leaked}"
