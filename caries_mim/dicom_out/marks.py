"""What the marking result objects draw, the same in both: the presentation state has a viewer draw it over the
original (:mod:`caries_mim.dicom_out.presentation_state`), the Secondary Capture burns it into a copy
(:mod:`caries_mim.dicom_out.secondary_capture`).

Each finding at the operating threshold is marked by its box, clipped to the image (:func:`mark_box`); one summary
line says what the marks are, and that there are none when there are none (:func:`summary_text`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from caries_mim.errors import InvalidArgumentError

if TYPE_CHECKING:
    from caries_mim.inference import Finding


def checked_finding(finding: Finding, number: int) -> tuple[float, tuple[float, float, float, float]]:
    """Finding ``number``'s score and box ``(x0, y0, x1, y1)`` as floats, checked before they go into a DICOM object.

    Raises:
        InvalidArgumentError: a non-finite or inverted box, or a score outside [0, 1].
    """
    score = float(finding.score)
    if not 0.0 <= score <= 1.0:  # also rejects NaN
        raise InvalidArgumentError(f"finding {number} has a score of {score}, outside [0, 1]")
    x0, y0, x1, y1 = (float(value) for value in finding.box)
    if not all(math.isfinite(value) for value in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise InvalidArgumentError(f"finding {number} has an invalid box {finding.box}")
    return score, (x0, y0, x1, y1)


def mark_box(finding: Finding, number: int, rows: int, columns: int) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` to mark finding ``number`` with on a ``rows`` x ``columns`` image: its own,
    clipped to the image.

    Raises:
        InvalidArgumentError: a non-finite or inverted box, or a score outside [0, 1].
    """
    _, (x0, y0, x1, y1) = checked_finding(finding, number)
    return (
        min(max(x0, 0.0), columns),
        min(max(y0, 0.0), rows),
        min(max(x1, 0.0), columns),
        min(max(y1, 0.0), rows),
    )


def summary_text(algorithm_name: str, algorithm_version: str, marks: int, threshold: float) -> str:
    """The one line that tells a reader what the marks are, also when there are none."""
    found = f"{marks} caries mark{'s' if marks != 1 else ''}" if marks else "no caries mark"
    return (
        f"{algorithm_name} {algorithm_version}: {found} at threshold {threshold:.2f}. "
        "CAD marks, not for diagnosis alone."
    )
