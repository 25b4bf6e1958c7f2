"""One synthetic radiograph: draw a scene plan, rasterize tissue path lengths, simulate the detector."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from caries_mim.synth.acquisition import (
    MU_PER_MM,
    AcquisitionParams,
    detect,
    display,
    display_window,
    sample_acquisition,
)
from caries_mim.synth.anatomy import ToothGeometry, tooth_tissues
from caries_mim.synth.config import SynthConfig
from caries_mim.synth.conspicuity import measure_visibility, split_by_floor
from caries_mim.synth.layout import Layout, PlacedTooth, sample_layout
from caries_mim.synth.lesions import LesionSpec, demineralization, lesion_extent, sample_lesion
from caries_mim.synth.restorations import RestorationSpec, restoration_fill, sample_restoration
from caries_mim.synth.tissues import (
    TissueParams,
    bone_path,
    bone_presence,
    sample_tissue_params,
    soft_tissue_path,
    trabecular_density,
)

#: A lesion's box covers the pixels where it removes more than this fraction of its peak attenuation.
BOX_THRESHOLD = 0.2

#: Path lengths are rasterized on a grid this many times coarser than the image and upsampled before the
#: detector model: anatomy is smooth at 0.05-0.08 mm (the PSF blurs finer detail anyway) and it is 4x faster.
#: Noise, blur and quantization are simulated at full resolution.
RENDER_SCALE = 2

#: Lesion sites closer than this to the image border (mm) are not used: a half-visible lesion is unlabelable.
_SITE_MARGIN_MM = 1.5


@dataclass(frozen=True)
class LesionAnnotation:
    """One lesion: ``box`` is (x0, y0, x1, y1) in pixels (pixel edges, x = column), ``tooth`` FDI.

    Attributes:
        box: the lesion's visible extent once measured (see :mod:`caries_mim.synth.conspicuity`), else the extent
            of its demineralization field.
        field_box: the extent of its demineralization field (pixels where it removes more than ``BOX_THRESHOLD``
            of its peak attenuation), whatever a reader can see of it.
        conspicuity: its contrast-to-noise ratio (None before it is measured).
    """

    box: tuple[float, float, float, float]
    label: str
    surface: str
    depth: str
    tooth: int
    field_box: tuple[float, float, float, float] | None = None
    conspicuity: float | None = None


@dataclass(frozen=True)
class SyntheticRadiograph:
    """A rendered radiograph and its ground truth.

    Attributes:
        pixels: uint16 (H, W), 12-bit values 0..4095, bright = more attenuating (MONOCHROME2 sense).
        lesions: one annotation per lesion, in the order of ``boxes`` and ``labels``.
        view: "bitewing" or "periapical".
        spacing_mm: (row, column) pixel spacing at the detector.
        window_center, window_width: a display window over the stored values.
        laterality: "R" or "L" (patient side).
        teeth: FDI numbers of the teeth in the field.
        subthreshold_lesions: lesions drawn and rendered but under the visibility floor: not findings (no reader
            could label them), kept so their effect can be studied.
    """

    pixels: np.ndarray
    lesions: tuple[LesionAnnotation, ...]
    view: str
    spacing_mm: tuple[float, float]
    window_center: int
    window_width: int
    laterality: str
    teeth: tuple[int, ...]
    subthreshold_lesions: tuple[LesionAnnotation, ...] = ()

    @property
    def boxes(self) -> np.ndarray:
        """float32 (N, 4) boxes [x0, y0, x1, y1] in pixels."""
        return np.asarray([lesion.box for lesion in self.lesions], dtype=np.float32).reshape(-1, 4)

    @property
    def labels(self) -> list[str]:
        """ "caries" or "deep_caries" per box."""
        return [lesion.label for lesion in self.lesions]


@dataclass(frozen=True)
class ScenePlan:
    """Every random draw of one image; rasterizing a plan is deterministic."""

    layout: Layout
    lesions: tuple[tuple[int, LesionSpec], ...]
    restorations: tuple[tuple[int, RestorationSpec], ...]
    tissue: TissueParams
    acquisition: AcquisitionParams
    texture_seed: int
    noise_seed: int


class _PixelFrame:
    """Affine maps between pixel coordinates (column j, row i; pixel centres at integers) and scene mm.

    With ``scale`` > 1 the pixels are those of a grid ``scale`` times coarser that covers the image (its
    pixel k spans image pixels scale*k .. scale*k + scale - 1).
    """

    def __init__(self, layout: Layout, scale: int = 1) -> None:
        width, height = layout.size_mm
        c, s = math.cos(layout.rotation), math.sin(layout.rotation)
        sp = layout.spacing * scale
        self.shape = (-(-layout.rows // scale), -(-layout.cols // scale))
        cx, cy = 0.5 * width, 0.5 * height
        # scene = centre + R @ (pixel_mm - centre), pixel_mm = ((j + 0.5) * sp, (i + 0.5) * sp)
        rot = np.array([[c, -s], [s, c]])
        linear = rot * sp
        offset = np.array([cx, cy]) + rot @ (np.array([0.5 * sp, 0.5 * sp]) - np.array([cx, cy]))
        self.to_scene = np.vstack([np.hstack([linear, offset[:, None]]), [0.0, 0.0, 1.0]])
        self.to_pixel = np.linalg.inv(self.to_scene)

    def tooth_matrix(self, tooth: PlacedTooth) -> np.ndarray:
        """3x3 map from (j, i, 1) to (u, v, 1) in the tooth's frame."""
        (ux, uy), (vx, vy) = tooth.axes()
        ox, oy = tooth.origin
        local = np.array([[ux, uy, -(ux * ox + uy * oy)], [vx, vy, -(vx * ox + vy * oy)], [0.0, 0.0, 1.0]])
        return local @ self.to_scene


