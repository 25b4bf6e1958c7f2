"""X-ray physics and the detector: attenuation, quantum and electronic noise, blur, gain, display mapping.

Intensities follow Beer-Lambert, ``I = I0 * exp(-sum(mu_i * t_i))``, with effective linear attenuation
coefficients at about 35 keV (a 60-70 kVp intra-oral tube after filtration). The detector counts quanta (Poisson
noise, approximated by a Gaussian of the same variance), its scintillator blurs them (so the noise is correlated
like in real indirect sensors), then the vendor software takes the log, optionally sharpens with an unsharp mask
(the halos of real images) and maps the result to 12 bits with a display curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from caries_mim.synth.config import SynthConfig

#: Effective linear attenuation coefficients (1/mm). Enamel is ~96% hydroxyapatite, dentin ~70%, alveolar bone
#: here is the mineral part of a trabecular/cortical mix, soft tissue ~ water; amalgam saturates the detector.
MU_PER_MM = {
    "enamel": 0.36,
    "dentin": 0.19,
    "bone": 0.13,
    "soft": 0.03,
    "amalgam": 6.0,
    "composite": 0.3,
}

MAX_STORED = 4095


@dataclass(frozen=True)
class AcquisitionParams:
    """Per-image detector and processing draws (see :class:`SynthConfig` for the ranges)."""

    photons: float
    electronic_noise: float
    psf_sigma_px: float
    psf_anisotropy: float
    structure_noise: float
    gain_variation: float
    vignetting: float
    heel: float
    heel_angle: float
    edge_falloff: float
    sharpen_amount: float
    sharpen_sigma_mm: float
    display_span: float
    display_gamma: float
    display_offset: float


def sample_acquisition(rng: np.random.Generator, config: SynthConfig) -> AcquisitionParams:
    sharpen = rng.random() < config.edge_enhancement_probability
    return AcquisitionParams(
        photons=float(rng.uniform(*config.exposure_photons)),
        electronic_noise=float(rng.uniform(*config.electronic_noise)),
        psf_sigma_px=float(rng.uniform(*config.psf_sigma_px)),
        psf_anisotropy=float(rng.uniform(0.8, 1.25)),
        structure_noise=float(rng.uniform(0.003, 0.012)),
        gain_variation=float(rng.uniform(0.0, 0.03)),
        vignetting=float(rng.uniform(0.02, 0.15)),
        heel=float(rng.uniform(0.02, 0.1)),
        heel_angle=float(rng.uniform(0.0, 2.0 * np.pi)),
        edge_falloff=float(rng.uniform(0.0, 0.25)),
        sharpen_amount=float(rng.uniform(0.3, 0.8)) if sharpen else 0.0,
        sharpen_sigma_mm=float(rng.uniform(0.4, 1.2)),
        display_span=float(rng.uniform(3.4, 4.2)),
        display_gamma=float(rng.uniform(1.1, 1.5)),
        display_offset=float(rng.uniform(-0.35, -0.1)),
    )


def _gain(params: AcquisitionParams, shape: tuple[int, int], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Relative exposure reaching each pixel after flat-field correction, float32 (H, W) around 1.

    What the flat field leaves: the heel effect (a linear ramp along the tube's anode-cathode axis), cone
    falloff toward the corners (vignetting), a smooth gain ripple, scintillator granularity (a fixed pattern
    of about 2x2 px, the part of the noise that is not white) and a darker rim in the outer ~0.3 mm where the
    scintillator ends. Smooth terms are built on a coarse grid and upsampled.
    """
    h, w = shape
    coarse_shape = (max(h // 16, 2), max(w // 16, 2))
    rows = np.linspace(-1.0, 1.0, coarse_shape[0], dtype=np.float32)[:, None]
    cols = np.linspace(-1.0, 1.0, coarse_shape[1], dtype=np.float32)[None, :]
    heel = params.heel * (math.cos(params.heel_angle) * cols + math.sin(params.heel_angle) * rows)
    falloff = 1.0 + heel - params.vignetting * 0.5 * (np.square(rows) + np.square(cols))
    ripple = cv2.resize(
        params.gain_variation * rng.standard_normal((3, 3)).astype(np.float32),
        (coarse_shape[1], coarse_shape[0]),
        interpolation=cv2.INTER_CUBIC,
    )
    gain = cv2.resize(falloff + ripple, (w, h), interpolation=cv2.INTER_LINEAR)
    grain = rng.random((-(-h // 2), -(-w // 2)), dtype=np.float32) - np.float32(0.5)
    grain = cv2.resize(grain, (2 * grain.shape[1], 2 * grain.shape[0]), interpolation=cv2.INTER_LINEAR)[:h, :w]
    gain += np.float32(2.0 * math.sqrt(3.0) * params.structure_noise) * grain
    width = min(math.ceil(1.0 / spacing), h // 2, w // 2)
    rim = (1.0 - params.edge_falloff * np.exp(-np.arange(width) * (spacing / 0.3))).astype(np.float32)
    gain[:width] *= rim[:, None]
    gain[h - width :] *= rim[::-1, None]
    gain[:, :width] *= rim[None, :]
    gain[:, w - width :] *= rim[None, ::-1]
    return gain


def detect(
    attenuation: np.ndarray, params: AcquisitionParams, spacing: float, rng: np.random.Generator, *, noise: bool = True
) -> np.ndarray:
    """Line integrals -> processed log signal, as the vendor software hands it to the display curve.

    Args:
        attenuation: sum of mu * t along each ray, float32 (H, W), >= 0 (0 = air).
        spacing: pixel spacing in mm (the unsharp-mask kernel and the sensor rim are physical).
        noise: False leaves out the quantum and electronic noise (the conspicuity measurement's reference); the
            gain field is drawn first either way, so it is identical for the same ``rng`` state.
    Returns:
        float32 (H, W): measured line integrals -log(I / I0) after noise, blur, residual gain and sharpening.
    """
    shape = attenuation.shape
    quanta = np.float32(params.photons) * _gain(params, shape, spacing, rng) * cv2.exp(-attenuation)
    # Unit-variance triangular noise (the sum of two uniforms) instead of normal draws: 3x cheaper, and after
    # the PSF below sums several pixels the noise is Gaussian to the eye and to any statistic we use.
    if noise:
        uniform = rng.random((2, *shape), dtype=np.float32)
        unit = (uniform[0] + uniform[1] - np.float32(1.0)) * np.float32(math.sqrt(6.0))
        quanta += np.sqrt(quanta + np.float32(params.electronic_noise**2)) * unit
    # The scintillator PSF correlates the quantum noise; its blur differs slightly between rows and columns
    # (pixel pitch, readout direction), which real sensors show as mildly anisotropic noise grain and edges.
    sigma_x = params.psf_sigma_px * math.sqrt(params.psf_anisotropy)
    sigma_y = params.psf_sigma_px / math.sqrt(params.psf_anisotropy)
    quanta = cv2.GaussianBlur(quanta, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    measured = -cv2.log(np.maximum(quanta, np.float32(0.5)) * np.float32(1.0 / params.photons))
    if params.sharpen_amount > 0:
        # The unsharp-mask background is smooth: blur it at a quarter of the resolution (10x cheaper).
        small = cv2.resize(measured, (max(shape[1] // 4, 1), max(shape[0] // 4, 1)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), params.sharpen_sigma_mm / (4.0 * spacing))
        background = cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        measured += params.sharpen_amount * (measured - background)
    return measured


def display(measured: np.ndarray, params: AcquisitionParams) -> np.ndarray:
    """Processed line integrals -> stored 12-bit values (uint16 (H, W) in 0..4095, bright = attenuating).

    The lower end is anchored on the thinnest soft tissue in the field (like auto-contrast), the upper end a
    fixed physical span above it, so enamel lands near the top and amalgam saturates at 4095.
    """
    sample = measured[::7, ::7]
    low = float(np.percentile(sample, 0.5)) + params.display_offset
    scaled = np.clip((measured - low) * np.float32(1.0 / params.display_span), 0.0, 1.0)
    # OpenCV's power is 3x faster than numpy's on float32 images.
    curved = cv2.pow(scaled, params.display_gamma)
    return np.rint(curved * np.float32(MAX_STORED)).astype(np.uint16)


def display_window(stored: np.ndarray) -> tuple[int, int]:
    """(center, width) of a window spanning the used stored range, as vendor software writes it."""
    sample = stored[::5, ::5]
    low, high = int(sample.min()), int(sample.max())
    width = max(high - low + 1, 2)
    return (low + high + 1) // 2, width
