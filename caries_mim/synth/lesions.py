"""Caries lesions as smooth demineralization fields in a tooth's local frame.

Radiographically a lesion is missing mineral: the beam crosses less enamel or dentin, so the spot is darker.
Proximal lesions start at the contact surface just cervical to the contact point as an enamel wedge pointing at
the dentino-enamel junction (DEJ); once through, a second wedge spreads along the DEJ and heads for the pulp.
Occlusal lesions are seen only once they reach dentin, as a broad zone under the fissure enamel.

Depth classes follow the clinical convention (and DENTEX's diagnosis names): ``enamel`` and ``outer_dentin``
lesions are labelled ``caries``; a lesion in the inner third of dentin (next to the pulp) is ``deep_caries``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caries_mim.synth.anatomy import ToothGeometry
from caries_mim.synth.config import SynthConfig

DEPTHS = ("enamel", "outer_dentin", "inner_dentin")
LABELS = ("caries", "deep_caries")

#: Which part of the configured mineral-loss and buccolingual-extent ranges each depth draws from. Contrast is a
#: continuum across depths: enamel lesions are thin, so only their stronger half is drawn (weaker ones would be
#: radiographically invisible, yet labelled); dentin lesions are large and dentin attenuates half as much, so
#: drawing them from the full range makes them glaring dark wedges that no expert needs to look for.
_LOSS_QUANTILES = {"enamel": (0.45, 1.0), "outer_dentin": (0.1, 0.75), "inner_dentin": (0.25, 0.9)}
_EXTENT_QUANTILES = {"enamel": (0.35, 1.0), "outer_dentin": (0.1, 0.7), "inner_dentin": (0.2, 0.85)}

#: Width (mm) of the soft edge of a lesion: demineralization fades over a few pixels, it has no sharp border.
_EDGE_MM = 0.15


@dataclass(frozen=True)
class LesionSpec:
    """One lesion on one tooth, in that tooth's frame (mm).

    Attributes:
        surface: "mesial", "distal" or "occlusal".
        depth: "enamel", "outer_dentin" or "inner_dentin".
        side: +1 or -1, the ``u`` side of a proximal lesion (0 for occlusal lesions).
        center_u: ``u`` of an occlusal lesion's axis (0 for proximal lesions).
        center_v: ``v`` of a proximal lesion's centre on the tooth surface (0 for occlusal lesions).
        half_height: half extent of the lesion along the surface, at the surface.
        enamel_reach: fraction of the enamel thickness penetrated (1 when the lesion reaches dentin).
        dentin_reach: fraction of the DEJ-to-pulp distance penetrated (0 for enamel lesions).
        mineral_loss: fraction of mineral lost at the lesion core.
        buccolingual_mm: extent of the lesion along the beam.
    """

    surface: str
    depth: str
    side: int
    center_u: float
    center_v: float
    half_height: float
    enamel_reach: float
    dentin_reach: float
    mineral_loss: float
    buccolingual_mm: float

    @property
    def label(self) -> str:
        return "deep_caries" if self.depth == "inner_dentin" else "caries"


def _ramp(x: np.ndarray) -> np.ndarray:
    """0 -> 1 across a soft edge of width ``_EDGE_MM`` centred on x = 0."""
    return np.clip(x * np.float32(1.0 / _EDGE_MM) + 0.5, 0.0, 1.0)


def sample_lesion(
    rng: np.random.Generator, geom: ToothGeometry, surface: str, side: int, config: SynthConfig
) -> LesionSpec:
    """Draw depth, size and contrast of a lesion on ``surface`` (``side`` is the proximal ``u`` side)."""
    weights = np.asarray(config.lesion_depth_weights, dtype=np.float64)
    if surface == "occlusal":
        # Occlusal enamel lesions are invisible on radiographs (the beam crosses the whole cusp), so none are drawn.
        weights = weights * np.array([0.0, 1.0, 1.0])
        if weights.sum() == 0:
            weights = np.array([0.0, 1.0, 0.0])
    depth = DEPTHS[int(rng.choice(3, p=weights / weights.sum()))]
    dentin_reach = {"enamel": 0.0, "outer_dentin": rng.uniform(0.15, 0.6), "inner_dentin": rng.uniform(0.7, 0.92)}
    shape = geom.shape
    if surface == "occlusal":
        center_u = rng.uniform(-0.12, 0.12) * shape.crown_width
        center_v = 0.0
        half_height = rng.uniform(0.7, 1.6)
    else:
        center_u = 0.0
        center_v = min(shape.contact_height + rng.uniform(0.3, 1.3), shape.crown_height - 1.2)
        half_height = rng.uniform(0.35, 0.8)
    return LesionSpec(
        surface=surface,
        depth=depth,
        side=side if surface != "occlusal" else 0,
        center_u=float(center_u),
        center_v=float(center_v),
        half_height=float(half_height),
        enamel_reach=float(rng.uniform(0.45, 0.95)) if depth == "enamel" else 1.0,
        dentin_reach=float(dentin_reach[depth]),
        mineral_loss=_draw(rng, config.lesion_mineral_loss, _LOSS_QUANTILES[depth]),
        buccolingual_mm=_draw(rng, config.lesion_buccolingual_mm, _EXTENT_QUANTILES[depth]),
    )


def _draw(rng: np.random.Generator, bounds: tuple[float, float], quantiles: tuple[float, float]) -> float:
    """Uniform draw from the ``quantiles`` (fractions) part of the config range ``bounds``."""
    low, high = bounds
    return float(low + (high - low) * rng.uniform(*quantiles))


def lesion_extent(geom: ToothGeometry, spec: LesionSpec) -> tuple[float, float, float, float]:
    """Local bounding rectangle (u0, u1, v0, v1) in mm that contains the whole lesion, with a margin."""
    shape = geom.shape
    margin = 0.4
    if spec.surface == "occlusal":
        return (
            spec.center_u - 2.0 * spec.half_height - margin,
            spec.center_u + 2.0 * spec.half_height + margin,
            -margin,
            shape.pulp_roof + margin,
        )
    half = float(geom.profile("half", np.asarray([spec.center_v], dtype=np.float32))[0])
    reach = geom.dej_depth(spec.center_v) + geom.dentin_span(spec.center_v) + margin
    height = 2.0 * spec.half_height + margin
    inner = half - reach
    u0, u1 = (inner, half + margin) if spec.side > 0 else (-half - margin, -inner)
    return u0, u1, spec.center_v - height, spec.center_v + height


def demineralization(
    geom: ToothGeometry, spec: LesionSpec, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of the lesion's buccolingual extent that is demineralized, in enamel and in dentin.

    Args:
        u, v: local coordinates (mm), float32 arrays of one shape (h, w).
    Returns:
        (enamel_field, dentin_field): float32 arrays of shape (h, w) in [0, 1]; strongest at the surface where
        the lesion started, fading toward its front.
    """
    if spec.surface == "occlusal":
        return _occlusal(geom, spec, u, v)
    return _proximal(geom, spec, u, v)


