"""Operating the service: API keys, readiness, the model card, metrics, settings, logs without patient data."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from starlette.formparsers import MultiPartParser

import service.app
from caries_mim.errors import InvalidConfigError
from caries_mim.inference import Predictor
from service import ServiceSettings, create_app
from service.settings import is_loopback


def test_no_key_wrong_key_right_key(make_client, synthetic_dicom):
    client = make_client(api_keys=["s3cret", "other"])
    files = {"file": ("a.dcm", synthetic_dicom.read_bytes())}
    missing = client.post("/v1/predictions", files=files)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/predictions", files=files, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = client.post("/v1/predictions", files=files, headers={"authorization": "Basic s3cret"})
    assert basic.status_code == 401
    right = client.post("/v1/predictions", files=files, headers={"authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers={"authorization": "Bearer other"}).status_code == 200
    # Probes and metrics stay open for the orchestrator.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("expect_continue", [False, True])
def test_the_upload_of_a_client_without_a_key_is_never_parsed(make_client, monkeypatch, expect_continue):
    """The key is checked from the headers: the form is never parsed (nothing held in memory for it); a client
    waiting for 100 Continue is refused before it sends its body, any other gets its body read and dropped first
    (so it reads a 401 rather than a broken pipe)."""
    parsed = []
    monkeypatch.setattr(MultiPartParser, "parse", lambda self: parsed.append(self))
    client = make_client(api_keys=["s3cret"])
    sent = []

    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n\r\n'
        for _ in range(50):
            sent.append(1)
            yield b"\x00" * 65536
        yield b"\r\n--x--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=x"}
    if expect_continue:
        headers["expect"] = "100-continue"
    response = client.post("/v1/predictions", content=chunks(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["x-request-id"]  # still logged and counted by the request context
    assert parsed == []
    assert (len(sent) < 50) == expect_continue


def test_keys_from_a_file(make_client, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nfile-key\n\n")
    client = make_client(api_keys_file=keys)
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers={"authorization": "Bearer file-key"}).status_code == 200


def test_unreadable_key_file_is_a_config_error(tmp_path):
    with pytest.raises(InvalidConfigError, match="api_keys_file"):
        ServiceSettings(api_keys_file=tmp_path / "missing").accepted_keys()


def test_readiness_before_and_after_the_model_loads(predictor):
    app = create_app(ServiceSettings(), predictor=predictor)
    client = TestClient(app)  # not entered: the lifespan (model loading) has not run
    assert client.get("/healthz").status_code == 200
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["error"]["code"] == "not_ready"
    assert not_ready.headers["retry-after"]
    with client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"


def test_model_loads_from_the_package_file_at_start_up(package_path, package):
    with TestClient(create_app(ServiceSettings(model=package_path, device="cpu"))) as client:
        card = client.get("/v1/model").json()
    assert card["classes"] == ["caries", "deep_caries"]
    assert card["threshold"] == package.threshold
    assert card["model"]["version"] == "0.1.0"
    assert card["provenance"] == {"purpose": "tests"}
    assert "second reader" in card["intended_use"]
    assert card["input"]["preprocessing"]["image_size"] == package.config.image_size


def test_the_model_is_loaded_on_the_thread_that_runs_it(package_path, synthetic_dicom, monkeypatch):
    # One thread for all of the model's work keeps PyTorch to one OpenMP team (service.batching.ModelThread).
    threads = {"load": set(), "predict": set()}
    load_package = service.app.load_package
    predict_batch = Predictor.predict_batch

    def recording_load(*args, **kwargs):
        threads["load"].add(threading.get_ident())
        return load_package(*args, **kwargs)

    def recording_predict(self, *args, **kwargs):
        threads["predict"].add(threading.get_ident())
        return predict_batch(self, *args, **kwargs)

    monkeypatch.setattr(service.app, "load_package", recording_load)
    monkeypatch.setattr(Predictor, "predict_batch", recording_predict)
    with TestClient(create_app(ServiceSettings(model=package_path, device="cpu"))) as client:
        answer = client.post("/v1/predictions", files={"file": ("x.dcm", synthetic_dicom.read_bytes())})
    assert answer.status_code == 200
    assert len(threads["load"]) == 1
    assert threads["predict"] == threads["load"]
    assert threading.get_ident() not in threads["load"]


def test_metrics_count_requests_by_route_and_status(client, synthetic_dicom):
    client.post("/v1/predictions", files={"file": ("a.dcm", synthetic_dicom.read_bytes())})
    client.post("/v1/predictions", files={"file": ("a.txt", b"nothing")})
    text = client.get("/metrics").text
    assert 'caries_mim_requests_total{method="POST",route="/v1/predictions",status="200"} 1.0' in text
    assert 'caries_mim_requests_total{method="POST",route="/v1/predictions",status="415"} 1.0' in text
    assert "caries_mim_request_seconds_bucket" in text
    assert "caries_mim_inference_seconds_count 1.0" in text
    assert "caries_mim_batch_size_count 1.0" in text
    assert "caries_mim_queue_depth" in text


def test_openapi_documents_the_routes_and_answers(client):
    schema = client.get("/openapi.json").json()
    prediction = schema["paths"]["/v1/predictions"]["post"]
    assert set(prediction["responses"]["200"]["content"]) == {"application/json", "application/dicom", "image/png"}
    assert prediction["responses"]["200"]["content"]["application/json"]["example"]["findings"]
    assert {"401", "406", "413", "415", "422", "503", "504"} <= set(prediction["responses"])
    assert {"/v1/model", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])


def test_logs_carry_the_hashed_uid_never_patient_identifiers(client, synthetic_dicom, capfd):
    import pydicom

    from caries_mim.io.radiograph import hash_uid

    source = pydicom.dcmread(synthetic_dicom, stop_before_pixels=True)
    for accept in ("application/json", "application/dicom", "image/png"):
        response = client.post(
            "/v1/predictions", files={"file": ("a.dcm", synthetic_dicom.read_bytes())}, headers={"accept": accept}
        )
        assert response.status_code == 200
    logged = capfd.readouterr().err
    assert hash_uid(source.SOPInstanceUID) in logged
    for identifier in (str(source.PatientName), source.PatientID, source.SOPInstanceUID, source.StudyInstanceUID):
        assert identifier not in logged
    assert "SYNTH^PATIENT" not in logged


def test_request_id_is_echoed_when_tame_and_replaced_when_not(client):
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    replaced = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced != "bad id\twith spaces"
    assert len(replaced) == 32


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CARIES_MIM_API_KEYS", "a, b")
    monkeypatch.setenv("CARIES_MIM_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("CARIES_MIM_MODALITIES", "IO,DX")
    monkeypatch.setenv("CARIES_MIM_MODEL", str(tmp_path / "m.cmpkg"))
    settings = ServiceSettings()
    assert settings.accepted_keys() == {"a", "b"}
    assert settings.max_batch_size == 16
    assert settings.modalities == ["IO", "DX"]
    assert settings.model == tmp_path / "m.cmpkg"
    assert ServiceSettings(max_batch_size=2).max_batch_size == 2  # explicit values win


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_bind_needs_keys_or_insecure():
    with pytest.raises(InvalidConfigError, match="without API keys"):
        ServiceSettings(host="0.0.0.0").check_bind_security()
    ServiceSettings(host="0.0.0.0", api_keys=["k"]).check_bind_security()
    ServiceSettings(host="0.0.0.0", insecure=True).check_bind_security()
    ServiceSettings(host="127.0.0.1").check_bind_security()


def test_header_text_in_pydicom_warnings_never_reaches_the_logs(client, capfd):
    import warnings

    from tests.dicom_factory import make_dataset, ramp, to_bytes

    dataset = make_dataset(ramp(), window=(2048, 4096))
    dataset.StudyInstanceUID = "SECRET^PATIENT^NAME"  # not a UID: pydicom quotes it in a warning when reading
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = to_bytes(dataset)
    capfd.readouterr()
    response = client.post("/v1/predictions", files={"file": ("a.dcm", data)})
    assert response.status_code == 200
    captured = capfd.readouterr()
    assert "SECRET^PATIENT" not in captured.err + captured.out


def test_a_failing_model_is_a_500_with_a_request_id_and_no_traceback(predictor, synthetic_dicom, monkeypatch, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(predictor, "predict_batch", broken)
    monkeypatch.setattr(predictor, "predict", broken)
    app = create_app(ServiceSettings(), predictor=predictor)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/predictions",
            files={"file": ("a.dcm", synthetic_dicom.read_bytes())},
            headers={"x-request-id": "req-42"},
        )
        assert client.get("/readyz").status_code == 200  # the worker survives a failed batch
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    assert "req-42" in error["message"]
    assert "Traceback" not in response.text
    assert "illegal memory access" not in response.text
    assert "illegal memory access" in capfd.readouterr().err  # the operator's log has it


def test_liveness_and_readiness_fail_while_a_model_batch_hangs(predictor, synthetic_dicom, monkeypatch):
    release = threading.Event()
    predict_batch = Predictor.predict_batch

    def hanging(self, *args, **kwargs):
        release.wait(10)
        return predict_batch(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_batch", hanging)
    with TestClient(create_app(ServiceSettings(stall_timeout_s=0.2), predictor=predictor)) as client:
        assert client.get("/healthz").status_code == 200
        answers = []
        upload = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/predictions", files={"file": ("x.dcm", synthetic_dicom.read_bytes())})
            )
        )
        upload.start()
        deadline = time.monotonic() + 10
        while client.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        alive, ready = client.get("/healthz"), client.get("/readyz")
        release.set()
        upload.join(10)
        recovered = client.get("/healthz")
    assert alive.status_code == 503
    assert alive.json()["error"]["code"] == "unhealthy"
    assert "stall limit 0.2 s" in alive.json()["error"]["message"]
    assert ready.status_code == 503
    assert answers[0].status_code == 200
    assert recovered.status_code == 200