def _grid(matrix: np.ndarray, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) float32 arrays of shape (rows, cols) from a 3x3 pixel -> local affine map."""
    j = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :]
    i = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
    u = np.float32(matrix[0, 0]) * j + (np.float32(matrix[0, 1]) * i + np.float32(matrix[0, 2]))
    v = np.float32(matrix[1, 0]) * j + (np.float32(matrix[1, 1]) * i + np.float32(matrix[1, 2]))
    return u, v


def _pixel_window(
    matrix: np.ndarray, u0: float, u1: float, v0: float, v1: float, shape: tuple[int, int]
) -> tuple[slice, slice] | None:
    """Pixel slices covering the local rectangle [u0, u1] x [v0, v1], clipped to the image; None if outside."""
    inverse = np.linalg.inv(matrix)
    corners = np.array([[u0, v0, 1.0], [u1, v0, 1.0], [u0, v1, 1.0], [u1, v1, 1.0]]).T
    j, i, _ = inverse @ corners
    c0, c1 = max(math.floor(j.min()), 0), min(math.ceil(j.max()) + 1, shape[1])
    r0, r1 = max(math.floor(i.min()), 0), min(math.ceil(i.max()) + 1, shape[0])
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _lesion_site(geom: ToothGeometry, spec: LesionSpec) -> tuple[float, float]:
    """Local (u, v) of the lesion's surface centre."""
    if spec.surface == "occlusal":
        cu = np.asarray([spec.center_u], dtype=np.float32)
        return spec.center_u, float(geom.occlusal_top(cu)[0]) + geom.shape.enamel_occlusal
    half = float(geom.profile("half", np.asarray([spec.center_v], dtype=np.float32))[0])
    return spec.side * half, spec.center_v


