"""The loop the gateway's background threads share: do one unit of work after another until told to stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def repeat_until_stopped(
    step: Callable[[], object | None], stop: threading.Event, *, name: str, idle_s: float, error_pause_s: float
) -> None:
    """Call ``step`` until ``stop`` is set: after a step that found nothing to do (returned None) wait ``idle_s``;
    after one that raised, log the error's type (never its text, which may quote a header) and wait
    ``error_pause_s``. The thread outlives any one failure (a full disk, a database error)."""
    while not stop.is_set():
        try:
            done = step()
        except Exception as exc:  # the loop must outlive any one failure
            log.error("%s: %s; retrying in %.0f s", name, type(exc).__name__, error_pause_s)
            stop.wait(error_pause_s)
            continue
        if done is None:
            stop.wait(idle_s)
