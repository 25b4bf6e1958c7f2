"""Every file of pydicom's bundled test data gets a 2xx or a 4xx from the service, never a 5xx: odd encodings,
broken files, other modalities, non-image objects, and the non-DICOM files beside them.

Read from the installed package's folder: ``get_testdata_files`` would also try to download pydicom-data's
larger files, and tests never touch the network."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest


def pydicom_test_files() -> list[Path]:
    folder = Path(pydicom.data.__file__).parent
    return sorted(path for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts)


@pytest.mark.slow
def test_every_pydicom_test_file_gets_a_2xx_or_4xx(client):
    files = pydicom_test_files()
    assert len(files) > 100
    answers: dict[int, int] = {}
    server_errors = []
    for path in files:
        response = client.post("/v1/predictions", files={"file": (path.name, path.read_bytes())})
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            server_errors.append(f"{path.name}: {response.status_code} {response.text[:200]}")
        else:
            assert response.status_code in (200, 413, 415, 422), f"{path.name}: {response.status_code}"
            if response.status_code != 200:
                assert response.json()["error"]["code"], path.name
    assert not server_errors, "\n".join(server_errors)
    assert answers.get(200, 0) > 0, answers
    assert answers.get(422, 0) > 0, answers
