"""Running the service with uvicorn: ``caries-mim serve`` calls :func:`serve`.

Settings travel to the worker processes as ``CARIES_MIM_*`` environment variables (uvicorn starts each worker
from an import string, so :func:`app_from_environment` rebuilds the settings there). Uvicorn handles SIGTERM and
Ctrl-C: it stops accepting connections, lets in-flight requests finish, then runs the lifespan's shutdown, which
drains the inference queue.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from caries_mim.errors import InvalidConfigError
from caries_mim.inference import inference_device
from caries_mim.package import read_package, shipped_reference_detector
from service.app import create_app
from service.metrics import MULTIPROCESS_DIR_VARIABLE
from service.settings import ServiceSettings

#: Seconds uvicorn waits for in-flight requests after SIGTERM before closing them.
GRACEFUL_SHUTDOWN_S = 30


def app_from_environment() -> FastAPI:
    """The application configured from ``CARIES_MIM_*`` variables (uvicorn's factory in each worker)."""
    return create_app(ServiceSettings())


def settings_environment(settings: ServiceSettings) -> dict[str, str]:
    """``settings`` as the ``CARIES_MIM_*`` variables that rebuild it (lists comma-separated, None left out)."""
    values = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        values[f"CARIES_MIM_{name.upper()}"] = str(value)
    return values


def serve(settings: ServiceSettings) -> None:
    """Check the settings, then run uvicorn until SIGTERM / Ctrl-C.

    Raises:
        InvalidConfigError: no model given and none shipped, a model file that does not exist, or a non-loopback
            host without API keys and without ``insecure``.
        InvalidCheckpointError: the file is not a valid model package.
        InvalidArgumentError: an unknown device, or CUDA where none is available.
    """

    if settings.model is None:
        settings = settings.model_copy(update={"model": shipped_reference_detector()})
    if not settings.model.is_file():
        raise InvalidConfigError(f"model package {settings.model} does not exist")
    settings.check_bind_security()
    # Verified here (format, checksum, config) so that a bad package is one clear line and exit status 2, not a
    # start-up traceback in every worker.
    read_package(settings.model)
    # Likewise the device: CUDA asked for on a host (or container) that does not see a GPU.
    inference_device(settings.device)
    os.environ.update(settings_environment(settings))
    with _shared_metrics_directory(settings.workers):
        uvicorn.run(
            "service.server:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )


@contextlib.contextmanager
def _shared_metrics_directory(workers: int) -> Iterator[None]:
    """With several workers, a fresh ``PROMETHEUS_MULTIPROC_DIR`` for their metrics (``service.metrics``), removed
    afterwards; the workers, started after this, inherit it. A directory the operator set is used as it is: it must
    be empty when the service starts (prometheus-client's rule)."""
    if workers == 1 or os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        yield
        return
    directory = tempfile.mkdtemp(prefix="caries-mim-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(directory, ignore_errors=True)
