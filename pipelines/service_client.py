"""Talking to a caries-mim service over HTTP with the standard library, and running one for a while.

:class:`LocalService` starts ``caries-mim serve`` in its own process on a free loopback port, waits until
``/readyz`` says the model is loaded, and on exit stops it with SIGTERM as an orchestrator would (uvicorn then
finishes in-flight requests and the service drains its queue). The demo's last stage, the end-to-end test and
``benchmarks/service_latency.py`` use it.
"""

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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from caries_mim.errors import CariesMimError


class ServiceStartError(CariesMimError):
    """The service process exited or did not become ready in time."""

    code = "service_start_failed"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart_body(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_radiograph(
    base_url: str, data: bytes, *, accept: str = "application/json", api_key: str | None = None, timeout: float = 120
) -> HttpAnswer:
    """POST one file to ``/v1/predictions``; any HTTP status comes back as an answer (no exception)."""
    body, content_type = multipart_body("file", "radiograph.dcm", data)
    headers = {"content-type": content_type, "accept": accept}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url}/v1/predictions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return HttpAnswer(answer.status, answer.headers.get("content-type", ""), answer.read())
    except urllib.error.HTTPError as error:
        return HttpAnswer(error.code, error.headers.get("content-type", ""), error.read())


class LocalService:
    """``caries-mim serve --model PKG`` on 127.0.0.1 for the duration of a ``with`` block.

    Args:
        package: the model package to serve.
        log_path: where the server's stdout and stderr (its JSON logs) go.
        environment: extra ``CARIES_MIM_*`` settings (e.g. API keys, batching).
        ready_timeout_s: how long start-up (imports and model loading) may take.
        inherit_settings: let the service see the ``CARIES_MIM_*`` variables of this process too; False leaves
            ``environment`` as its only settings (a benchmark must not measure whatever a shell exported).
    """

    def __init__(
        self,
        package: str | os.PathLike,
        log_path: str | os.PathLike,
        *,
        environment: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        inherit_settings: bool = True,
    ) -> None:
        self.package = Path(package)
        self.log_path = Path(log_path)
        self.environment = environment or {}
        self.ready_timeout_s = ready_timeout_s
        self.inherit_settings = inherit_settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.exit_status: int | None = None

    def __enter__(self) -> LocalService:
        command = [sys.executable, "-m", "pipelines.cli", "serve", "--model", str(self.package)]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        inherited = {
            key: value
            for key, value in os.environ.items()
            if self.inherit_settings or not key.startswith("CARIES_MIM_")
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**inherited, **self.environment}
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then wait (kill after ``timeout_s``); returns the exit status (-15: ended by the signal after
        uvicorn's graceful shutdown, which re-raises it)."""
        if self.process is None or self.exit_status is not None:
            return self.exit_status
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_status = self.process.returncode
        return self.exit_status

    def log_tail(self, characters: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceStartError(
                    f"the service exited with status {self.process.returncode} during start-up; its log "
                    f"{self.log_path} ends with: {self.log_tail(600)}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=2) as ready:
                    if json.load(ready).get("status") == "ready":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise ServiceStartError(f"the service was not ready after {self.ready_timeout_s:g} s (log: {self.log_path})")
