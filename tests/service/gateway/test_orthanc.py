"""The gateway next to a real PACS: a throwaway Orthanc (configured here: its DICOM modalities, its DICOMweb
servers, the DICOMweb plugin) pushes a radiograph to the gateway by C-STORE or by STOW-RS, and the caries SR comes
back into Orthanc, in the same study, citing the radiograph. Loopback only; without Orthanc these tests skip."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.polling import eventually
from tests.service.gateway.launch import gateway_log, launch_gateway, stop_gateway
from tests.service.gateway.orthanc import Orthanc, require_orthanc

GATEWAY_AET = "CARIESMIM"


def start_gateway(root: Path, package_path: Path, orthanc: Orthanc, *options: str) -> tuple[subprocess.Popen, dict]:
    """``caries-mim gateway run`` accepting Orthanc's calls and sending its SRs to Orthanc; its JSON start line."""
    return launch_gateway(
        root, package_path, "--ae-title", GATEWAY_AET, "--calling-ae", orthanc.ae_title,
        "--destination", f"orthanc={orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}", *options,
    )  # fmt: skip


def report_in(orthanc: Orthanc, study_uid: str) -> str | None:
    """The Orthanc id of an SR instance in the study, if Orthanc holds one yet."""
    for instance in orthanc.instances():
        tags = orthanc.tags(instance)
        if tags.get("Modality") == "SR" and tags.get("StudyInstanceUID") == study_uid:
            return instance
    return None


def returned_report(orthanc: Orthanc, uploaded: str, root: Path) -> str:
    """The Orthanc id of the SR that came back into the study of the ``uploaded`` instance (waiting for it)."""
    study_uid = orthanc.tags(uploaded)["StudyInstanceUID"]
    report = eventually(lambda: report_in(orthanc, study_uid), timeout_s=180, interval_s=0.5)
    assert report, f"no SR came back to Orthanc:\n{orthanc.log()}\n{gateway_log(root).read_text()[-2000:]}"
    return report


def cited_images(items) -> set[str]:
    """The SOP Instance UIDs of every IMAGE content item in an SR content tree (image library, SCOORD sources)."""
    cited = set()
    for item in items:
        if item.get("ValueType") == "IMAGE":
            cited.update(str(reference.ReferencedSOPInstanceUID) for reference in item.ReferencedSOPSequence)
        cited |= cited_images(item.get("ContentSequence", []))
    return cited


def assert_report_cites(orthanc: Orthanc, instance: str, source_path: Path) -> None:
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    report = pydicom.dcmread(io.BytesIO(orthanc.file(instance)))
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.StudyInstanceUID == source.StudyInstanceUID
    (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence] == [source.SOPInstanceUID]
    assert cited_images(report.ContentSequence) == {source.SOPInstanceUID}


@pytest.fixture
def orthanc_for_gateway(tmp_path) -> Iterator[Orthanc]:
    """An Orthanc not yet started (the gateway must be told its DICOM port first), stopped after the test."""
    require_orthanc()
    orthanc = Orthanc(tmp_path / "orthanc")
    yield orthanc
    orthanc.stop()


@pytest.mark.slow
def test_orthanc_pushes_a_radiograph_by_c_store_and_receives_the_caries_sr(
    package_path, synthetic_dicom, orthanc_for_gateway, tmp_path
):
    orthanc = orthanc_for_gateway
    root = tmp_path / "gateway"
    process, started = start_gateway(root, package_path, orthanc)
    try:
        orthanc.modalities["caries"] = (GATEWAY_AET, "127.0.0.1", started["port"])
        orthanc.start()
        uploaded = orthanc.upload(synthetic_dicom)
        orthanc.store_to_modality("caries", uploaded["ID"])
        report = returned_report(orthanc, uploaded["ID"], root)
    finally:
        stop_gateway(process)
    assert len(orthanc.instances()) == 2
    assert_report_cites(orthanc, report, synthetic_dicom)


@pytest.mark.slow
def test_orthanc_pushes_a_radiograph_by_stow_rs_and_receives_the_caries_sr(
    package_path, synthetic_dicom, orthanc_for_gateway, tmp_path
):
    orthanc = orthanc_for_gateway
    root = tmp_path / "gateway"
    process, started = start_gateway(root, package_path, orthanc, "--http-port", "0")
    try:
        orthanc.dicomweb_servers["caries"] = {"Url": f"http://127.0.0.1:{started['http_port']}/dicomweb/"}
        orthanc.start()
        uploaded = orthanc.upload(synthetic_dicom)
        assert orthanc.stow_to_server("caries", uploaded["ID"])["InstancesCount"] == "1"
        report = returned_report(orthanc, uploaded["ID"], root)
    finally:
        stop_gateway(process)
    assert len(orthanc.instances()) == 2
    assert_report_cites(orthanc, report, synthetic_dicom)
