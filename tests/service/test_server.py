"""The real thing: `caries-mim serve` in its own process (uvicorn), answering over a socket and stopping on SIGTERM;
and the command's refusals."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
import torch

from pipelines.cli import main
from pipelines.service_client import LocalService, ServiceStartError, post_radiograph
from tests.polling import eventually, sample


@pytest.mark.slow
def test_serve_answers_over_http_and_stops_on_sigterm(package_path, synthetic_dicom, tmp_path):
    environment = {"CARIES_MIM_API_KEYS": "test-key", "OMP_NUM_THREADS": "1"}
    with LocalService(package_path, tmp_path / "server.log", environment=environment) as service:
        data = synthetic_dicom.read_bytes()
        answer = post_radiograph(service.base_url, data, api_key="test-key")
        assert answer.status == 200, answer.body[:300]
        findings = answer.json()
        assert findings["image"]["rows"] > 0
        assert isinstance(findings["findings"], list)
        report = post_radiograph(service.base_url, data, api_key="test-key", accept="application/dicom")
        assert report.status == 200
        assert report.content_type == "application/dicom"
        assert post_radiograph(service.base_url, data).status == 401
        assert post_radiograph(service.base_url, b"junk", api_key="test-key").status == 415
    # Uvicorn shuts down gracefully, then re-raises the signal, so the exit status says "ended by SIGTERM".
    assert service.exit_status in (0, -signal.SIGTERM)
    output = service.log_tail(1_000_000)
    assert "SYNTH^PATIENT" not in output
    assert '"message": "draining"' in output


def _pids_that_logged(log_path, message: str) -> set[int]:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]
    return {entry["pid"] for entry in map(json.loads, lines) if entry.get("message") == message}


@pytest.mark.slow
def test_metrics_add_up_every_worker_whichever_answers_the_scrape(package_path, synthetic_dicom, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {"CARIES_MIM_WORKERS": "2", "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    log_path = tmp_path / "server.log"

    def scrape() -> str:
        with urllib.request.urlopen(f"{service.base_url}/metrics", timeout=30) as answer:
            return answer.read().decode()

    def predictions_counted(text: str) -> float:
        return sample(text, "caries_mim_requests_total", 'route="/v1/predictions"', 'status="200"')

    with LocalService(package_path, log_path, environment=environment, ready_timeout_s=240) as service:
        assert eventually(lambda: len(_pids_that_logged(log_path, "ready")) == 2, 240), "a worker never got ready"
        data = synthetic_dicom.read_bytes()
        sent = 0
        while len(_pids_that_logged(log_path, "prediction")) < 2 and sent < 60:
            assert post_radiograph(service.base_url, data).status == 200
            sent += 1
        answered_by = _pids_that_logged(log_path, "prediction")
        # A worker counts a request once its answer has gone out: wait until the last one is counted.
        eventually(lambda: predictions_counted(scrape()) == sent, 30)
        scrapes = [scrape() for _ in range(8)]
    assert len(answered_by) == 2, f"one worker answered all {sent} requests: the test would prove nothing"
    assert [predictions_counted(text) for text in scrapes] == [sent] * len(scrapes)
    batches = [sample(text, "caries_mim_batch_size_count") for text in scrapes]
    assert batches == [batches[0]] * len(scrapes)
    assert 1 <= batches[0] <= sent
    assert not list(temporary.glob("caries-mim-metrics-*")), "the metrics directory outlived the service"


def test_a_service_that_cannot_start_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.cmpkg"
    broken.write_bytes(b"not a package")
    with pytest.raises(ServiceStartError, match="exited with status"), LocalService(broken, tmp_path / "log"):
        pass


def test_serve_refuses_a_public_address_without_keys(package_path, capsys, monkeypatch):
    monkeypatch.delenv("CARIES_MIM_API_KEYS", raising=False)
    status = main(["serve", "--model", str(package_path), "--host", "0.0.0.0"])
    assert status == 2
    assert "without API keys" in capsys.readouterr().err


def test_serve_needs_an_existing_model(tmp_path, capsys, monkeypatch):
    """Without --model it serves the shipped reference detector; where there is none, a one-line error says so."""
    monkeypatch.delenv("CARIES_MIM_MODEL", raising=False)
    monkeypatch.setattr("caries_mim.package.REFERENCE_DETECTOR", tmp_path / "models" / "reference_detector.cmpkg")
    assert main(["serve"]) == 2
    assert "no shipped reference detector" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing.cmpkg")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_reports_bad_environment_settings(package_path, capsys, monkeypatch):
    monkeypatch.setenv("CARIES_MIM_MAX_BATCH_SIZE", "many")
    assert main(["serve", "--model", str(package_path)]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_serve_refuses_a_corrupt_package_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.cmpkg"
    broken.write_bytes(b"not a package")
    assert main(["serve", "--model", str(broken)]) == 2
    error = capsys.readouterr().err
    assert "invalid_checkpoint" in error
    assert "Traceback" not in error


def test_serve_refuses_a_device_it_cannot_use_before_starting(package_path, capsys, monkeypatch):
    """A GPU container started without a visible GPU (CARIES_MIM_DEVICE=cuda) must say so in one line, not fail
    inside uvicorn's start-up with a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--model", str(package_path), "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "no CUDA device is available" in error
    assert "Traceback" not in error
    assert main(["serve", "--model", str(package_path), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    # One GPU given to a container is its cuda:0, whatever its number on the host.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["serve", "--model", str(package_path), "--device", "cuda:1"]) == 2
    assert "only 1 CUDA device(s) are visible" in capsys.readouterr().err


@pytest.mark.parametrize("inherit", [True, False])
def test_local_service_passes_this_process_settings_only_when_asked(tmp_path, monkeypatch, inherit):
    import pipelines.service_client as service_client

    seen = {}

    class RefusedError(Exception):
        pass

    def fake_popen(command, *, env, **_):
        seen.update(env)
        raise RefusedError

    monkeypatch.setenv("CARIES_MIM_API_KEYS", "from-the-shell")
    monkeypatch.setattr(service_client.subprocess, "Popen", fake_popen)
    service = LocalService(
        tmp_path / "m.cmpkg", tmp_path / "log", environment={"CARIES_MIM_QUEUE_SIZE": "3"}, inherit_settings=inherit
    )
    with pytest.raises(RefusedError), service:
        pass
    assert seen["CARIES_MIM_QUEUE_SIZE"] == "3"
    assert ("CARIES_MIM_API_KEYS" in seen) == inherit
    assert "PATH" in seen
