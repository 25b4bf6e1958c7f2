"""POST /v1/predictions: JSON, DICOM SR and PNG answers, content negotiation, and every way an upload can be bad."""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from tests.dicom_factory import make_dataset, ramp, to_bytes


def post(client, data: bytes, *, accept: str | None = None, name: str = "image.dcm", **form):
    headers = {"accept": accept} if accept else {}
    return client.post("/v1/predictions", files={"file": (name, data)}, data=form, headers=headers)


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_json_findings_for_a_dicom(client, synthetic_dicom, package):
    source = pydicom.dcmread(synthetic_dicom)
    response = post(client, synthetic_dicom.read_bytes())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"]["version"] == "0.1.0"
    assert len(body["model"]["checksum"]) == 64
    image = body["image"]
    assert (image["rows"], image["columns"]) == (source.Rows, source.Columns)
    assert image["sop_instance_uid"] == source.SOPInstanceUID
    assert image["spacing_mm"] is not None
    assert body["threshold"] == package.threshold
    assert body["findings"], "half the test detector's boxes score above its threshold"
    for finding in body["findings"]:
        assert finding["score"] >= package.threshold
        assert finding["above_threshold"]
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= source.Columns
        assert 0 <= y0 < y1 <= source.Rows
        assert finding["box_mm"][2] == pytest.approx(x1 * image["spacing_mm"][1])
    assert set(body["timings_ms"]) == {"read", "queue", "inference", "render", "total"}
    assert response.headers["x-request-id"]


def test_all_findings_adds_those_below_the_threshold(client, synthetic_dicom):
    data = synthetic_dicom.read_bytes()
    above = post(client, data).json()["findings"]
    every = client.post("/v1/predictions?all_findings=true", files={"file": ("a.dcm", data)}).json()["findings"]
    assert len(every) > len(above)
    assert any(not finding["above_threshold"] for finding in every)


def _sr_boxes(dataset: pydicom.Dataset) -> list[list[float]]:
    """Every SCOORD's GraphicData in the SR content tree, as [x0, y0, x1, y1] of its closed polyline."""
    boxes = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                points = np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2)
                assert item.GraphicType == "POLYLINE"
                assert len(points) == 5
                assert np.array_equal(points[0], points[-1])
                boxes.append([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()])
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dataset.ContentSequence)
    return boxes


def test_dicom_structured_report_references_the_image_and_matches_the_json(client, synthetic_dicom):
    data = synthetic_dicom.read_bytes()
    source = pydicom.dcmread(synthetic_dicom)
    findings = post(client, data).json()["findings"]
    response = post(client, data, accept="application/dicom")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    report = pydicom.dcmread(io.BytesIO(response.content))
    assert report.Modality == "SR"
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert source.SOPInstanceUID in response.content.decode("latin-1")
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    expected = sorted(finding["box"] for finding in findings)
    np.testing.assert_allclose(sorted(_sr_boxes(report)), expected, atol=1e-3)


def test_png_overlay_has_the_image_size(client, synthetic_dicom):
    source = pydicom.dcmread(synthetic_dicom, stop_before_pixels=True)
    response = post(client, synthetic_dicom.read_bytes(), accept="image/png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.size == (source.Columns, source.Rows)
    assert picture.mode == "RGB"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("*/*", "application/json"),
        ("text/html, */*;q=0.1", "application/json"),
        ("image/png;q=0.5, application/dicom;q=0.9", "application/dicom"),
        ("image/*", "image/png"),
    ],
)
def test_accept_header_chooses_the_answer(client, synthetic_dicom, accept, expected):
    response = post(client, synthetic_dicom.read_bytes(), accept=accept)
    assert response.status_code == 200
    assert response.headers["content-type"] == expected


def test_unacceptable_accept_is_406(client, synthetic_dicom):
    response = post(client, synthetic_dicom.read_bytes(), accept="text/html")
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "not_acceptable"


def test_png_upload_with_spacing_gets_millimetres(client):
    pixels = (ramp(96, 128, 8) % 256).astype(np.uint8)
    response = post(client, png_bytes(pixels), name="image.png", pixel_spacing_mm="0.05")
    assert response.status_code == 200
    body = response.json()
    assert body["image"]["spacing_mm"] == [0.05, 0.05]
    assert body["image"]["sop_instance_uid"] is None
    for finding in body["findings"]:
        assert finding["box_mm"] == pytest.approx([value * 0.05 for value in finding["box"]])


