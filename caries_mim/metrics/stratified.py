"""What a clinician asks of a caries detector at its operating point: which lesions does it find, and at what
cost in false alarms.

Lesion-level sensitivity at the package's threshold, split by a per-lesion attribute (depth class: enamel, outer
dentin, inner dentin; conspicuity bin), and false positives per image. Lesions are found with the lesion-level
matching of FROC and the operating-point selection (:mod:`caries_mim.metrics.matching`, IoU 0.1 by default): the
same criterion, so the figures agree with the threshold's own sensitivity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import EvaluatedImage, check_fraction, check_images
from caries_mim.metrics.matching import match_lesions

#: Conspicuity (contrast-to-noise ratio) bin edges: under the synthetic generator's floor, just above it, clear,
#: obvious. A lesion's bin is the last edge at or under its value.
CONSPICUITY_EDGES = (0.0, 5.0, 8.0, 12.0, 20.0)


@dataclass(frozen=True)
class StratumSensitivity:
    """Lesions of one stratum and how many were found. ``sensitivity`` is None when it has no lesion."""

    lesions: int
    found: int

    @property
    def sensitivity(self) -> float | None:
        return self.found / self.lesions if self.lesions else None

    def to_dict(self) -> dict[str, object]:
        return {"lesions": self.lesions, "found": self.found, "sensitivity": self.sensitivity}


@dataclass(frozen=True)
class OperatingPointReport:
    """Figures at one threshold.

    Attributes:
        threshold: detections with score >= this are shown.
        iou_threshold: the least IoU for a detection to find a lesion.
        sensitivity: lesion-level sensitivity over all lesions (None without lesions).
        false_positives_per_image: detections at or above the threshold that found no lesion, per image.
        strata: attribute name -> stratum name -> :class:`StratumSensitivity`, strata in a stable order.
    """

    threshold: float
    iou_threshold: float
    sensitivity: float | None
    false_positives_per_image: float
    strata: dict[str, dict[str, StratumSensitivity]]

    def to_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "iou_threshold": self.iou_threshold,
            "sensitivity": self.sensitivity,
            "false_positives_per_image": self.false_positives_per_image,
            **{
                f"by_{name}": {stratum: value.to_dict() for stratum, value in strata.items()}
                for name, strata in self.strata.items()
            },
        }


def conspicuity_bin(value: float | None) -> str | None:
    """The :data:`CONSPICUITY_EDGES` bin of a conspicuity, e.g. "5-8" or ">=20"; None for no or a bad value."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    edges = CONSPICUITY_EDGES
    for low, high in itertools.pairwise(edges):
        if value < high:
            return f"{low:g}-{high:g}"
    return f">={edges[-1]:g}"


def operating_point_report(
    images: Sequence[EvaluatedImage],
    strata: dict[str, Sequence[Sequence[str | None]]],
    *,
    threshold: float,
    iou_threshold: float = 0.1,
) -> OperatingPointReport:
    """Sensitivity overall and per stratum, and false positives per image, at ``threshold``.

    Args:
        images: ground truth and every detection per image.
        strata: attribute name -> per image, per ground-truth box (in the image's order), the box's stratum, or
            None for a box without that attribute (it counts overall, not in the attribute's strata).
        threshold: the operating threshold in [0, 1].
    Raises:
        InvalidArgumentError: bad images or threshold, or strata whose shape differs from the ground truth.
    """
    check_images(images)
    threshold = check_fraction(threshold, "threshold", allow_zero=True, allow_one=True)
    for name, per_image in strata.items():
        if len(per_image) != len(images) or any(
            len(values) != len(image.gt_boxes) for values, image in zip(per_image, images, strict=False)
        ):
            raise InvalidArgumentError(f"stratum {name!r} must give one value per ground-truth box of every image")
    matches = match_lesions(images, iou_threshold=iou_threshold)
    found = [match.lesion_scores >= threshold for match in matches]  # NaN compares False: not found
    n_lesions = sum(match.n_lesions for match in matches)
    n_found = int(sum(int(flags.sum()) for flags in found))
    false_positives = sum(int((match.fp_scores >= threshold).sum()) for match in matches)
    report = {}
    for name, per_image in strata.items():
        counts: dict[str, list[int]] = {}
        for values, flags in zip(per_image, found, strict=True):
            for value, flag in zip(values, flags, strict=True):
                if value is None:
                    continue
                tally = counts.setdefault(value, [0, 0])
                tally[0] += 1
                tally[1] += int(flag)
        report[name] = {key: StratumSensitivity(*counts[key]) for key in sorted(counts, key=_stratum_order)}
    return OperatingPointReport(
        threshold=threshold,
        iou_threshold=iou_threshold,
        sensitivity=n_found / n_lesions if n_lesions else None,
        false_positives_per_image=false_positives / len(images),
        strata=report,
    )


def _stratum_order(name: str) -> tuple[int, float, str]:
    """Depth classes from the surface inward, conspicuity bins from faint to obvious, anything else by name."""
    depths = ("enamel", "outer_dentin", "inner_dentin")
    if name in depths:
        return (0, depths.index(name), name)
    number = name.lstrip(">=").split("-")[0]
    try:
        return (1, float(number), name)
    except ValueError:
        return (2, 0.0, name)
