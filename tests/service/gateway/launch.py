"""``caries-mim gateway run`` as its own process, for the tests that need the real command (signals, kill -9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path


def launch_gateway(root: Path, package_path: Path, *options: str, log=subprocess.PIPE) -> tuple[subprocess.Popen, dict]:
    """Start a gateway on ``root`` with the tiny test model, any free DICOM port and ``options``; returns the
    process and its start line (``{"port": ..., "http_port": ...}``). ``log``: where its stderr goes."""
    command = [
        sys.executable, "-m", "pipelines.cli", "gateway", "run",
        "--root", str(root), "--model", str(package_path), "--port", "0", "--device", "cpu", *options,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    if not lines or not lines[0].strip():
        process.kill()
        problem = process.stderr.read()[-2000:] if log == subprocess.PIPE else f"see {log}"
        raise AssertionError(f"the gateway did not start: {problem}")
    return process, json.loads(lines[0])
