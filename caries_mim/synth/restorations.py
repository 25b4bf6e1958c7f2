"""Restorations: the bright, sharp-edged distractors of real bitewings.

Amalgam attenuates far more than enamel (it saturates the detector); composite is moderately radiopaque.
Both replace tooth tissue, so the restoration's path length is taken out of enamel and dentin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caries_mim.synth.anatomy import ToothGeometry

#: Edge softness (mm): machined cavity walls give edges about one pixel wide.
_EDGE_MM = 0.03


@dataclass(frozen=True)
class RestorationSpec:
    """A class I (occlusal) or class II (occlusal + one proximal box) restoration in the tooth frame (mm).

    Attributes:
        material: "amalgam" or "composite".
        side: 0 for an occlusal restoration, +1 / -1 for a box that opens on that proximal ``u`` side.
        half_width: half width of the occlusal part.
        floor_depth: depth of the occlusal floor below the occlusal outline.
        box_width: mesiodistal width of the proximal box.
        box_floor_v: depth of the gingival floor of the proximal box.
        buccolingual_mm: extent of the filling along the beam.
    """

    material: str
    side: int
    half_width: float
    floor_depth: float
    box_width: float
    box_floor_v: float
    buccolingual_mm: float


def sample_restoration(rng: np.random.Generator, geom: ToothGeometry, amalgam_fraction: float) -> RestorationSpec:
    shape = geom.shape
    return RestorationSpec(
        material="amalgam" if rng.random() < amalgam_fraction else "composite",
        side=int(rng.choice([-1, 0, 1])),
        half_width=float(rng.uniform(0.12, 0.22) * shape.crown_width),
        floor_depth=float(rng.uniform(1.6, 2.6)),
        box_width=float(rng.uniform(1.5, 2.6)),
        box_floor_v=float(shape.contact_height + rng.uniform(0.8, 1.8)),
        buccolingual_mm=float(rng.uniform(2.5, 4.5)),
    )


def restoration_fill(geom: ToothGeometry, spec: RestorationSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fraction (0..1) of the filling's buccolingual extent present at each local point, float32, shape of ``u``."""

    def edge(x: np.ndarray) -> np.ndarray:
        return np.clip(x * np.float32(1.0 / _EDGE_MM) + 0.5, 0.0, 1.0)

    # Rounded cavity floor: the preparation is deepest in the middle of its width.
    lateral = np.clip(np.abs(u) / spec.half_width, 0.0, 1.0)
    top = geom.occlusal_top(u)
    floor = top + spec.floor_depth - 0.5 * np.square(lateral)
    fill = edge(spec.half_width - np.abs(u)) * edge(floor - v) * edge(v - top + 0.3)
    if spec.side != 0:
        # The proximal box runs from inside the occlusal part out through the contact surface; the tooth
        # outline clips it where the caller intersects the fill with the tooth's own thickness.
        inner = 0.5 * geom.shape.crown_width - spec.box_width
        box = edge(spec.side * u - inner) * edge(spec.box_floor_v - v) * edge(v - top + 0.3)
        fill = np.maximum(fill, box)
    return fill.astype(np.float32)
