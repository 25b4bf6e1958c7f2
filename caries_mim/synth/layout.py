"""Where the teeth go: the field of view, the arches and the alveolar crest of a bitewing or periapical view.

Scene coordinates are millimetres on the sensor: x to the right, y down, origin at the top-left corner of the
unrotated field. Images are mounted as if facing the patient, so in a right-side view (ImageLaterality R) the
premolars are on the image right and the molars on the left.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from caries_mim.synth.anatomy import ToothShape, sample_tooth_shape
from caries_mim.synth.config import SynthConfig

BITEWING = "bitewing"
PERIAPICAL = "periapical"

#: Along-axis field a periapical needs to show a whole molar or premolar with its periapical bone (mm).
_PERIAPICAL_FIELD_MM = 27.0


@dataclass(frozen=True)
class PlacedTooth:
    """A tooth in the scene: ``origin`` (x, y mm) is its local (u, v) = (0, 0) point, the occlusal reference.

    ``direction`` is +1 when the tooth points down (lower arch: apex toward +y) and -1 for the upper arch;
    ``mesial_side`` is the sign of ``u`` on the mesial surface.
    """

    fdi: int
    shape: ToothShape
    origin: tuple[float, float]
    direction: int
    tilt: float
    mesial_side: int

    def axes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Unit vectors (e_u, e_v) of the tooth frame in scene coordinates."""
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        return (c, -s), (self.direction * s, self.direction * c)

    def point(self, u: float, v: float) -> tuple[float, float]:
        """Scene position of local point (u, v)."""
        (ux, uy), (vx, vy) = self.axes()
        return self.origin[0] + u * ux + v * vx, self.origin[1] + u * uy + v * vy


@dataclass(frozen=True)
class Crest:
    """The alveolar crest of one arch: bone lies beyond ``y`` in ``direction`` (+1 below, -1 above)."""

    direction: int
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Layout:
    """Everything geometric about one radiograph: size (rows, cols), square ``spacing`` (mm), teeth and bone."""

    view: str
    rows: int
    cols: int
    spacing: float
    rotation: float
    laterality: str
    teeth: tuple[PlacedTooth, ...]
    crests: tuple[Crest, ...]

    @property
    def size_mm(self) -> tuple[float, float]:
        return self.cols * self.spacing, self.rows * self.spacing


def sample_layout(rng: np.random.Generator, config: SynthConfig) -> Layout:
    """Draw view, sensor size, pixel spacing, rotation and tooth positions."""
    view = BITEWING if rng.random() < config.bitewing_fraction else PERIAPICAL
    laterality = "R" if rng.random() < 0.5 else "L"
    long_px = round(rng.uniform(*config.width_px_range))
    long_mm = rng.uniform(*config.sensor_long_side_mm)
    rotation = math.radians(rng.uniform(*config.rotation_deg_range))
    lo, hi = config.spacing_mm_range
    if view == BITEWING:
        cols, rows = long_px, round(long_px / rng.uniform(*config.bitewing_aspect_range))
        spacing = float(np.clip(long_mm / long_px, lo, hi))
        teeth, crests = _bitewing(rng, cols * spacing, rows * spacing, laterality)
    else:
        short_px = round(long_px / rng.uniform(*config.periapical_aspect_range))
        portrait = rng.random() < config.periapical_portrait_fraction
        rows, cols = (long_px, short_px) if portrait else (short_px, long_px)
        spacing = float(np.clip(max(long_mm / long_px, _PERIAPICAL_FIELD_MM / rows), lo, hi))
        teeth, crests = _periapical(rng, cols * spacing, rows * spacing, laterality)
    return Layout(view, rows, cols, spacing, rotation, laterality, teeth, crests)


def _quadrant(upper: bool, laterality: str) -> int:
    if upper:
        return 1 if laterality == "R" else 2
    return 4 if laterality == "R" else 3


def _arch(
    rng: np.random.Generator,
    positions: list[int],
    upper: bool,
    laterality: str,
    start: float,
    width: float,
    occlusal_y,
) -> list[PlacedTooth]:
    """Place consecutive teeth from ``start`` (mm from the anterior image edge) posteriorly along the arch.

    ``occlusal_y(x)`` gives the occlusal plane; each tooth stands perpendicular to it, with a little tilt.
    Neighbours touch, or in about a quarter of contacts overlap by 0.35-0.9 mm.
    """
    anterior_right = laterality == "R"
    direction = -1 if upper else 1
    teeth = []
    edge = start
    for position in positions:
        shape = sample_tooth_shape(rng, position, upper)
        center = edge + 0.5 * shape.crown_width
        # Most contacts touch or leave a hairline gap; about a quarter overlap in projection (beam not through
        # the contact), which shows as a bright double-enamel band.
        overlap = rng.uniform(0.35, 0.9) if rng.random() < 0.25 else rng.uniform(-0.2, 0.15)
        edge = center + 0.5 * shape.crown_width - overlap
        x = width - center if anterior_right else center
        if x < -0.6 * shape.crown_width or x > width + 0.6 * shape.crown_width:
            continue
        slope = (occlusal_y(x + 0.5) - occlusal_y(x - 0.5)) / 1.0
        tilt = -math.atan(slope) + math.radians(rng.uniform(-5.0, 5.0))
        teeth.append(
            PlacedTooth(
                fdi=10 * _quadrant(upper, laterality) + position,
                shape=shape,
                origin=(x, occlusal_y(x)),
                direction=direction,
                tilt=tilt,
                mesial_side=1 if anterior_right else -1,
            )
        )
    return teeth


