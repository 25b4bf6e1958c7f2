"""`caries-mim gateway run` in its own process: a radiograph in by C-STORE, its caries SR out to the PACS by
C-STORE, a clean stop on SIGTERM; and `caries-mim gateway status`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pydicom
import pytest
from pynetdicom import AE

from caries_mim.errors import InvalidConfigError
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from pipelines.cli import main
from service.gateway.gateway import Gateway, GatewayConfig
from service.gateway.scp import ScpConfig
from tests.polling import eventually
from tests.service.gateway.launch import gateway_log, launch_gateway
from tests.service.gateway.test_sender import Pacs, free_port


def start_gateway(root, package_path, pacs_port: int) -> tuple[subprocess.Popen, int]:
    process, started = launch_gateway(
        root, package_path, "--calling-ae", "MODALITY", "--destination", f"pacs=PACS@127.0.0.1:{pacs_port}"
    )
    return process, started["port"]


def c_store(port: int, path) -> int:
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="CARIESMIM")
    assert association.is_established
    try:
        return int(association.send_c_store(dataset).Status)
    finally:
        association.release()


@pytest.mark.slow
def test_a_radiograph_sent_by_c_store_comes_back_to_the_pacs_as_a_caries_sr(
    package_path, synthetic_dicom, tmp_path, capsys
):
    pacs = Pacs(free_port())
    root = tmp_path / "gateway"
    process, port = start_gateway(root, package_path, pacs.server.server_address[1])
    try:
        assert c_store(port, synthetic_dicom) == 0x0000
        assert eventually(lambda: pacs.datasets, timeout_s=120), gateway_log(root).read_text()[-2000:]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        pacs.stop()
    source = pydicom.dcmread(synthetic_dicom, stop_before_pixels=True)
    (report,) = pacs.datasets
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.StudyInstanceUID == source.StudyInstanceUID
    cited = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert cited.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "SYNTH^PATIENT" not in gateway_log(root).read_text(), "no patient identifier in the logs"

    capsys.readouterr()
    assert main(["gateway", "status", "--root", str(root)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"] == {"queued": 0, "running": 0, "done": 1, "failed": 0}
    assert status["deliveries"] == {"pending": 0, "sent": 1}


def test_status_of_a_folder_without_a_gateway_is_a_clear_error(tmp_path, capsys):
    assert main(["gateway", "status", "--root", str(tmp_path)]) == 2
    assert "holds no gateway store" in capsys.readouterr().err


@pytest.mark.parametrize("destination", ["pacs", "pacs=PACS", "pacs=PACS@host", "pacs=PACS@host:http"])
def test_a_malformed_destination_is_named(destination, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["gateway", "run", "--root", str(tmp_path), "--destination", destination])
    assert "expected NAME=AET@HOST:PORT" in capsys.readouterr().err


@pytest.mark.slow
def test_storescu_sends_a_folder_and_the_srs_come_back_to_storescp(package_path, tmp_path):
    """dcmtk on both ends: storescu pushes synthetic radiographs in three transfer syntaxes, storescp receives the
    SRs. .ci/run installs dcmtk; elsewhere this skips."""
    storescu, storescp = shutil.which("storescu"), shutil.which("storescp")
    if not (storescu and storescp):
        pytest.skip("storescu / storescp not found: install the Debian package dcmtk (.ci/run does)")
    folder = tmp_path / "radiographs"
    folder.mkdir()
    sources, proposals = {}, {}
    # storescu proposes uncompressed transfer syntaxes unless told which compressed one to propose.
    for index, (syntax, proposal) in enumerate(
        (("explicit_vr_little_endian", "-xe"), ("rle_lossless", "-xr"), ("jpeg2000_lossless", "-xv"))
    ):
        path = folder / f"{index}.dcm"
        write_dicom(render_indexed(0, "labeled", index, SynthConfig()), path, index=index, seed=31,
                    transfer_syntax=syntax, photometric="MONOCHROME2")  # fmt: skip
        sources[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        proposals[path] = proposal
    received = tmp_path / "received"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen([storescp, "-aet", "PACS", "-od", str(received), str(pacs_port)])
    process, port = start_gateway(tmp_path / "gateway", package_path, pacs_port)
    try:
        for path, proposal in proposals.items():
            command = [storescu, proposal, "-aet", "MODALITY", "-aec", "CARIESMIM", "127.0.0.1", str(port), str(path)]
            sent = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr[-2000:]
        assert eventually(lambda: len(list(received.iterdir())) == 3, timeout_s=180), sorted(received.iterdir())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        pacs.terminate()
        pacs.wait(30)
    cited = set()
    for path in received.iterdir():
        report = pydicom.dcmread(path)
        assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        cited.add(str(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    assert cited == set(sources)


def test_a_second_gateway_on_the_same_folder_is_refused(package_path, tmp_path, monkeypatch):
    # The gateway quiets pydicom's validation for its process; keep this test process's setting.
    monkeypatch.setattr(
        pydicom.config.settings, "reading_validation_mode", pydicom.config.settings.reading_validation_mode
    )
    config = GatewayConfig(root=tmp_path / "gateway", model=package_path, scp=ScpConfig(port=0), device="cpu")
    first = Gateway(config)
    try:
        with pytest.raises(InvalidConfigError, match="another gateway is running on"):
            Gateway(config)
    finally:
        first.stop()
    Gateway(config).stop()  # the lock went with the first one
