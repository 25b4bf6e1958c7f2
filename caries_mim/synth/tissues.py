"""Alveolar bone (trabecular texture, crest, lamina dura) and soft tissue as path-length maps (mm)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from caries_mim.synth.layout import Crest


@dataclass(frozen=True)
class TissueParams:
    """Per-image tissue draws.

    Attributes:
        bone_mm: buccolingual width of the alveolar process (path length through bone where no root is).
        trabecular_mm: typical size of the marrow spaces between trabeculae (their mix spans 0.5-1.5 mm).
        marrow_contrast: fraction of the bone density missing at the centre of a marrow space.
        soft_mm: mean soft-tissue path (cheeks, tongue, gingiva) everywhere in the field.
        soft_variation_mm: amplitude of its smooth variation.
        lamina_mm: extra cortical path at the socket wall (lamina dura); the PDL space removes a little less.
    """

    bone_mm: float
    trabecular_mm: float
    marrow_contrast: float
    soft_mm: float
    soft_variation_mm: float
    lamina_mm: float


def sample_tissue_params(rng: np.random.Generator) -> TissueParams:
    return TissueParams(
        bone_mm=float(rng.uniform(8.0, 12.0)),
        trabecular_mm=float(rng.uniform(0.6, 1.0)),
        marrow_contrast=float(rng.uniform(0.1, 0.2)),
        soft_mm=float(rng.uniform(14.0, 24.0)),
        soft_variation_mm=float(rng.uniform(2.0, 6.0)),
        lamina_mm=float(rng.uniform(0.8, 1.8)),
    )


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 4) -> np.ndarray:
    """Smooth random field of ``shape`` (h, w), zero mean and roughly unit amplitude (float32).

    A coarse grid of ``cells`` normal draws per side upsampled with bicubic interpolation: cheap, and without
    the ringing a large Gaussian kernel would cost.
    """
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _band(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance band-pass noise (h, w float32) whose blobs are about ``2 * sigma`` px across."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    band = cv2.GaussianBlur(noise, (0, 0), sigma) - cv2.GaussianBlur(noise, (0, 0), 2.5 * sigma)
    return band * np.float32(1.0 / (float(band.std()) + 1e-6))


def trabecular_density(rng: np.random.Generator, shape: tuple[int, int], spacing: float, params: TissueParams):
    """Bone density factor in about [0.65, 0.95] (h, w float32): marrow spaces inside a trabecular network.

    Real cancellous bone projects as a low-contrast granular/reticular pattern: many superimposed marrow spaces
    of 0.5-1.5 mm separated by thin irregular trabeculae. Marrow spaces are the soft-thresholded peaks of two
    band-pass octaves (``trabecular_mm`` and twice that), so they are rounded holes of mixed size rather than
    a maze of lines; a fine octave adds grain and a smooth field varies the density regionally. The pattern is
    smooth at 0.1 mm, so it is built on a grid 2x coarser than ``shape`` (whose pixels are ``spacing`` mm) and
    upsampled, which makes it about 4x cheaper.
    """
    small = (max(shape[0] // 2, 4), max(shape[1] // 2, 4))
    sigma = 0.4 * params.trabecular_mm / (2.0 * spacing)
    coarse = _band(rng, small, 2.0 * sigma)
    medium = _band(rng, small, sigma)
    field = 0.55 * coarse + 0.75 * medium
    marrow = np.clip((field - 0.1) * np.float32(1.0 / 1.2), 0.0, 1.0)
    grain = cv2.GaussianBlur(rng.standard_normal(small, dtype=np.float32), (0, 0), max(0.5 * sigma, 0.7))
    regional = smooth_field(rng, small, 5)
    density = 0.88 - params.marrow_contrast * marrow + 0.3 * grain + 0.05 * regional
    return cv2.resize(density, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def bone_presence(crests: tuple[Crest, ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0 coronal to the alveolar crest, rising over ~0.8 mm to 1 inside the bone (rounded crest), (h, w)."""
    presence = np.zeros(x.shape, dtype=np.float32)
    for crest in crests:
        depth = crest.direction * (y - np.interp(x, crest.x, crest.y).astype(np.float32))
        ramp = np.clip(depth * np.float32(1.0 / 0.8), 0.0, 1.0)
        presence = np.maximum(presence, np.sqrt(ramp * (2.0 - ramp)))
    return presence


def bone_path(
    params: TissueParams, presence: np.ndarray, density: np.ndarray, tooth_path: np.ndarray, root_gap: np.ndarray
) -> np.ndarray:
    """Path length through bone (mm, (h, w) float32).

    Roots displace bone (the beam crosses root instead), leaving the buccal and lingual plates. Around each
    root the periodontal ligament space is a thin dark line and the lamina dura a thin bright one. The
    crestal cortex is a bright lamina about 0.15-0.5 mm under the crest (as thick as the lamina dura it joins).
    """
    process = np.maximum(params.bone_mm - tooth_path, 0.25 * params.bone_mm)
    pdl = np.exp(-np.square((root_gap - 0.1) * np.float32(1.0 / 0.09)))
    lamina = np.exp(-np.square((root_gap - 0.32) * np.float32(1.0 / 0.13)))
    crest_rim = np.exp(-np.square((presence - 0.75) * np.float32(1.0 / 0.25)))
    socket = params.lamina_mm * (lamina - 0.8 * pdl + 1.2 * crest_rim)
    return presence * np.maximum(process * density + socket, 0.0)


def soft_tissue_path(rng: np.random.Generator, shape: tuple[int, int], params: TissueParams) -> np.ndarray:
    """Cheeks and tongue: a smooth, everywhere-present path length (mm, (h, w) float32)."""
    return params.soft_mm + params.soft_variation_mm * smooth_field(rng, shape, 3)