def plan_scene(rng: np.random.Generator, config: SynthConfig) -> ScenePlan:
    """Draw layout, lesions, restorations, tissue and detector parameters for one image."""
    layout = sample_layout(rng, config)
    frame = _PixelFrame(layout)
    width = layout.size_mm[0]

    restorations = []
    for index, tooth in enumerate(layout.teeth):
        if tooth.shape.kind != "canine" and rng.random() < config.restoration_probability:
            restorations.append((index, sample_restoration(rng, ToothGeometry(tooth.shape), config.amalgam_fraction)))
    restored = {index for index, _ in restorations}

    sites = []
    for index, tooth in enumerate(layout.teeth):
        if index in restored or tooth.shape.kind == "canine":
            continue
        sites.extend((index, "mesial" if side == tooth.mesial_side else "distal", side) for side in (-1, 1))
        sites.append((index, "occlusal", 0))
    order = rng.permutation(len(sites))
    wanted = 0
    if rng.random() >= config.lesion_free_fraction:
        wanted = int(rng.integers(config.lesions_per_image[0], config.lesions_per_image[1] + 1))
    occlusal_share = config.occlusal_lesion_fraction
    lesions: list[tuple[int, LesionSpec]] = []
    for site in order:
        if len(lesions) >= wanted:
            break
        index, surface, side = sites[int(site)]
        if (surface == "occlusal") != (rng.random() < occlusal_share):
            continue
        tooth = layout.teeth[index]
        geom = ToothGeometry(tooth.shape)
        spec = sample_lesion(rng, geom, surface, side, config)
        x, y = tooth.point(*_lesion_site(geom, spec))
        j, i, _ = frame.to_pixel @ np.array([x, y, 1.0])
        margin = _SITE_MARGIN_MM / layout.spacing
        if margin <= j <= layout.cols - margin and margin <= i <= layout.rows - margin and 0 < x < width and y > 0:
            lesions.append((index, spec))
    return ScenePlan(
        layout=layout,
        lesions=tuple(lesions),
        restorations=tuple(restorations),
        tissue=sample_tissue_params(rng),
        acquisition=sample_acquisition(rng, config),
        texture_seed=int(rng.integers(2**63)),
        noise_seed=int(rng.integers(2**63)),
    )


@dataclass(frozen=True)
class LesionRaster:
    """What one lesion does to a scene, before the detector sees it.

    Attributes:
        spec_index: index of the lesion in ``ScenePlan.lesions``.
        annotation: its label and attributes, with ``box`` the extent of its demineralization field (pixels where
            it removes more than ``BOX_THRESHOLD`` of its peak attenuation).
        window: (rows, cols) slices of the render grid (``RENDER_SCALE`` coarser than the image) it touches.
        attenuation: float32, the shape of ``window``: the line-integral attenuation it removes there (>= 0).
    """

    spec_index: int
    annotation: LesionAnnotation
    window: tuple[slice, slice]
    attenuation: np.ndarray


@dataclass(frozen=True)
class RasterizedScene:
    """A plan rasterized once, ready to be acquired with any subset of its lesions, with or without noise.

    ``attenuation`` (render grid, float32) includes every lesion; each :class:`LesionRaster` says how to take one
    back out. The conspicuity measurement renders the same scene several times, so the costly rasterization is
    done only once.
    """

    plan: ScenePlan
    attenuation: np.ndarray
    lesions: tuple[LesionRaster, ...]

    def acquire(self, *, omit_lesions: Collection[int] = (), noise: bool = True) -> np.ndarray:
        """Stored uint16 (H, W) pixels of the scene without the lesions whose ``spec_index`` is in ``omit_lesions``.

        With ``noise=False`` the quantum and electronic noise are left out and everything else (gain, blur,
        sharpening, display curve) is identical; with ``noise=True`` the noise field is the same for every subset
        (it is drawn from the plan's seed with a shape that does not depend on the pixels).
        """
        layout = self.plan.layout
        attenuation = self.attenuation
        omitted = [raster for raster in self.lesions if raster.spec_index in set(omit_lesions)]
        if omitted:
            attenuation = attenuation.copy()
            for raster in omitted:
                attenuation[raster.window] += raster.attenuation
        full = (attenuation.shape[1] * RENDER_SCALE, attenuation.shape[0] * RENDER_SCALE)
        upsampled = cv2.resize(attenuation, full, interpolation=cv2.INTER_LINEAR)[: layout.rows, : layout.cols]
        rng = np.random.default_rng(self.plan.noise_seed)
        measured = detect(upsampled, self.plan.acquisition, layout.spacing, rng, noise=noise)
        return display(measured, self.plan.acquisition)


