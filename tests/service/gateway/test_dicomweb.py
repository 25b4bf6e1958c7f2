"""The gateway's DICOMweb routes over real HTTP (uvicorn on loopback): dicomweb-client stores, searches and
retrieves; STOW-RS bodies as different clients send them; the Store Instances Response's statuses and reasons;
QIDO-RS matching; WADO-RS transfer syntaxes and metadata; API keys."""

from __future__ import annotations

import email
import email.policy
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import warnings

import httpx2 as httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless

from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.gateway import dicomweb
from service.gateway.store import GatewayStore, StoreError
from service.gateway.web import create_gateway_app
from tests.polling import eventually
from tests.service.gateway.launch import gateway_log, launch_gateway, stop_gateway

DICOM_JSON = "application/dicom+json"
FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.3.1"
BOUNDARY = "test-boundary-7d2f"


class Server:
    """The gateway's HTTP app on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list:
    """Three synthetic radiographs of three studies: two uncompressed, one JPEG 2000 lossless."""
    folder = tmp_path_factory.mktemp("radiographs")
    paths = []
    for index, syntax in enumerate(("explicit_vr_little_endian", "explicit_vr_little_endian", "jpeg2000_lossless")):
        path = folder / f"{index}.dcm"
        write_dicom(render_indexed(3, "labeled", index, SynthConfig()), path, index=index, seed=41,
                    transfer_syntax=syntax, photometric="MONOCHROME2")  # fmt: skip
        paths.append(path)
    return paths


@pytest.fixture
def store(tmp_path):
    opened = GatewayStore(tmp_path / "gateway")
    yield opened
    opened.close()


@pytest.fixture
def server(store):
    running = Server(create_gateway_app(store))
    yield running
    running.close()


def multipart(*parts: bytes, boundary: str = BOUNDARY, preamble: bytes = b"", part_type: str = "application/dicom"):
    body = bytearray(preamble)
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def dicom_parts(response) -> list[pydicom.Dataset]:
    """The DICOM files of a multipart/related answer, split by the standard library's MIME parser."""
    message = email.message_from_bytes(
        f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content,
        policy=email.policy.HTTP,
    )
    return [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in message.iter_parts()]


def stow(server: Server, body, content_type: str | None = None, path: str = "/dicomweb/studies", headers=None):
    content_type = content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return httpx.post(server.url + path, content=body, headers={"Content-Type": content_type, **(headers or {})})


