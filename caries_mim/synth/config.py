"""Every knob of the synthetic generator in one frozen dataclass, so a dataset is reproducible from its manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from caries_mim.errors import InvalidArgumentError
from caries_mim.typed_values import checked_kwargs

#: Transfer syntaxes the writer knows, by the short names used in configs and manifests.
TRANSFER_SYNTAXES = ("explicit_vr_little_endian", "rle_lossless", "jpeg2000_lossless")

Range = tuple[float, float]


@dataclass(frozen=True)
class SynthConfig:
    """Distributions the generator samples from. Ranges are inclusive ``(low, high)`` uniform draws.

    Attributes:
        bitewing_fraction: probability that an image is a bitewing; the rest are periapicals.
        width_px_range: image width in pixels for bitewings (the long side for periapicals).
        bitewing_aspect_range: width / height of bitewings (landscape).
        periapical_aspect_range: long side / short side of periapicals.
        periapical_portrait_fraction: probability that a periapical is taller than wide.
        sensor_long_side_mm: physical length of the sensor's long side; with the pixel count it sets the spacing.
        spacing_mm_range: pixel spacing is clipped into this range (real intra-oral sensors: 0.019-0.04 mm).
        rotation_deg_range: rotation of the whole view (sensor not parallel to the occlusal plane).
        lesion_free_fraction: fraction of images without any caries lesion.
        lesions_per_image: (min, max) lesion count of an image that has lesions.
        lesion_depth_weights: relative frequency of lesions reaching enamel, outer dentin and inner dentin.
        occlusal_lesion_fraction: fraction of lesions on the occlusal surface (the rest are proximal).
        lesion_mineral_loss: fraction of mineral lost at the lesion core; low values give faint lesions.
        lesion_buccolingual_mm: extent of the lesion along the beam, i.e. how much tooth it removes from the path.
        restoration_probability: probability that a tooth carries a restoration (amalgam or composite).
        amalgam_fraction: fraction of restorations that are amalgam (the rest are composite).
        exposure_photons: mean detected quanta per pixel behind air; sets the quantum noise level.
        electronic_noise: detector read noise, in quanta per pixel.
        psf_sigma_px: detector blur (Gaussian PSF sigma) in pixels.
        edge_enhancement_probability: probability of vendor unsharp masking (gives Mach-band-like halos).
        monochrome1_fraction: fraction of files written as MONOCHROME1 (stored values inverted).
        transfer_syntaxes: files cycle through these by index, so the mix is exact and deterministic.
        visibility_floor: conspicuity (Rose signal-to-noise ratio, :mod:`caries_mim.synth.conspicuity`) under
            which a drawn lesion is not labelled: no reader could see it. See ``docs/synthetic_data.md``.
    """

    bitewing_fraction: float = 0.7
    width_px_range: Range = (900.0, 1300.0)
    bitewing_aspect_range: Range = (1.25, 1.45)
    periapical_aspect_range: Range = (1.25, 1.45)
    periapical_portrait_fraction: float = 0.6
    sensor_long_side_mm: Range = (30.0, 40.0)
    spacing_mm_range: Range = (0.02, 0.04)
    rotation_deg_range: Range = (-4.0, 4.0)
    lesion_free_fraction: float = 1.0 / 3.0
    lesions_per_image: tuple[int, int] = (1, 4)
    lesion_depth_weights: tuple[float, float, float] = (0.35, 0.4, 0.25)
    occlusal_lesion_fraction: float = 0.2
    lesion_mineral_loss: Range = (0.3, 0.75)
    lesion_buccolingual_mm: Range = (1.2, 3.5)
    restoration_probability: float = 0.15
    amalgam_fraction: float = 0.5
    exposure_photons: Range = (1500.0, 8000.0)
    electronic_noise: Range = (2.0, 8.0)
    psf_sigma_px: Range = (0.5, 1.1)
    edge_enhancement_probability: float = 0.4
    monochrome1_fraction: float = 0.25
    transfer_syntaxes: tuple[str, ...] = TRANSFER_SYNTAXES
    visibility_floor: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "bitewing_fraction",
            "periapical_portrait_fraction",
            "lesion_free_fraction",
            "occlusal_lesion_fraction",
            "restoration_probability",
            "amalgam_fraction",
            "edge_enhancement_probability",
            "monochrome1_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"SynthConfig.{name} must be in [0, 1], got {value}")
        for name in (
            "width_px_range",
            "bitewing_aspect_range",
            "periapical_aspect_range",
            "sensor_long_side_mm",
            "spacing_mm_range",
            "rotation_deg_range",
            "lesion_mineral_loss",
            "lesion_buccolingual_mm",
            "exposure_photons",
            "electronic_noise",
            "psf_sigma_px",
        ):
            low, high = getattr(self, name)
            if not low <= high:
                raise InvalidArgumentError(f"SynthConfig.{name} must be (low, high) with low <= high, got {low, high}")
        if self.width_px_range[0] < 64 or self.spacing_mm_range[0] <= 0 or self.exposure_photons[0] <= 0:
            raise InvalidArgumentError("SynthConfig: widths must be >= 64 px, spacing and exposure positive")
        if not (self.lesion_mineral_loss[0] > 0.0 and self.lesion_mineral_loss[1] <= 1.0):
            raise InvalidArgumentError("SynthConfig.lesion_mineral_loss must lie in (0, 1]")
        low, high = self.lesions_per_image
        if not 1 <= low <= high:
            raise InvalidArgumentError(f"SynthConfig.lesions_per_image must be 1 <= min <= max, got {low, high}")
        if min(self.lesion_depth_weights) < 0 or sum(self.lesion_depth_weights) <= 0:
            raise InvalidArgumentError("SynthConfig.lesion_depth_weights must be non-negative with a positive sum")
        if not self.visibility_floor >= 0.0:
            raise InvalidArgumentError(f"SynthConfig.visibility_floor must be >= 0, got {self.visibility_floor}")
        if not self.transfer_syntaxes or any(ts not in TRANSFER_SYNTAXES for ts in self.transfer_syntaxes):
            raise InvalidArgumentError(
                f"SynthConfig.transfer_syntaxes must be a non-empty subset of {', '.join(TRANSFER_SYNTAXES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthConfig:
        """Inverse of :meth:`to_dict`; unknown keys and wrongly typed values are errors that name them, so a typo
        is never silently ignored."""
        if not isinstance(values, dict):
            raise InvalidArgumentError(f"a SynthConfig must be a mapping, got {values!r}")
        return cls(**checked_kwargs(cls, values, "SynthConfig"))