def rasterize(plan: ScenePlan) -> RasterizedScene:
    """Rasterize a plan's tissue path lengths into attenuation on the render grid (lesions included)."""
    layout = plan.layout
    frame = _PixelFrame(layout, RENDER_SCALE)
    shape = frame.shape
    enamel = np.zeros(shape, dtype=np.float32)
    dentin = np.zeros(shape, dtype=np.float32)
    pulp = np.zeros(shape, dtype=np.float32)
    amalgam = np.zeros(shape, dtype=np.float32)
    composite = np.zeros(shape, dtype=np.float32)
    root_gap = np.full(shape, 9.0, dtype=np.float32)
    lesions_by_tooth: dict[int, list[tuple[int, LesionSpec]]] = {}
    for spec_index, (index, spec) in enumerate(plan.lesions):
        lesions_by_tooth.setdefault(index, []).append((spec_index, spec))
    restoration_by_tooth = dict(plan.restorations)

    rasters = []
    bounds = (layout.cols, layout.rows, layout.cols, layout.rows)
    for index, tooth in enumerate(layout.teeth):
        geom = ToothGeometry(tooth.shape)
        matrix = frame.tooth_matrix(tooth)
        half = 0.5 * tooth.shape.crown_width + tooth.shape.root_spread + 1.0
        window = _pixel_window(matrix, -half, half, -0.5, tooth.shape.length + 1.0, shape)
        if window is None:
            continue
        rows, cols = window
        u, v = _grid(matrix, rows, cols)
        tissues = tooth_tissues(geom, u, v)
        restoration = restoration_by_tooth.get(index)
        if restoration is not None:
            target = amalgam if restoration.material == "amalgam" else composite
            _apply_restoration(geom, restoration, u, v, tissues, target[rows, cols])
        for spec_index, spec in lesions_by_tooth.get(index, []):
            applied = _apply_lesion(geom, spec, matrix, window, tissues)
            if applied is None:
                continue
            box, lesion_window, removed = applied
            box = tuple(min(float(RENDER_SCALE * b), limit) for b, limit in zip(box, bounds, strict=True))
            annotation = LesionAnnotation(box, spec.label, spec.surface, spec.depth, tooth.fdi, field_box=box)
            rasters.append(LesionRaster(spec_index, annotation, lesion_window, removed))
        enamel[rows, cols] += tissues.enamel
        dentin[rows, cols] += tissues.dentin
        pulp[rows, cols] += tissues.pulp
        np.minimum(root_gap[rows, cols], tissues.root_gap, out=root_gap[rows, cols])

    x, y = _scene_grid(frame, shape)
    texture_rng = np.random.default_rng(plan.texture_seed)
    presence = bone_presence(layout.crests, x, y)
    density = trabecular_density(texture_rng, shape, layout.spacing * RENDER_SCALE, plan.tissue)
    bone = bone_path(plan.tissue, presence, density, enamel + dentin + pulp, root_gap)
    soft = soft_tissue_path(texture_rng, shape, plan.tissue)
    mu = MU_PER_MM
    attenuation = (
        mu["enamel"] * enamel
        + mu["dentin"] * dentin
        + mu["soft"] * (soft + pulp)
        + mu["bone"] * bone
        + mu["amalgam"] * amalgam
        + mu["composite"] * composite
    )
    return RasterizedScene(plan, attenuation, tuple(rasters))


def render_plan(plan: ScenePlan, *, omit_lesions: Collection[int] = (), noise: bool = True) -> SyntheticRadiograph:
    """Rasterize and acquire a plan. Leaving lesions out (indices into ``plan.lesions``) renders the identical
    image (same noise) without them; ``noise=False`` renders it without quantum and electronic noise.

    Lesion annotations are reported in every case (boxes: the demineralization extent, see
    :class:`LesionRaster`), so renders can be compared region by region. :func:`render_radiograph` is what
    gives boxes of the visible extent and drops what no reader could see.
    """
    scene = rasterize(plan)
    return _radiograph(
        scene, scene.acquire(omit_lesions=omit_lesions, noise=noise), [r.annotation for r in scene.lesions]
    )


def _radiograph(
    scene: RasterizedScene,
    pixels: np.ndarray,
    lesions: Sequence[LesionAnnotation],
    subthreshold: Sequence[LesionAnnotation] = (),
) -> SyntheticRadiograph:
    layout = scene.plan.layout
    center, width = display_window(pixels)
    return SyntheticRadiograph(
        pixels=pixels,
        lesions=tuple(lesions),
        view=layout.view,
        spacing_mm=(layout.spacing, layout.spacing),
        window_center=center,
        window_width=width,
        laterality=layout.laterality,
        teeth=tuple(t.fdi for t in layout.teeth),
        subthreshold_lesions=tuple(subthreshold),
    )


