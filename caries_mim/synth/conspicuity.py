"""How visible each synthetic lesion is, and which ones a reader could label.

Graders label what is radiographically visible. A lesion drawn by the generator can be too faint or too small to
stand out of the detector noise; labelling it would ask a model to find what no reader can see. So each lesion's
conspicuity is measured on the rendered image itself:

- **contrast**: the same scene is acquired without quantum and electronic noise twice, with and without that one
  lesion (every other draw identical); their difference ``D`` (stored display values, >= 0 where the lesion makes
  the image darker) is the lesion's signal as the display shows it, after blur, sharpening and the display curve.
  Its *core* is where ``D`` is at least half its peak; the contrast ``C`` is the mean of ``D`` over the core.
- **noise**: the noise field is the noisy image minus the noise-free one; ``sigma`` is its standard deviation
  around the lesion (its field box grown by 1 mm), in the same stored values. Quantum noise depends on the local
  exposure, so it is measured where the lesion is.
- **conspicuity** = ``C / sigma``, the lesion's contrast-to-noise ratio (CNR) per pixel, the usual radiographic
  definition. It is deliberately the pixel CNR and not an area-integrated (Rose) signal-to-noise ratio: at native
  resolution a lesion's core spans hundreds of pixels, so a Rose SNR puts every drawn lesion far above any
  threshold while the lesion's appearance in noise is what decides whether a reader sees it. The floor the
  generator uses (``SynthConfig.visibility_floor``) and the figure that justifies it are in
  ``docs/synthetic_data.md``.

A lesion at or above the floor is a finding; its box is its *visible extent*: the pixels where ``D`` is at least
``floor * sigma`` (where its own contrast stands out of the noise by the floor). A lesion
under the floor stays in the image (the drawn population does not change) and is reported apart, unlabelled.

Quantities are measured at the image's own resolution; the fixed-pattern gain (scintillator grain) is identical in
the renders compared and counts as anatomy-like background, not as noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from caries_mim.synth.render import LesionAnnotation, RasterizedScene

#: Where D counts as the lesion's core: at least this fraction of its peak.
CORE_FRACTION = 0.5

#: Noise is measured on the lesion's field box grown by this margin (mm) on each side.
_NOISE_MARGIN_MM = 1.0


@dataclass(frozen=True)
class LesionVisibility:
    """One lesion's measured visibility.

    Attributes:
        conspicuity: contrast-to-noise ratio ``C / sigma`` (>= 0; 0 when the lesion changes no stored value).
        contrast: ``C``, mean darkening of its core in stored display values (0..4095 scale).
        noise: ``sigma``, standard deviation of the pixel noise around it, same scale.
        visible_box: (x0, y0, x1, y1) pixel edges of its visible extent at ``floor``; None when nothing of it
            reaches the floor.
    """

    conspicuity: float
    contrast: float
    noise: float
    visible_box: tuple[float, float, float, float] | None


def measure_visibility(
    scene: RasterizedScene, noisy: np.ndarray, floor: float
) -> list[tuple[LesionAnnotation, LesionVisibility]]:
    """Measure every lesion of ``scene`` on its acquired image ``noisy`` (uint16 (H, W), same scene and noise seed).

    Returns:
        (annotation, visibility) per lesion of ``scene.lesions``, in that order; the annotations are the
        rasterizer's (box = demineralization field).
    """
    if not scene.lesions:
        return []
    clean = scene.acquire(noise=False).astype(np.float32)
    noise_field = noisy.astype(np.float32) - clean
    spacing = scene.plan.layout.spacing
    margin = int(np.ceil(_NOISE_MARGIN_MM / spacing))
    height, width = clean.shape
    results = []
    for raster in scene.lesions:
        x0, y0, x1, y1 = raster.annotation.box
        rows = slice(max(int(y0) - margin, 0), min(int(np.ceil(y1)) + margin, height))
        cols = slice(max(int(x0) - margin, 0), min(int(np.ceil(x1)) + margin, width))
        without = scene.acquire(omit_lesions=(raster.spec_index,), noise=False)[rows, cols].astype(np.float32)
        signal = without - clean[rows, cols]
        visibility = _visibility(signal, noise_field[rows, cols], floor)
        if visibility.visible_box is not None:
            bx0, by0, bx1, by1 = visibility.visible_box
            shifted = (bx0 + cols.start, by0 + rows.start, bx1 + cols.start, by1 + rows.start)
            visibility = dataclasses.replace(visibility, visible_box=shifted)
        results.append((raster.annotation, visibility))
    return results


def _visibility(signal: np.ndarray, noise: np.ndarray, floor: float) -> LesionVisibility:
    """Conspicuity of one lesion from its noise-free signal ``D`` and the noise field around it.

    Args:
        signal: float32 (h, w), the lesion's darkening in stored values (positive inside the lesion).
        noise: float32 (h, w), noisy minus noise-free image over the same window (the field box + 1 mm).
        floor: conspicuity a pixel's contrast is held against for the visible extent.
    """
    peak = float(signal.max())
    if peak <= 0.0:
        return LesionVisibility(0.0, 0.0, float(noise.std()), None)
    core = signal >= CORE_FRACTION * peak
    contrast = float(signal[core].mean())
    sigma = max(float(noise.std()), 1e-6)
    visible = signal >= floor * sigma
    box = None
    if visible.any():
        vr, vc = np.nonzero(visible)
        box = (float(vc.min()), float(vr.min()), float(vc.max() + 1), float(vr.max() + 1))
    return LesionVisibility(contrast / sigma, contrast, sigma, box)


def split_by_floor(
    measured: Sequence[tuple[LesionAnnotation, LesionVisibility]], floor: float
) -> tuple[list[LesionAnnotation], list[LesionAnnotation]]:
    """(findings, subthreshold): lesions at or above ``floor`` with their visible extent as box, and the rest with
    their field box; both carry their conspicuity (rounded to 0.01)."""
    findings, subthreshold = [], []
    for annotation, visibility in measured:
        score = round(visibility.conspicuity, 2)
        if visibility.conspicuity >= floor and visibility.visible_box is not None:
            findings.append(dataclasses.replace(annotation, box=visibility.visible_box, conspicuity=score))
        else:
            subthreshold.append(dataclasses.replace(annotation, conspicuity=score))
    return findings, subthreshold
