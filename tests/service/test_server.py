"""The real thing: `caries-mim serve` in its own process (uvicorn), answering over a socket and stopping on SIGTERM;
and the command's refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def wait_until_ready(base: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {server.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as ready:
                if json.load(ready)["status"] == "ready":
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    pytest.fail("the server was not ready after 90 s")


@pytest.mark.slow
def test_serve_answers_over_http_and_stops_on_sigterm(package_path, synthetic_dicom, tmp_path):
    port = free_port()
    env = {**os.environ, "CARIES_MIM_API_KEYS": "test-key", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--model", str(package_path), "--port", str(port)]
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, server, log)
        body, content_type = multipart("file", "image.dcm", synthetic_dicom.read_bytes())
        request = urllib.request.Request(
            f"{base}/v1/predictions",
            data=body,
            headers={"content-type": content_type, "authorization": "Bearer test-key"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            findings = json.load(answer)
        assert findings["image"]["rows"] > 0
        assert isinstance(findings["findings"], list)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(f"{base}/v1/predictions", data=body, headers={"content-type": content_type}),
                timeout=30,
            )
        assert refused.value.code == 401
        server.send_signal(signal.SIGTERM)
        # Uvicorn shuts down gracefully, then re-raises the signal, so the exit status says "ended by SIGTERM".
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert "SYNTH^PATIENT" not in output
    assert '"message": "draining"' in output


def test_serve_refuses_a_public_address_without_keys(package_path, capsys, monkeypatch):
    monkeypatch.delenv("CARIES_MIM_API_KEYS", raising=False)
    status = main(["serve", "--model", str(package_path), "--host", "0.0.0.0"])
    assert status == 2
    assert "without API keys" in capsys.readouterr().err


def test_serve_needs_an_existing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CARIES_MIM_MODEL", raising=False)
    assert main(["serve"]) == 2
    assert "no model package" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing.cmpkg")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_reports_bad_environment_settings(package_path, capsys, monkeypatch):
    monkeypatch.setenv("CARIES_MIM_MAX_BATCH_SIZE", "many")
    assert main(["serve", "--model", str(package_path)]) == 2
    assert "max_batch_size" in capsys.readouterr().err
