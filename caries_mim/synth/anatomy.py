"""Posterior tooth anatomy as buccolingual path-length (thickness) maps.

A tooth lives in its own frame: ``u`` (mm) runs mesiodistally across the tooth with 0 on its long axis, ``v`` (mm)
runs from the occlusal surface (v = 0 at the cusp tips) toward the apex. Every tissue is a stack of rounded
bodies: at a given ``v`` the beam crosses an elliptical cross-section, so the path length at ``u`` is
``T(v) * sqrt(1 - (u / half_width(v))**2)``. That gives the smooth falloff at tooth edges that real projections
have (a flat binary mask looks like a cut-out), and lets overlapping teeth add up physically.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: FDI tooth position (last digit) -> kind. 3 is the canine, 4-5 premolars, 6-8 molars.
KIND_BY_POSITION = {3: "canine", 4: "premolar", 5: "premolar", 6: "molar", 7: "molar", 8: "molar"}

_PROFILE_SAMPLES = 384


@dataclass(frozen=True)
class ToothShape:
    """Dimensions of one tooth in mm (ranges from dental anatomy texts, jittered per tooth).

    ``roots`` counts the roots seen side by side in a projection; upper molars add a palatal root that is
    superimposed on the middle of the tooth (``palatal_root``).
    """

    kind: str
    upper: bool
    crown_width: float
    crown_height: float
    neck_ratio: float
    contact_height: float
    thickness: float
    enamel_occlusal: float
    enamel_lateral: float
    cusp_depth: float
    root_length: float
    roots: int
    palatal_root: bool
    root_spread: float
    pulp_roof: float
    horn_height: float

    @property
    def length(self) -> float:
        return self.crown_height + self.root_length


def sample_tooth_shape(rng: np.random.Generator, position: int, upper: bool) -> ToothShape:
    """Draw a tooth of FDI position 3-8 (canine, premolars, molars) with natural size variation."""
    kind = KIND_BY_POSITION[position]
    jitter = rng.uniform(0.92, 1.08)
    if kind == "molar":
        width, height, thickness, root = 10.2 - 0.5 * (position - 6), 7.0, 10.5, 12.5
    elif kind == "premolar":
        width, height, thickness, root = 7.0, 7.3, 8.5, 14.0
    else:
        width, height, thickness, root = 7.5, 10.0, 7.5, 16.0
    crown_height = height * rng.uniform(0.93, 1.07)
    return ToothShape(
        kind=kind,
        upper=upper,
        crown_width=width * jitter,
        crown_height=crown_height,
        neck_ratio=rng.uniform(0.68, 0.76),
        contact_height=crown_height * rng.uniform(0.2, 0.3),
        thickness=thickness * rng.uniform(0.92, 1.08),
        enamel_occlusal=rng.uniform(1.6, 2.3),
        enamel_lateral=rng.uniform(1.0, 1.4),
        cusp_depth={"molar": rng.uniform(0.7, 1.3), "premolar": rng.uniform(1.0, 1.6), "canine": 2.2}[kind],
        root_length=root * rng.uniform(0.9, 1.1),
        roots=2 if kind == "molar" else 1,
        palatal_root=kind == "molar" and upper,
        root_spread=rng.uniform(0.3, 1.6),
        pulp_roof=crown_height * rng.uniform(0.5, 0.62),
        horn_height=rng.uniform(0.8, 1.6),
    )


def _rounded_cap(distance: np.ndarray, radius: float) -> np.ndarray:
    """0 at a surface, rising like a circular arc to 1 at ``radius`` mm inside it (a rounded edge profile)."""
    x = np.clip(distance * np.float32(1.0 / radius), 0.0, 1.0)
    return np.sqrt(x * (2.0 - x))


def _ellipse(offset: np.ndarray, half_width: np.ndarray, thickness: np.ndarray) -> np.ndarray:
    """Path length through an elliptical cross-section of the given half width and full thickness."""
    r2 = np.square(offset / np.maximum(half_width, 1e-3))
    return thickness * np.sqrt(np.clip(1.0 - r2, 0.0, None))


class ToothGeometry:
    """Profiles of one tooth (half widths, thicknesses) as functions of ``u`` and ``v``, all in mm."""

    def __init__(self, shape: ToothShape) -> None:
        self.shape = shape
        s = shape
        self.neck_half = 0.5 * s.crown_width * s.neck_ratio
        self.trunk_end = s.crown_height + (3.0 if s.kind == "molar" else s.root_length)
        v = np.linspace(0.0, s.length, _PROFILE_SAMPLES)
        self._v = v
        half = 0.5 * s.crown_width
        rise = np.clip(v / s.contact_height, 0.0, 1.0)
        fall = np.clip((v - s.contact_height) / (s.crown_height - s.contact_height), 0.0, 1.0)
        crown = np.where(
            v <= s.contact_height,
            half * (0.84 + 0.16 * np.sin(0.5 * np.pi * rise)),
            self.neck_half + (half - self.neck_half) * np.cos(0.5 * np.pi * fall) ** 1.3,
        )
        root_s = np.clip((v - s.crown_height) / s.root_length, 0.0, 1.0)
        if s.kind == "molar":
            trunk_s = np.clip((v - s.crown_height) / (self.trunk_end - s.crown_height), 0.0, 1.0)
            root_half = self.neck_half * (1.0 - 0.12 * trunk_s)
        else:
            root_half = 0.3 + (self.neck_half - 0.3) * (1.0 - root_s) ** 0.75
        self._half = np.where(v <= s.crown_height, crown, root_half)
        # Enamel is thickest at the contact height and runs out to a knife edge at the cementoenamel junction.
        self._enamel = s.enamel_lateral * np.clip((s.crown_height - v) / (s.crown_height - s.contact_height), 0.0, 1.0)
        self._enamel = np.minimum(self._enamel, s.enamel_lateral) ** 0.8 * s.enamel_lateral**0.2
        bl = np.where(v <= s.crown_height, 1.0 - 0.12 * (v / s.crown_height) ** 2, 0.88 * (1.0 - root_s) ** 0.6)
        self._thick = s.thickness * bl
        # (1, samples) float32 images, the layout cv2.remap reads in :meth:`profile`.
        self._half, self._enamel, self._thick = (
            np.asarray(t, dtype=np.float32)[None, :] for t in (self._half, self._enamel, self._thick)
        )
        self.root_centers = self._root_offsets()

    def _root_offsets(self) -> list[float]:
        """Mesiodistal offsets (at the furcation) of the separate roots of a molar."""
        if self.shape.roots < 2:
            return []
        offset = self.neck_half * 0.55
        return [-offset, offset]

    def profile(self, name: str, v: np.ndarray) -> np.ndarray:
        """Profile ``name`` ("half", "enamel" or "thick", mm) at ``v`` (float32, any shape), clamped at the ends.

        A linear lookup on the uniform ``v`` table through ``cv2.remap``: 5x faster than ``np.interp``'s search.
        """
        table = {"half": self._half, "enamel": self._enamel, "thick": self._thick}[name]
        position = (np.asarray(v, dtype=np.float32) * np.float32((_PROFILE_SAMPLES - 1) / self.shape.length)).reshape(
            1 if v.ndim < 2 else v.shape[0], -1
        )
        looked_up = cv2.remap(
            table, position, np.zeros_like(position), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return looked_up.reshape(v.shape)

    def occlusal_top(self, u: np.ndarray) -> np.ndarray:
        """v of the occlusal outline at ``u``: 0 at cusp tips, deeper at fossae and marginal ridges."""
        s = self.shape
        half = 0.5 * s.crown_width
        if s.kind == "molar":
            tips = np.float32(0.25 * s.crown_width)
            sigma = np.float32(0.26 * s.crown_width)
            bump = np.exp(-np.square((np.abs(u) - tips) / sigma))
            return s.cusp_depth * (1.0 - bump)
        if s.kind == "premolar":
            # Buccal and lingual cusps superimpose near the axis; marginal ridges round off mesially and distally,
            # so the outline is a low double crest rather than a bullet tip.
            tips = np.float32(0.16 * s.crown_width)
            bump = np.exp(-np.square((np.abs(u) - tips) / np.float32(0.3 * s.crown_width)))
            return 0.6 * s.cusp_depth * (1.0 - bump) + 0.5 * s.cusp_depth * np.square(u / half)
        return s.cusp_depth * np.minimum(np.square(u / half) + 0.4 * np.abs(u) / half, 1.3)

    def pulp_roof(self, u: np.ndarray) -> np.ndarray:
        """v of the pulp chamber roof; pulp horns rise under the cusps."""
        s = self.shape
        if s.kind == "molar":
            tips = np.float32(0.11 * s.crown_width)
            horns = np.exp(-np.square((np.abs(u) - tips) / np.float32(0.5)))
        else:
            horns = np.exp(-np.square(u / np.float32(0.8)))
        return s.pulp_roof - s.horn_height * horns

    def pulp_half_width(self, v: np.ndarray, half: np.ndarray, enamel: np.ndarray) -> np.ndarray:
        """Half width of the pulp at ``v`` (chamber in the crown, narrow canal in a single root).

        ``half`` and ``enamel`` are this tooth's profiles already evaluated at ``v`` (they are costly).
        """
        s = self.shape
        chamber = 0.34 * (half - enamel)
        if s.kind == "molar":
            return chamber
        canal = 0.1 + 0.1 * half
        blend = np.clip((v - s.crown_height) / 2.0, 0.0, 1.0)
        return chamber * (1.0 - blend) + canal * blend

    def dej_depth(self, v: float) -> float:
        """Lateral enamel thickness (mm) at height ``v``: where the dentino-enamel junction lies."""
        return float(self.profile("enamel", np.asarray([v], dtype=np.float32))[0])

    def dentin_span(self, v: float) -> float:
        """Lateral dentin thickness (mm) from the DEJ to the pulp at height ``v`` (proximal lesion depth scale)."""
        vv = np.asarray([v], dtype=np.float32)
        dentin_half = float(self.profile("half", vv)[0] - self.profile("enamel", vv)[0])
        roof = float(np.min(self.pulp_roof(np.linspace(-1, 1, 9, dtype=np.float32))))
        half, enamel = self.profile("half", vv), self.profile("enamel", vv)
        pulp = float(self.pulp_half_width(vv, half, enamel)[0]) if v >= roof else 0.15 * dentin_half
        return max(dentin_half - pulp, 0.5)


@dataclass
class ToothTissues:
    """Path lengths (mm) through one tooth on a local grid; all arrays share the grid's shape (h, w).

    ``root_gap`` is the approximate distance (mm) outside the nearest root surface (negative inside a root), used
    to draw the periodontal ligament space and lamina dura; it is large away from roots.
    """

    enamel: np.ndarray
    dentin: np.ndarray
    pulp: np.ndarray
    root_gap: np.ndarray


def tooth_tissues(geom: ToothGeometry, u: np.ndarray, v: np.ndarray) -> ToothTissues:
    """Enamel, dentin and pulp path lengths (mm, float32, shape of ``u``) of one tooth on its local grid."""
    s = geom.shape
    half = geom.profile("half", v)
    thick = geom.profile("thick", v)
    enamel_lat = geom.profile("enamel", v)
    top = geom.occlusal_top(u)
    crown_zone = v <= s.crown_height

    body_end = _rounded_cap(geom.trunk_end - v, 1.2 if s.kind == "molar" else 0.6)
    outer = _ellipse(u, half, thick) * _rounded_cap(v - top, 1.3) * body_end
    dentin_half = np.where(crown_zone, half - enamel_lat, half)
    dentin_thick = np.where(crown_zone, thick - 2.0 * enamel_lat, thick)
    core = _ellipse(u, dentin_half, dentin_thick) * _rounded_cap(v - top - s.enamel_occlusal, 1.0) * body_end
    enamel = np.maximum(outer - core, 0.0)
    dentin = core
    root_gap = np.where(v > s.crown_height, _root_gap(u, half, v, s.length), np.float32(9.0))
    if s.kind == "molar":
        dentin, root_gap = _add_molar_roots(geom, u, v, dentin, root_gap)

    pulp_half = geom.pulp_half_width(v, half, enamel_lat)
    roof = geom.pulp_roof(u)
    if s.kind == "molar":
        floor = _rounded_cap(s.crown_height + 0.8 - v, 1.2)
        pulp = _ellipse(u, pulp_half, 0.38 * thick) * floor
        for offset, factor in _molar_root_axes(geom):
            root_s = np.clip((v - s.crown_height) / s.root_length, 0.0, 1.0)
            axis = offset + factor * root_s**1.5
            canal_half = 0.12 + 0.14 * (1.0 - root_s)
            canal = _ellipse(u - axis, canal_half, 0.9 * (1.0 - root_s) + 0.2)
            canal = canal * _rounded_cap(v - s.crown_height - 0.5, 0.6) * _rounded_cap(geom.shape.length - 0.6 - v, 0.5)
            pulp = np.maximum(pulp, canal)
    else:
        pulp_thick = np.where(v <= s.crown_height + 1.0, 0.38 * thick, 0.25 * thick + 0.3)
        pulp = _ellipse(u, pulp_half, pulp_thick) * _rounded_cap(s.length - 0.5 - v, 0.5)
    pulp = pulp * _rounded_cap(v - roof, 1.0)
    pulp = np.minimum(pulp, 0.9 * dentin)
    return ToothTissues(enamel=enamel, dentin=dentin - pulp, pulp=pulp, root_gap=root_gap)


def _root_gap(offset: np.ndarray, half: np.ndarray, v: np.ndarray, apex: float) -> np.ndarray:
    """Approximate distance (mm) outside a root's surface, closing around the apex in a half circle."""
    half = np.maximum(half, 0.3)
    beyond = np.maximum(v - (apex - 0.4), 0.0) * np.float32(1.0 / 0.4)
    radius = np.sqrt(np.square(offset / half) + np.square(beyond))
    return (radius - 1.0) * half