def test_png_upload_cannot_get_a_structured_report(client):
    response = post(client, png_bytes(np.zeros((64, 64), np.uint8)), accept="application/dicom", name="x.png")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "dicom_input_required"


@pytest.mark.parametrize("spacing", ["abc", "0", "-1", "0.1,0.2,0.3", "nan", "50"])
def test_bad_spacing_is_422(client, spacing):
    response = post(client, png_bytes(np.zeros((64, 64), np.uint8)), name="x.png", pixel_spacing_mm=spacing)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_argument"
    assert "pixel_spacing_mm" in response.json()["error"]["message"]


def good_dicom() -> pydicom.Dataset:
    return make_dataset(ramp(), window=(2048, 4096))


def _color() -> bytes:
    ds = good_dicom()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 8, 8, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
    return to_bytes(ds)


def _multi_frame() -> bytes:
    ds = make_dataset(np.concatenate([ramp(), ramp()]), window=(2048, 4096))
    ds.Rows, ds.NumberOfFrames = 48, 2
    return to_bytes(ds)


def _no_pixels() -> bytes:
    ds = good_dicom()
    del ds.PixelData
    return to_bytes(ds)


def _truncated() -> bytes:
    data = to_bytes(good_dicom(), RLELossless)
    return data[: len(data) - 200]


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: b"plain text, not an image", 415, "not_an_image"),
        (lambda: b"", 415, "not_an_image"),
        (_truncated, 422, "corrupt_pixel_data"),
        (lambda: b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x01" * 40, 422, "corrupt_header"),
        (_color, 422, "unsupported_photometric"),
        (_multi_frame, 422, "multi_frame"),
        (_no_pixels, 422, "no_pixel_data"),
        (lambda: to_bytes(make_dataset(ramp(), modality="CT", window=(2048, 4096))), 422, "unsupported_modality"),
    ],
)
def test_bad_uploads_get_a_clear_error(client, make, status, code):
    response = post(client, make())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_image_over_the_pixel_limit_is_refused_before_decoding(make_client, synthetic_dicom, monkeypatch):
    import caries_mim.io.dicom as dicom_module

    def never(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(dicom_module, "decode_pixels", never)
    # Decoded in this process, where the patch applies (the isolated decoders are other processes).
    client = make_client(max_pixels=1000, decode_workers=0)
    response = post(client, synthetic_dicom.read_bytes())
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "image_too_large"


def test_missing_file_field_is_422(client):
    response = client.post("/v1/predictions", data={"pixel_spacing_mm": "0.1"}, files={"other": ("a", b"x")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "file" in error["message"]


def test_raw_body_instead_of_a_form_is_415(client, synthetic_dicom):
    response = client.post(
        "/v1/predictions", content=synthetic_dicom.read_bytes(), headers={"content-type": "application/dicom"}
    )
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_body_over_the_limit_is_413_by_content_length(make_client):
    client = make_client(max_upload_bytes=4096)
    response = post(client, b"\x00" * 10_000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_body_over_the_limit_is_413_while_streaming_without_a_length(make_client):
    client = make_client(max_upload_bytes=4096)
    read = []

    def chunks():
        boundary = b"--x\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.dcm"\r\n\r\n'
        for _ in range(100):
            read.append(1)
            yield b"\x00" * 1024
        yield b"\r\n--x--\r\n"

    response = client.post(
        "/v1/predictions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method_use_the_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.get("/v1/predictions")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_uploads_of_several_megabytes_stay_in_memory(client, monkeypatch):
    """Starlette spools uploads past 1 MB to a temporary file by default; the service reads every upload into
    memory anyway, so the disk round trip would only slow a 2-5 MB bitewing down."""
    rollovers = []
    original = tempfile.SpooledTemporaryFile.rollover

    def counting_rollover(self):
        rollovers.append(self)
        return original(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", counting_rollover)
    response = post(client, b"not an image " * 300_000)  # 3.9 MB
    assert response.status_code == 415
    assert rollovers == []
