"""``caries-mim gateway run`` as its own process, for the tests that need the real command (signals, kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def launch_gateway(
    root: Path, package_path: Path, *options: str, log: Path | None = None
) -> tuple[subprocess.Popen, dict]:
    """Start a gateway on ``root`` with the tiny test model, any free DICOM port and ``options``; returns the
    process and its start line (``{"port": ..., "http_port": ...}``). Its log goes to ``log`` (default
    ``root/../gateway.log``), appended: a pipe nobody reads while a test waits could fill and stall the gateway."""
    log = log or gateway_log(root)
    command = [
        sys.executable, "-m", "pipelines.cli", "gateway", "run",
        "--root", str(root), "--model", str(package_path), "--port", "0", "--device", "cpu", *options,
    ]  # fmt: skip
    with open(log, "a") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    if not lines or not lines[0].strip():
        process.kill()
        process.wait(30)
        raise AssertionError(f"the gateway did not start: {log.read_text()[-2000:]}")
    return process, json.loads(lines[0])


def gateway_log(root: Path) -> Path:
    """Where :func:`launch_gateway` writes a gateway's log by default (beside its folder, which it may create)."""
    return Path(root).parent / f"{Path(root).name}.log"


def stop_gateway(process: subprocess.Popen) -> None:
    """SIGTERM, and the clean exit it must lead to."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