def test_dicomweb_client_stores_searches_and_retrieves(server, radiographs):
    client = DICOMwebClient(f"{server.url}/dicomweb")
    datasets = [pydicom.dcmread(path) for path in radiographs]
    answer = client.store_instances(datasets)
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == {str(dataset.SOPInstanceUID) for dataset in datasets}
    assert "FailedSOPSequence" not in answer

    studies = client.search_for_studies()
    assert {study["0020000D"]["Value"][0] for study in studies} == {str(ds.StudyInstanceUID) for ds in datasets}
    assert all(study["00080061"]["Value"] == ["IO"] and study["00201208"]["Value"] == [1] for study in studies)
    assert all("00100010" not in study and "00100020" not in study for study in studies), "no patient attribute"
    first = datasets[0]
    instances = client.search_for_instances(study_instance_uid=first.StudyInstanceUID)
    assert [item["00080018"]["Value"][0] for item in instances] == [first.SOPInstanceUID]
    retrieve_url = instances[0]["00081190"]["Value"][0]
    assert retrieve_url.startswith(f"{server.url}/dicomweb/studies/{first.StudyInstanceUID}/series/")

    compressed = datasets[2]
    uids = (compressed.StudyInstanceUID, compressed.SeriesInstanceUID, compressed.SOPInstanceUID)
    # dicomweb-client asks for transfer-syntax=* (as stored) unless told otherwise.
    assert client.retrieve_instance(*uids).file_meta.TransferSyntaxUID == JPEG2000Lossless
    named = client.retrieve_instance(*uids, media_types=(("application/dicom", JPEG2000Lossless),))
    assert named.file_meta.TransferSyntaxUID == JPEG2000Lossless
    # A compressed file is not decoded to be sent (untrusted pixel data is decoded in isolated workers only):
    # asking for it uncompressed is 406, naming what to ask for.
    url = f"{server.url}/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    explicit = 'multipart/related; type="application/dicom"'  # no transfer-syntax: Explicit VR Little Endian
    refused = httpx.get(url, headers={"Accept": explicit})
    assert refused.status_code == 406
    assert "transfer-syntax=*" in refused.json()["error"]["message"]
    preferred = httpx.get(url, headers={"Accept": f"{explicit}; transfer-syntax=*; q=0, {explicit}; q=0.5"})
    assert preferred.status_code == 406, "q=0 excludes an offer"
    # Uncompressed files convert between the little-endian syntaxes, pixels intact; the higher q wins.
    plain = f"{server.url}/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    implicit = f"{explicit}; transfer-syntax={ImplicitVRLittleEndian}"
    ranked = httpx.get(plain, headers={"Accept": f"{explicit}; transfer-syntax=*; q=0.2, {implicit}"})
    assert ranked.status_code == 200
    (converted,) = dicom_parts(ranked)
    assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(converted.pixel_array, first.pixel_array)
    assert client.retrieve_study(first.StudyInstanceUID)[0].SOPInstanceUID == first.SOPInstanceUID

    metadata = client.retrieve_instance_metadata(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    assert metadata["00080018"]["Value"] == [first.SOPInstanceUID]
    bulk_uri = metadata["7FE00010"]["BulkDataURI"]
    (pixels,) = client.retrieve_bulkdata(bulk_uri)
    assert pixels == first.PixelData


@pytest.mark.parametrize(
    ("content_type", "preamble", "chunked"),
    [
        (f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', b"", False),
        (f'multipart/related; type=application/dicom; boundary="{BOUNDARY}"', b"\r\n", False),
        (f"multipart/related;boundary={BOUNDARY};type=application/dicom", b"a preamble to ignore\r\n", True),
        (f"Multipart/Related; boundary={BOUNDARY}", b"", True),
    ],
    ids=["dicomweb-client", "orthanc-style", "preamble-chunked", "no-type"],
)
def test_stow_bodies_as_clients_send_them(server, radiographs, content_type, preamble, chunked):
    body = multipart(*(path.read_bytes() for path in radiographs[:2]), preamble=preamble)

    def pieces():
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = stow(server, pieces() if chunked else body, content_type)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    answer = pydicom.Dataset.from_json(response.json())
    assert len(answer.ReferencedSOPSequence) == 2


def test_stow_as_orthanc_sends_it(server, radiographs):
    """Orthanc 1.10's DICOMweb client: a 73-character boundary (over RFC 2046's 70), unquoted; a Content-Length
    header in each part; chunked; no CRLF after the closing delimiter."""
    boundary = "f2365991-26ea-4e74-bc51-a3414c8aa623-f2365991-26ea-4e74-bc51-a3414c8aa623"
    data = radiographs[0].read_bytes()
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--".encode()
    )
    response = stow(
        server,
        (body[start : start + 65524] for start in range(0, len(body), 65524)),
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 1


def test_store_response_statuses_and_failure_reasons(server, store, radiographs):
    good = radiographs[0].read_bytes()
    corrupt = good[:200]
    for_processing = pydicom.dcmread(radiographs[1])
    for_processing.SOPClassUID = for_processing.file_meta.MediaStorageSOPClassUID = FOR_PROCESSING
    buffer = io.BytesIO()
    for_processing.save_as(buffer, enforce_file_format=True)

    mixed = stow(server, multipart(good, corrupt, buffer.getvalue()))
    assert mixed.status_code == 202
    answer = pydicom.Dataset.from_json(mixed.json())
    assert [item.FailureReason for item in answer.FailedSOPSequence] == [0xC000, 0x0122]
    assert answer.FailedSOPSequence[1].ReferencedSOPInstanceUID == for_processing.SOPInstanceUID
    assert len(answer.ReferencedSOPSequence) == 1
    assert store.summary().counts["queued"] == 1

    other_study = stow(server, multipart(good), path="/dicomweb/studies/1.2.3.4")
    assert other_study.status_code == 409
    refused = pydicom.Dataset.from_json(other_study.json())
    assert refused.FailedSOPSequence[0].FailureReason == 0xA900
    assert refused.RetrieveURL.endswith("/dicomweb/studies/1.2.3.4")

    assert stow(server, good, "application/dicom").status_code == 415
    metadata_and_bulk = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
    assert stow(server, multipart(good), metadata_and_bulk).status_code == 415
    assert stow(server, multipart(good), 'multipart/related; type="application/dicom"').status_code == 400
    unterminated = stow(server, multipart(good)[:-20])
    assert unterminated.status_code == 400
    assert "closing boundary" in unterminated.json()["error"]["message"]
    assert stow(server, multipart()).status_code == 400


def test_an_instance_sent_twice_is_stored_once_with_one_job(server, store, radiographs):
    body = multipart(radiographs[0].read_bytes())
    assert stow(server, body).status_code == 200
    assert stow(server, body).status_code == 200
    assert sum(store.summary().counts.values()) == 1


def test_qido_matching(server, radiographs):
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in radiographs]
    assert stow(server, multipart(*(path.read_bytes() for path in radiographs))).status_code == 200
    dates = sorted(str(dataset.StudyDate) for dataset in datasets)

    def studies(**parameters) -> list[str]:
        response = httpx.get(f"{server.url}/dicomweb/studies", params=parameters)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == DICOM_JSON
        return [study["0020000D"]["Value"][0] for study in response.json()]

    assert len(studies()) == 3
    assert len(studies(StudyDate=f"{dates[0]}-{dates[1]}")) == 2
    assert len(studies(StudyDate=f"-{dates[0]}")) == 1
    assert len(studies(StudyDate=f"{dates[2]}-")) == 1
    uids = [str(dataset.StudyInstanceUID) for dataset in datasets]
    assert set(studies(StudyInstanceUID=f"{uids[0]},{uids[1]}")) == set(uids[:2])
    assert set(studies(**{"0020000D": uids[2]})) == {uids[2]}
    assert len(studies(ModalitiesInStudy="I?")) == 3
    assert len(studies(ModalitiesInStudy="io")) == 0, "matching is case-sensitive"
    assert studies(ModalitiesInStudy="SR") == []
    assert len(studies(limit="2")) == 2
    assert studies(limit="2", offset="2") == studies()[2:]
    series = httpx.get(f"{server.url}/dicomweb/studies/{uids[1]}/series").json()
    assert [item["0020000E"]["Value"][0] for item in series] == [str(datasets[1].SeriesInstanceUID)]

    patient = httpx.get(f"{server.url}/dicomweb/studies", params={"PatientName": "SYNTH*"})
    assert patient.status_code == 400
    assert "patient" in patient.json()["error"]["message"]
    assert httpx.get(f"{server.url}/dicomweb/studies", params={"limit": "many"}).status_code == 400
    assert httpx.get(f"{server.url}/dicomweb/studies", params={"SeriesNumber": "one"}).status_code == 400


def test_wado_refusals(server, radiographs):
    dataset = pydicom.dcmread(radiographs[0], stop_before_pixels=True)
    assert stow(server, multipart(radiographs[0].read_bytes())).status_code == 200
    url = f"{server.url}/dicomweb/studies/{dataset.StudyInstanceUID}"
    assert httpx.get(f"{server.url}/dicomweb/studies/1.2.3").status_code == 404
    jpeg_ls = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'
    assert httpx.get(url, headers={"Accept": jpeg_ls}).status_code == 406
    assert httpx.get(url, headers={"Accept": "image/png"}).status_code == 406
    unknown_tag = f"{url}/series/{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}/bulk/00100010"
    assert httpx.get(unknown_tag).status_code == 404


def test_api_keys_guard_dicomweb_and_status_but_not_the_probe(store, radiographs):
    server = Server(create_gateway_app(store, api_keys=frozenset({"secret-key"})))
    try:
        body = multipart(radiographs[0].read_bytes())
        assert stow(server, body).status_code == 401
        assert httpx.get(f"{server.url}/dicomweb/studies").status_code == 401
        assert httpx.get(f"{server.url}/v1/gateway/status").status_code == 401
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        headers = {"Authorization": "Bearer secret-key"}
        assert stow(server, body, headers=headers).status_code == 200
        status = httpx.get(f"{server.url}/v1/gateway/status", headers=headers).json()
        assert status["jobs"]["queued"] == 1
        assert status["deliveries"] == {"pending": 0, "sent": 0}
    finally:
        server.close()


@pytest.mark.slow
def test_a_radiograph_stored_by_stow_rs_is_analysed_and_its_sr_found_and_retrieved(package_path, radiographs, tmp_path):
    """The whole path with the real command: STOW-RS in, the job runs, QIDO-RS finds the SR in the radiograph's
    study, WADO-RS returns it, and it cites the radiograph."""
    process, started = launch_gateway(tmp_path / "gateway", package_path, "--http-port", "0")
    try:
        client = DICOMwebClient(f"http://127.0.0.1:{started['http_port']}/dicomweb")
        source = pydicom.dcmread(radiographs[0])
        client.store_instances([source])

        def report():
            found = client.search_for_instances(
                study_instance_uid=source.StudyInstanceUID, search_filters={"Modality": "SR"}
            )
            return found or None

        found = eventually(report, timeout_s=120)
        assert found, "no SR appeared in the radiograph's study"
        (found,) = found
        sr = client.retrieve_instance(
            source.StudyInstanceUID, found["0020000E"]["Value"][0], found["00080018"]["Value"][0]
        )
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert json.loads(
            subprocess.run(
                [sys.executable, "-m", "pipelines.cli", "gateway", "status", "--root", str(tmp_path / "gateway")],
                capture_output=True, text=True, check=True,
            ).stdout
        )["jobs"]["done"] == 1  # fmt: skip
    finally:
        stop_gateway(process)
    log = gateway_log(tmp_path / "gateway").read_text()
    assert "stored" in log, log[-2000:]
    identifiers = {str(source.PatientName), str(source.PatientID), str(source.SOPInstanceUID)}
    assert not [identifier for identifier in identifiers if identifier in log], "patient data in the gateway's log"


def test_what_the_gateway_cannot_serve_is_refused_at_the_door(server, store, radiographs):
    """An instance in a transfer syntax the gateway does not decode is refused (0xC122) instead of being stored
    and failing every later retrieval."""
    dataset = pydicom.dcmread(radiographs[0])
    dataset.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=False, little_endian=True)
    refused = stow(server, multipart(buffer.getvalue()))
    assert refused.status_code == 409
    assert pydicom.Dataset.from_json(refused.json()).FailedSOPSequence[0].FailureReason == 0xC122
    assert store.search_catalog() == []


