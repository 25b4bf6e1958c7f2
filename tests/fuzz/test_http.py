"""Hostile files and clients against the real server (``caries-mim serve``, uvicorn, decode workers): every file
gets a 2xx or a 4xx in the JSON error shape, no 5xx, no traceback in the log, and the server stays ready."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from pipelines.service_client import LocalService, multipart_body
from tests.fuzz.corpus import every_family, hostile_files
from tests.polling import sample

#: Files of the seeded corpus posted in CI (with one file of each family and syntax besides).
CI_HTTP_FILES = 1000
UPLOAD_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(package_path, tmp_path_factory):
    environment = {"OMP_NUM_THREADS": "1", "CARIES_MIM_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S)}
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalService(package_path, log, environment=environment, inherit_settings=False) as service:
        yield service


def _post(connection: http.client.HTTPConnection, data: bytes) -> tuple[int, dict]:
    body, content_type = multipart_body("file", "radiograph.dcm", data)
    connection.request("POST", "/v1/predictions", body=body, headers={"content-type": content_type})
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


@pytest.mark.slow
def test_hostile_files_get_2xx_or_4xx_and_the_server_stays_ready(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    statuses: dict[int, int] = {}
    server_errors = []
    for hostile in [*every_family(2), *hostile_files(seed=2, count=CI_HTTP_FILES)]:
        status, answer = _post(connection, hostile.data)
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            server_errors.append(f"{hostile.name}: {status} {answer}")
        elif status != 200:
            assert set(answer) == {"error"}, hostile.name
            assert answer["error"]["code"], hostile.name
            assert answer["error"]["message"], hostile.name
        else:
            assert isinstance(answer["findings"], list), hostile.name
    assert not server_errors, "\n".join(server_errors)
    assert statuses.get(200, 0) > 100
    assert sum(count for status, count in statuses.items() if status >= 400) > 300
    connection.request("GET", "/readyz")
    assert connection.getresponse().status == 200
    log = server.log_tail(50_000_000)
    assert "Traceback" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [entry for entry in entries if entry["level"] in ("error", "critical")]


def _stall(port: int, headers: str, sent_body: bytes, timeout_s: float) -> tuple[str, float]:
    """Send ``headers`` and the start of a body that never completes; the whole answer (read until the server
    closes the connection) and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as stalled:
        stalled.sendall(headers.encode() + sent_body)
        started = time.monotonic()
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
        return answer.decode("latin-1"), time.monotonic() - started


STALLED_HEAD = (
    "POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
    "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
)
STALLED_START = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'


@pytest.mark.slow
def test_a_stalled_upload_gets_408_and_frees_its_slot(server, synthetic_dicom):
    """Slowloris: headers promise a body that never finishes arriving."""
    answer, waited = _stall(server.port, STALLED_HEAD.format(extra=""), STALLED_START, UPLOAD_TIMEOUT_S + 10)
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"upload_timeout"' in answer
    assert UPLOAD_TIMEOUT_S - 0.5 <= waited < UPLOAD_TIMEOUT_S + 5
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    status, _ = _post(connection, synthetic_dicom.read_bytes())
    assert status == 200
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    assert sample(metrics, "caries_mim_uploads_in_progress") == 0
    assert sample(metrics, "caries_mim_uploads_refused_total", 'reason="timeout"') == 1


@pytest.mark.slow
def test_a_refused_client_cannot_hold_the_connection_by_trickling_its_body(package_path, tmp_path):
    """A client without a key is answered 401 after its body is read and dropped; one that never finishes the
    body gets the 401 at the upload deadline, with the connection closed."""
    environment = {"OMP_NUM_THREADS": "1", "CARIES_MIM_UPLOAD_TIMEOUT_S": "1", "CARIES_MIM_API_KEYS": "k"}
    with LocalService(package_path, tmp_path / "server.log", environment=environment, inherit_settings=False) as keyed:
        answer, waited = _stall(keyed.port, STALLED_HEAD.format(extra=""), STALLED_START, 15)
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "connection: close" in answer.lower()
    assert waited < 6