def _scene_grid(frame: _PixelFrame, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scene x, y (mm) of every pixel centre, float32 (H, W) each."""
    return _grid(frame.to_scene, slice(0, shape[0]), slice(0, shape[1]))


def _apply_restoration(
    geom: ToothGeometry, spec: RestorationSpec, u: np.ndarray, v: np.ndarray, tissues, target: np.ndarray
) -> None:
    """Replace enamel and dentin by filling material along the beam; accumulate its path length in ``target``."""
    hard = tissues.enamel + tissues.dentin
    fill = np.minimum(spec.buccolingual_mm * restoration_fill(geom, spec, u, v), 0.8 * hard)
    keep = 1.0 - fill / np.maximum(hard, 1e-3)
    tissues.enamel *= keep
    tissues.dentin *= keep
    target += fill


def _apply_lesion(
    geom: ToothGeometry,
    spec: LesionSpec,
    matrix: np.ndarray,
    window: tuple[slice, slice],
    tissues,
) -> tuple[tuple[float, float, float, float], tuple[slice, slice], np.ndarray] | None:
    """Remove mineral for one lesion; None if it falls outside the tooth's window.

    Returns:
        (box, lesion_window, removed): the box (render-grid pixels) of its demineralization field, the render-grid
        slices it touches and the attenuation it removed there (float32, >= 0).
    """
    sub = _pixel_window(matrix, *lesion_extent(geom, spec), (10**9, 10**9))
    if sub is None:
        return None
    rows, cols = window
    r0, r1 = max(sub[0].start, rows.start), min(sub[0].stop, rows.stop)
    c0, c1 = max(sub[1].start, cols.start), min(sub[1].stop, cols.stop)
    if r0 >= r1 or c0 >= c1:
        return None
    local = (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))
    u, v = _grid(matrix, slice(r0, r1), slice(c0, c1))
    enamel_field, dentin_field = demineralization(geom, spec, u, v)
    enamel = tissues.enamel[local]
    dentin = tissues.dentin[local]
    lost_enamel = spec.mineral_loss * np.minimum(enamel, spec.buccolingual_mm * enamel_field)
    lost_dentin = spec.mineral_loss * np.minimum(dentin, spec.buccolingual_mm * dentin_field)
    contrast = MU_PER_MM["enamel"] * lost_enamel + MU_PER_MM["dentin"] * lost_dentin
    peak = float(contrast.max())
    if peak <= 0:
        return None
    enamel -= lost_enamel
    dentin -= lost_dentin
    # The lost mineral's volume is filled with soft tissue (the lesion is not a void): it still attenuates a little.
    tissues.pulp[local] += lost_enamel + lost_dentin
    removed = (contrast - MU_PER_MM["soft"] * (lost_enamel + lost_dentin)).astype(np.float32)
    ii, jj = np.nonzero(contrast > BOX_THRESHOLD * peak)
    box = (float(c0 + jj.min()), float(r0 + ii.min()), float(c0 + jj.max() + 1), float(r0 + ii.max() + 1))
    return box, (slice(r0, r1), slice(c0, c1)), removed


def render_radiograph(rng: np.random.Generator, config: SynthConfig, *, label: bool = True) -> SyntheticRadiograph:
    """Draw and render one synthetic radiograph.

    Args:
        label: measure each lesion's conspicuity and keep as findings only those at or above
            ``config.visibility_floor``, boxed by their visible extent (:mod:`caries_mim.synth.conspicuity`);
            False skips that (1 + lesions extra noise-free acquisitions) for images whose labels nobody reads,
            and reports every lesion with its field box. The pixels are the same either way.
    Returns:
        A :class:`SyntheticRadiograph`: uint16 (H, W) pixels in 0..4095 (bright = attenuating), about
        900-1300 px on the long side, with its lesion boxes (float32 (N, 4) xyxy), labels and attributes.
    """
    scene = rasterize(plan_scene(rng, config))
    pixels = scene.acquire()
    if not label:
        return _radiograph(scene, pixels, [raster.annotation for raster in scene.lesions])
    measured = measure_visibility(scene, pixels, config.visibility_floor)
    findings, subthreshold = split_by_floor(measured, config.visibility_floor)
    return _radiograph(scene, pixels, findings, subthreshold)
