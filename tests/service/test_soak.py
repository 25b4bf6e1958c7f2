"""Soak: 16 clients for 2 minutes against the real server (uvicorn, decode workers, the model), half of the
uploads valid radiographs and half hostile files: no 5xx, no dropped connection, and the server ready afterwards.

The figures (throughput, latency, memory growth between the first and last 30 s) are the benchmark's to print:
``benchmarks/soak.py``. ``CARIES_MIM_SOAK_SECONDS`` shortens the run while working on it.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from pipelines.service_client import LocalService
from tests.load import mixed_uploads, soak

CLIENTS = 16
SECONDS = float(os.environ.get("CARIES_MIM_SOAK_SECONDS", "120"))


@pytest.mark.slow
def test_sixteen_clients_for_two_minutes_get_no_5xx_and_no_dropped_connection(package_path, tmp_path):
    uploads = mixed_uploads(tmp_path)
    environment = {"OMP_NUM_THREADS": "1"}
    with LocalService(package_path, tmp_path / "server.log", environment=environment, inherit_settings=False) as server:
        result = soak(server.port, server.process.pid, uploads, clients=CLIENTS, seconds=SECONDS)
        with urllib.request.urlopen(f"{server.base_url}/readyz", timeout=10) as ready:
            assert json.load(ready)["status"] == "ready"
        log = server.log_tail(100_000_000)
    summary = result.summary()
    assert result.server_errors == 0, summary
    assert result.dropped == [], result.dropped[:5]
    assert summary["statuses"]["valid"].get(200, 0) >= CLIENTS, summary
    assert sum(summary["statuses"]["broken"].values()) >= CLIENTS, summary
    assert "Traceback" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [entry for entry in entries if entry["level"] in ("error", "critical")]