def _proximal(geom: ToothGeometry, spec: LesionSpec, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inward = geom.profile("half", v) - spec.side * u
    along = np.abs(v - spec.center_v)
    enamel_thickness = geom.dej_depth(spec.center_v)
    front = max(spec.enamel_reach * enamel_thickness, 0.2)
    relative = np.clip(inward / front, 0.0, 1.0)
    width = spec.half_height * (1.0 - 0.85 * relative)
    enamel = _ramp(width - along) * _ramp(front - inward) * _ramp(inward + 0.3) * (1.0 - 0.45 * relative)
    if spec.dentin_reach <= 0:
        return enamel, np.zeros_like(enamel)
    into = inward - enamel_thickness
    dentin_front = spec.dentin_reach * geom.dentin_span(spec.center_v)
    rel_d = np.clip(into / dentin_front, 0.0, 1.0)
    spread = spec.half_height * (1.1 + 0.5 * spec.dentin_reach)
    dentin_width = spread * (1.0 - rel_d) ** 0.7
    dentin = _ramp(dentin_width - along) * _ramp(dentin_front - into) * _ramp(into + 0.15) * (1.0 - 0.35 * rel_d)
    return enamel, dentin


def _occlusal(geom: ToothGeometry, spec: LesionSpec, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = geom.shape
    dej = geom.occlusal_top(u) + shape.enamel_occlusal
    cu = np.asarray([spec.center_u], dtype=np.float32)
    span = max(float(geom.pulp_roof(cu)[0] - (geom.occlusal_top(cu)[0] + shape.enamel_occlusal)), 0.8)
    depth = spec.dentin_reach * span
    into = v - dej
    lateral = (u - spec.center_u) / spec.half_height
    q = np.square(lateral) + np.square(np.maximum(into, 0.0) / depth)
    dentin = np.clip((1.0 - q) * 4.0, 0.0, 1.0) * _ramp(into + 0.2) * (1.0 - 0.35 * np.clip(into / depth, 0.0, 1.0))
    # A thin demineralized track in the fissure enamel that leads down to the dentin zone.
    enamel = 0.5 * _ramp(0.3 - np.abs(u - spec.center_u)) * _ramp(-into)
    return enamel.astype(np.float32), dentin.astype(np.float32)
