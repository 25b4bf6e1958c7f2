"""Small helpers the tests and benchmarks share for reading a running service: Prometheus samples, and waiting
for a condition without sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def sample(metrics_text: str, name: str, *labels: str) -> float:
    """The value of the sample ``name{...}`` whose labels include every one of ``labels`` (0 if none)."""
    for line in metrics_text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def eventually(condition: Callable[[], _T], timeout_s: float = 10.0, interval_s: float = 0.05) -> _T:
    """Poll ``condition`` until it is truthy or ``timeout_s`` has passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return value
