"""A throwaway Orthanc on loopback for the PACS round trips: its JSON config written by the test (DICOM
modalities, DICOMweb servers, the DICOMweb plugin), its REST API wrapped in the few calls the tests need.

Orthanc comes from the Debian packages ``orthanc`` and ``orthanc-dicomweb``; where either is missing,
``require_orthanc`` skips the test and names the missing program."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.polling import eventually

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require_orthanc() -> None:
    """Skip the calling test unless Orthanc and its DICOMweb plugin are installed."""
    if not ORTHANC.is_file():
        pytest.skip(f"Orthanc is not installed (Debian package orthanc): {ORTHANC} not found")
    if not DICOMWEB_PLUGIN.is_file():
        plugin = "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
        pytest.skip(f"{plugin}: {DICOMWEB_PLUGIN} not found")


class Orthanc:
    """One Orthanc process on 127.0.0.1 with its storage, index and log in ``folder``.

    ``modalities`` maps a name to (AET, host, port) of a DICOM peer Orthanc may C-STORE to; ``dicomweb_servers``
    maps a name to a DICOMweb server entry (``{"Url": ..., "HttpHeaders": {...}}``) Orthanc may STOW to. Its
    DICOM and HTTP ports are chosen free up front, so that a peer can be told where Orthanc listens before it
    starts."""

    ae_title = "ORTHANC"

    def __init__(
        self,
        folder: Path,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.dicomweb_servers = dict(dicomweb_servers or {})
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "caries-mim-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # Any calling AE (the gateway's sender among them) may store; only the named modalities are sent to.
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": self.dicomweb_servers},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "SaveJobs": False,
            # A stuck peer fails the call (and the test, with Orthanc's log) instead of hanging it.
            "DicomScuTimeout": 60,
            "HttpTimeout": 60,
        }

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        require_orthanc()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with (self.folder / "orthanc.log").open("wb") as log:
            self.process = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT)
        if not eventually(self._answers, timeout_s=timeout_s, interval_s=0.2):
            self.stop()
            raise AssertionError(f"Orthanc did not answer on {self.url}:\n{self.log()}")
        return self

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return True  # exited: stop polling, the caller finds out below
        try:
            return self.json("GET", "/system")["DicomAet"] == self.ae_title
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log(self, characters: int = 4000) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-characters:] if path.is_file() else ""

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited ({self.process.returncode}):\n{self.log()}")
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise AssertionError(f"Orthanc {method} {path}: HTTP {exc.code} {detail}\n{self.log()}") from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        return json.loads(self.request(method, path, data, "application/json" if data else None))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file in Orthanc; its answer (``ID``, ``ParentStudy``, ``Status``...)."""
        return json.loads(self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))

    def store_to_modality(self, modality: str, resource_id: str) -> dict[str, Any]:
        """C-STORE a resource (instance, series, study...) to a configured modality and wait for the end."""
        return self.json("POST", f"/modalities/{modality}/store", {"Resources": [resource_id], "Synchronous": True})

    def stow_to_server(self, server: str, resource_id: str) -> dict[str, Any]:
        """STOW-RS a resource to a configured DICOMweb server and wait for the end."""
        return self.json("POST", f"/dicom-web/servers/{server}/stow", {"Resources": [resource_id], "Synchronous": True})

    def instances(self) -> list[str]:
        return self.json("GET", "/instances")

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (Orthanc's simplified form: sequences as lists of dicts)."""
        return self.json("GET", f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")
