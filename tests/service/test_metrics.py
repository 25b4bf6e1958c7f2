"""Metrics with several workers: prometheus-client's multiprocess files, summed over the workers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import service.metrics
from service.metrics import MULTIPROCESS_DIR_VARIABLE, ServiceMetrics

# service/metrics.py loaded on its own: importing the ``service`` package would import FastAPI, torch and MONAI
# (seconds per worker) for a module that needs only prometheus-client.
_WORKER = textwrap.dedent(
    """
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("service_metrics", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.ServiceMetrics()
    metrics.requests.labels("/v1/predictions", "POST", "200").inc(3)
    metrics.queue_depth.set(5)
    if os.environ.get("SHUT_DOWN") == "1":
        metrics.process_exiting()
    os._exit(0)  # no interpreter clean-up, as a killed worker
    """
)


def _worker(directory, *, shut_down: bool) -> None:
    environment = {MULTIPROCESS_DIR_VARIABLE: str(directory), "SHUT_DOWN": "1" if shut_down else "0"}
    command = [sys.executable, "-c", _WORKER, str(Path(service.metrics.__file__))]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_counts_of_every_worker_add_up_and_dead_workers_leave_no_queue_depth(tmp_path, monkeypatch):
    _worker(tmp_path, shut_down=True)
    _worker(tmp_path, shut_down=False)  # died without its shutdown: its gauge file stays behind
    assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 1
    monkeypatch.setenv(MULTIPROCESS_DIR_VARIABLE, str(tmp_path))
    text = ServiceMetrics().exposition().decode()
    assert _sample(text, "caries_mim_requests_total") == 6.0
    assert _sample(text, "caries_mim_queue_depth") in (None, 0.0)
    assert not list(tmp_path.glob("gauge_livesum_*.db"))


def test_one_worker_reports_its_own_registry(monkeypatch):
    monkeypatch.delenv(MULTIPROCESS_DIR_VARIABLE, raising=False)
    metrics = ServiceMetrics()
    metrics.requests.labels("/healthz", "GET", "200").inc()
    metrics.queue_depth.set(2)
    text = metrics.exposition().decode()
    assert _sample(text, "caries_mim_requests_total") == 1.0
    assert _sample(text, "caries_mim_queue_depth") == 2.0