def _molar_root_axes(geom: ToothGeometry) -> list[tuple[float, float]]:
    """(offset at the furcation, extra divergence at the apex) of each molar root axis, palatal root last."""
    spread = geom.shape.root_spread
    axes = [(c, np.sign(c) * spread) for c in geom.root_centers]
    if geom.shape.palatal_root:
        axes.append((0.0, 0.0))
    return axes


def _add_molar_roots(
    geom: ToothGeometry, u: np.ndarray, v: np.ndarray, dentin: np.ndarray, root_gap: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Union (max) of the root bodies with the crown and root trunk; roots start inside the trunk."""
    s = geom.shape
    root_s = np.clip((v - s.crown_height) / s.root_length, 0.0, 1.0)
    in_root = (v > s.crown_height).astype(np.float32)
    tip = _rounded_cap(s.length - v, 0.8) * in_root
    for index, (offset, factor) in enumerate(_molar_root_axes(geom)):
        palatal = index == 2
        axis = offset + factor * root_s**1.5
        start_half = geom.neck_half * (0.42 if not palatal else 0.35)
        half = 0.3 + (start_half - 0.3) * (1.0 - root_s) ** 0.8
        thick = s.thickness * (0.7 if not palatal else 0.45) * (1.0 - root_s) ** 0.5 + 0.4
        length_cap = tip if not palatal else _rounded_cap(s.length - 1.0 - v, 0.8) * in_root
        body = _ellipse(u - axis, half, thick) * length_cap
        dentin = np.maximum(dentin, body)
        end = s.length - (1.0 if palatal else 0.0)
        root_gap = np.minimum(root_gap, np.where(in_root > 0, _root_gap(u - axis, half, v, end), np.float32(9.0)))
    return dentin, root_gap
