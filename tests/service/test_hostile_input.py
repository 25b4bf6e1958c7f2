"""Hostile input against the application: a decoder that crashes or hangs costs its own request only, anything
unforeseen is answered in the JSON error shape with a request id, and uploads are bounded at the door.

The decode workers are real processes running ``tests/fuzz/hostile.py``, which crashes (SIGSEGV), hangs or
panics on purpose when a file starts with a command word."""

from __future__ import annotations

import json
import threading

import pytest

from caries_mim.inference import Predictor
from service.middleware import UploadGate
from tests.fuzz.hostile import hostile_read
from tests.polling import eventually, sample


def post(client, data: bytes, **kwargs):
    return client.post("/v1/predictions", files={"file": ("image.dcm", data, "application/dicom")}, **kwargs)


def _metric(client, name: str, *labels: str) -> float:
    return sample(client.get("/metrics").text, name, *labels)


def test_a_crash_and_a_hang_in_the_decoder_touch_no_other_request(make_client, synthetic_dicom):
    client = make_client(read_function=hostile_read, decode_timeout_s=2.0, decode_workers=2)
    good = synthetic_dicom.read_bytes()
    answers: dict[str, object] = {}

    def send(name: str, data: bytes) -> None:
        answers[name] = post(client, data)

    hang = threading.Thread(target=send, args=("hang", b"HANG" + good))
    hang.start()
    others = [threading.Thread(target=send, args=("crash", b"CRASH" + good))]
    others += [threading.Thread(target=send, args=(f"good{i}", good)) for i in range(4)]
    for thread in others:
        thread.start()
    for thread in [hang, *others]:
        thread.join(timeout=60)

    crashed = answers.pop("crash")
    assert crashed.status_code == 422
    assert crashed.json()["error"]["code"] == "corrupt_pixel_data"
    assert "SIGSEGV" in crashed.json()["error"]["message"]
    hung = answers.pop("hang")
    assert hung.status_code == 504
    assert hung.json()["error"]["code"] == "decode_timeout"
    assert hung.headers["retry-after"]
    assert {name: answer.status_code for name, answer in answers.items()} == {f"good{i}": 200 for i in range(4)}
    assert client.get("/readyz").status_code == 200
    assert _metric(client, "caries_mim_decoder_restarts_total", 'reason="crash"') == 1
    assert _metric(client, "caries_mim_decoder_restarts_total", 'reason="timeout"') == 1
    assert post(client, good).status_code == 200


def test_a_panic_outside_the_decoders_is_a_json_500_with_the_request_id(make_client, synthetic_dicom, capsys):
    client = make_client()

    class Panic(BaseException):
        """A Rust panic (pyo3) is a BaseException: Starlette's error middleware does not catch it."""

    async def panicking_read(data):
        raise Panic("index out of bounds")

    client.app.state.runtime.decoder.read = panicking_read
    response = post(client, synthetic_dicom.read_bytes(), headers={"X-Request-ID": "req-7"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "the service failed; quote request id req-7"}
    }
    assert response.headers["x-request-id"] == "req-7"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failures = [entry for entry in logged if entry["message"] == "unhandled error"]
    assert len(failures) == 1
    assert failures[0]["request_id"] == "req-7"
    assert "Panic: index out of bounds" in failures[0]["exception"]
    assert client.get("/readyz").status_code == 200


def test_an_ordinary_bug_is_answered_and_logged_once(make_client, synthetic_dicom, capsys):
    client = make_client()

    async def failing_read(data):
        raise ValueError("a bug")

    client.app.state.runtime.decoder.read = failing_read
    response = post(client, synthetic_dicom.read_bytes())
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [entry["message"] for entry in logged].count("unhandled error") == 1


def _gate(client) -> UploadGate:
    layer = client.app.middleware_stack
    while not isinstance(layer, UploadGate):
        layer = layer.app
    return layer


def test_uploads_past_the_concurrent_limit_get_503_at_once(make_client, synthetic_dicom):
    client = make_client(read_function=hostile_read, max_concurrent_uploads=1, decode_timeout_s=2.0)
    slow = threading.Thread(target=post, args=(client, b"SLEEP" + synthetic_dicom.read_bytes()))
    slow.start()
    gate = _gate(client)
    try:
        assert eventually(lambda: gate.in_progress == 1)
        refused = post(client, synthetic_dicom.read_bytes())
    finally:
        slow.join(timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "busy"
    assert refused.headers["retry-after"] == "1"
    assert gate.in_progress == 0
    assert _metric(client, "caries_mim_uploads_refused_total", 'reason="busy"') == 1
    assert post(client, synthetic_dicom.read_bytes()).status_code == 200


def test_the_upload_slot_is_given_back_once_decoded(make_client, synthetic_dicom, monkeypatch):
    """A request waiting for the model no longer holds an upload slot: the queue bounds it from there."""
    client = make_client(max_concurrent_uploads=1)
    gate = _gate(client)
    seen_during_inference = []
    predict_batch = Predictor.predict_batch

    def watching(self, *args, **kwargs):
        seen_during_inference.append(gate.in_progress)
        return predict_batch(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_batch", watching)
    assert post(client, synthetic_dicom.read_bytes()).status_code == 200
    assert seen_during_inference == [0]


def test_probes_and_the_model_card_are_not_uploads(make_client):
    client = make_client(max_concurrent_uploads=1)
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/model").status_code == 200
    assert _gate(client).in_progress == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_in_process_or_isolated_gives_the_same_answer(make_client, synthetic_dicom, workers):
    client = make_client(decode_workers=workers)
    answer = post(client, synthetic_dicom.read_bytes(), params={"all_findings": "true"})
    assert answer.status_code == 200
    findings = answer.json()["findings"]
    reference = make_client(decode_workers=1 - min(workers, 1))
    assert post(reference, synthetic_dicom.read_bytes(), params={"all_findings": "true"}).json()["findings"] == findings


def test_an_upload_cannot_read_a_file_of_the_server(make_client, tmp_path):
    """An MHA header may name any file as its pixels: an upload pointing at a secret gets 422, not the secret drawn
    as an overlay."""
    secret = tmp_path / "api_keys"
    secret.write_bytes(b"the-service-api-key\n" * 8)
    header = (
        f"ObjectType = Image\nNDims = 2\nDimSize = 160 1\nElementType = MET_UCHAR\nElementDataFile = {secret}\n"
    ).encode()
    response = post(make_client(), header, headers={"Accept": "image/png"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "corrupt_header"
