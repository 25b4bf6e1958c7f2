"""Structured JSON logs: one object per line on stderr, with the request id and, never, a patient identifier.

Request fields are passed with ``extra={"fields": {...}}``; DICOM UIDs appear only hashed
(:func:`caries_mim.io.radiograph.hash_uid`) and file names, patient names or header text are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

LOGGER_NAME = "caries_mim.service"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which worker, when there are several
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            # Server-side failures keep their traceback in the operator's log (never in a response).
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the object at configuration time), so
    a redirected stderr (pytest's capture, a supervisor's wrapper) still gets every line."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def silence_header_text() -> None:
    """Keep pydicom's and highdicom's remarks about a file out of the logs and off stderr.

    pydicom reports a malformed element both as a ``UserWarning`` and on its logger, quoting the value, which can
    be a patient's name; highdicom warns about a person name without a caret quoting it, and logs the UIDs of the
    images it references. The request that carried the file gets its error in the response instead. (Filtering by
    module, process-wide: ``warnings.catch_warnings`` is not thread-safe, and reads run in a thread pool.)
    """
    for library in ("pydicom", "highdicom"):
        warnings.filterwarnings("ignore", module=rf"{library}(\..*)?$")
        logging.getLogger(library).setLevel(logging.CRITICAL)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the service's logger (idempotent: a second call replaces the handler)."""
    silence_header_text()
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "caries_mim_json", False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    handler.caries_mim_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    # Not also through the root logger: its handler (the CLI's basicConfig) would print every line twice.
    logger.propagate = False