def test_a_part_over_the_limit_after_a_stored_one_is_answered_and_not_stored_cut(
    server, store, radiographs, monkeypatch
):
    small, large = radiographs[0].read_bytes(), radiographs[1].read_bytes()
    assert len(small) < len(large)
    monkeypatch.setattr(dicomweb, "MAX_PART_BYTES", len(small) + 10)
    answer = stow(server, multipart(small, large))
    assert answer.status_code == 202
    failures = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert [item.FailureReason for item in failures] == [0x0110]
    assert len(store.search_catalog()) == 1, "the cut part is not stored"


def test_metadata_survives_bad_values_and_keeps_nested_bulk_data_inline(server, radiographs, tmp_path):
    dataset = pydicom.dcmread(radiographs[0])
    # A decimal comma, as some devices write (raw: pydicom would refuse to encode it).
    dataset[0x00101030] = RawDataElement(Tag(0x00101030), "DS", 4, b"72,5", 0, False, True)
    icon = pydicom.Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 64, 32, 8, 8, 7
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.PixelRepresentation = 1, "MONOCHROME2", 0
    icon.PixelData = bytes(64 * 32)
    dataset.IconImageSequence = [icon]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own note on the invalid DS
        dataset.save_as(buffer, enforce_file_format=True)
    assert stow(server, multipart(buffer.getvalue())).status_code == 200
    url = f"{server.url}/dicomweb/studies/{dataset.StudyInstanceUID}/metadata"
    answer = httpx.get(url)
    assert answer.status_code == 200, answer.text
    (document,) = answer.json()
    assert document["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
    nested = document["00880200"]["Value"][0]["7FE00010"]
    assert "InlineBinary" in nested, "a nested value cannot be named by a top-level bulk data URI"


def test_malformed_queries_and_tags_are_400_or_404_not_500(server, radiographs):
    assert stow(server, multipart(radiographs[0].read_bytes())).status_code == 200
    search = f"{server.url}/dicomweb/instances"
    for parameters in (
        {"StudyDate": "abc-def"},
        {"StudyTime": "25:00"},
        {"StudyInstanceUID": "1-2"},
        {"SeriesNumber": "99999999999999999999"},
    ):
        answer = httpx.get(search, params=parameters)
        assert answer.status_code == 400, (parameters, answer.text)
    assert httpx.get(search, headers={"Accept": "application/dicom+xml"}).status_code == 406
    dataset = pydicom.dcmread(radiographs[0], stop_before_pixels=True)
    instance = (
        f"{server.url}/dicomweb/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
        f"/instances/{dataset.SOPInstanceUID}"
    )
    assert httpx.get(f"{instance}/bulk/1FFFFFFFF").status_code == 404
    assert httpx.get(f"{instance}/bulk/zzzzzzzz").status_code == 404


def test_time_ranges_include_their_upper_end_at_the_precision_given(server, radiographs):
    dataset = pydicom.dcmread(radiographs[0], stop_before_pixels=True)
    assert stow(server, multipart(radiographs[0].read_bytes())).status_code == 200
    hours_minutes = str(dataset.StudyTime)[:4]
    found = httpx.get(f"{server.url}/dicomweb/studies", params={"StudyTime": f"0000-{hours_minutes}"}).json()
    assert [study["0020000D"]["Value"][0] for study in found] == [dataset.StudyInstanceUID]


def test_searches_are_capped_and_say_so(server, radiographs, monkeypatch):
    assert stow(server, multipart(*(path.read_bytes() for path in radiographs))).status_code == 200
    monkeypatch.setattr(dicomweb, "MAX_SEARCH_RESULTS", 2)
    capped = httpx.get(f"{server.url}/dicomweb/studies")
    assert len(capped.json()) == 2
    assert "299" in capped.headers["warning"]
    rest = httpx.get(f"{server.url}/dicomweb/studies", params={"offset": "2"})
    assert len(rest.json()) == 1
    assert "warning" not in rest.headers


def test_a_failing_store_is_503_and_anything_unforeseen_a_500_without_identifiers(server, store, monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise StoreError("the gateway's database failed (OperationalError)")

    monkeypatch.setattr(store, "catalog_groups", unavailable)
    answer = httpx.get(f"{server.url}/dicomweb/studies")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "10"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug quoting 1.2.826.0.1.3680043.8.498.777")

    monkeypatch.setattr(store, "search_catalog", broken)
    with caplog.at_level(logging.ERROR):
        answer = httpx.get(f"{server.url}/dicomweb/studies/1.2.826.0.1.3680043.8.498.777/series/1.2/instances")
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert "RuntimeError" in caplog.text
    assert "1.2.826.0.1.3680043.8.498.777" not in caplog.text