def _crest(rng: np.random.Generator, teeth: list[PlacedTooth], direction: int, width: float) -> Crest:
    """Scalloped alveolar crest: 1-2 mm apical to each cementoenamel junction, peaking in the interdental septa.

    Control points sit at both necks of every tooth (CEJ + 1-2 mm), over its middle (a further 0.5-1.2 mm down,
    where the thin buccal plate ends) and between neighbours (the septum tip, 0.7-1.4 mm below the CEJs). They
    are joined by cosine segments sampled every 0.2 mm, so peaks and troughs are rounded, not kinked.
    """
    ordered = sorted(teeth, key=lambda t: t.origin[0])
    xs, ys = [], []
    necks = []
    for tooth in ordered:
        cej = tooth.shape.crown_height
        drop = rng.uniform(1.0, 2.0)
        neck = 0.5 * tooth.shape.crown_width * tooth.shape.neck_ratio
        for u, v in ((-neck, cej + drop), (0.0, cej + drop + rng.uniform(0.5, 1.2)), (neck, cej + drop)):
            x, y = tooth.point(u, v)
            xs.append(x)
            ys.append(y)
        necks.append((tooth.point(-neck, cej), tooth.point(neck, cej)))
    for (_, right_neck), (left_neck, _) in itertools.pairwise(sorted(necks, key=lambda n: n[0][0] + n[1][0])):
        a, b = sorted((right_neck, left_neck))
        xs.append(0.5 * (a[0] + b[0]))
        ys.append(0.5 * (a[1] + b[1]) + direction * rng.uniform(0.7, 1.4))
    order = np.argsort(xs)
    knots_x = np.concatenate([[-width], np.asarray(xs)[order], [2 * width]])
    knots_y = np.asarray(ys)[order]
    knots_y = np.concatenate([[knots_y[0]], knots_y, [knots_y[-1]]])
    x = np.arange(-width, 2 * width, 0.2)
    segment = np.clip(np.searchsorted(knots_x, x, side="right") - 1, 0, len(knots_x) - 2)
    t = (x - knots_x[segment]) / (knots_x[segment + 1] - knots_x[segment])
    blend = 0.5 - 0.5 * np.cos(np.pi * t)
    y = knots_y[segment] * (1.0 - blend) + knots_y[segment + 1] * blend
    return Crest(direction=direction, x=x.astype(np.float64), y=y.astype(np.float64))


def _bitewing(
    rng: np.random.Generator, width: float, height: float, laterality: str
) -> tuple[tuple[PlacedTooth, ...], tuple[Crest, ...]]:
    mid = height * (0.5 + rng.uniform(-0.06, 0.06))
    curve = rng.uniform(0.0, 0.006)
    slope = rng.uniform(-0.05, 0.05)
    gap = rng.uniform(-0.9, 0.5)

    def plane(x: float) -> float:
        dx = x - 0.5 * width
        return mid + curve * dx * dx + slope * dx

    lower_start = rng.uniform(-4.0, 2.0)
    upper_start = lower_start + rng.uniform(2.5, 4.0)
    lower = _arch(rng, [3, 4, 5, 6, 7, 8], False, laterality, lower_start, width, lambda x: plane(x) + 0.5 * gap)
    upper = _arch(rng, [3, 4, 5, 6, 7, 8], True, laterality, upper_start, width, lambda x: plane(x) - 0.5 * gap)
    crests = (_crest(rng, lower, 1, width), _crest(rng, upper, -1, width))
    return tuple(lower + upper), crests


def _periapical(
    rng: np.random.Generator, width: float, height: float, laterality: str
) -> tuple[tuple[PlacedTooth, ...], tuple[Crest, ...]]:
    upper = rng.random() < 0.5
    margin = height * rng.uniform(0.05, 0.12)
    level = height - margin if upper else margin
    slope = rng.uniform(-0.06, 0.06)

    def plane(x: float) -> float:
        return level + slope * (x - 0.5 * width)

    center_position = int(rng.choice([4, 5, 6, 7], p=[0.2, 0.3, 0.3, 0.2]))
    positions = [p for p in range(center_position - 2, center_position + 3) if 3 <= p <= 8]
    # Put the centre tooth near the middle of the field: its anterior edge sits half a tooth before the middle.
    before = sum(7.0 if p < 6 else 10.0 for p in positions if p < center_position)
    start = 0.5 * width - before - 4.5 + rng.uniform(-1.5, 1.5)
    teeth = _arch(rng, positions, upper, laterality, start, width, plane)
    return tuple(teeth), (_crest(rng, teeth, -1 if upper else 1, width),)
