"""The one rule that decides at what scale the detector sees a radiograph, for training and inference alike.

Two rules exist; a detector config picks one (``DetectorConfig.spacing_mm``):

- **physical** (``spacing_mm`` set): every image is resampled to that working spacing in mm per pixel, so a lesion
  of 1 mm spans the same number of model pixels whatever the sensor. The image's own spacing comes from the file
  (PixelSpacing or ImagerPixelSpacing, see :mod:`caries_mim.io`). A file without one is assumed to span
  ``assumed_long_side_mm`` along its long side: intra-oral sensors are 30-45 mm long whatever their pixel count,
  so that guess is off by at most ~25% where a fixed assumed spacing could be off by 2x. The finetune pipeline
  sets both values from the training set (nnDetection's rule: the median spacing; and the median long side in mm).
- **letterbox** (``spacing_mm`` None, the rule of packages trained before the physical rule): the long side goes
  to ``image_size``, but no image is shrunk by more than ``max_downscale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from caries_mim.errors import InvalidArgumentError

#: The physical rule never enlarges or shrinks by more than this: a file that claims 0.0001 mm pixels (or 100 mm)
#: is wrong, and obeying it would make a huge or an empty image.
MAX_RESAMPLE = 16.0


def model_scale_factor(height: int, width: int, image_size: int, max_downscale: float) -> float:
    """The letterbox rule's factor from original to model pixels: the long side goes to ``image_size``, but no
    image is shrunk by more than ``max_downscale`` (a panoramic stays larger than ``image_size`` and is tiled
    instead of squeezed, see :mod:`caries_mim.detection.preprocessing`)."""
    return image_size / min(max(height, width), image_size * max_downscale)


@dataclass(frozen=True)
class ScaleRule:
    """How original pixels map to model pixels (see the module doc).

    Attributes:
        image_size: letterbox rule: the long side in model pixels; physical rule: unused here (the window side).
        max_downscale: letterbox rule: the most an image is shrunk.
        spacing_mm: the working spacing (mm per model pixel), or None for the letterbox rule.
        assumed_long_side_mm: physical rule: the length of the long side of an image without a spacing.
    """

    image_size: int
    max_downscale: float
    spacing_mm: float | None = None
    assumed_long_side_mm: float = 35.0

    @property
    def physical(self) -> bool:
        return self.spacing_mm is not None

    def source_spacing(self, height: int, width: int, spacing_mm: tuple[float, float] | None) -> float:
        """The spacing (mm per pixel) the physical rule uses for an image: the mean of its (row, column) spacing,
        or ``assumed_long_side_mm`` over its long side when it has none (or an unusable one)."""
        if spacing_mm is not None:
            row, column = (float(value) for value in spacing_mm)
            if row > 0 and column > 0 and row == row and column == column:  # positive, not NaN
                return 0.5 * (row + column)
        return self.assumed_long_side_mm / max(height, width, 1)

    def factor(self, height: int, width: int, spacing_mm: tuple[float, float] | None = None) -> float:
        """Factor from original to model pixels for a ``height`` x ``width`` image with that spacing.

        Raises:
            InvalidArgumentError: an empty image.
        """
        if height < 1 or width < 1:
            raise InvalidArgumentError(f"cannot scale an empty {height} x {width} image")
        if self.spacing_mm is None:
            return model_scale_factor(height, width, self.image_size, self.max_downscale)
        factor = self.source_spacing(height, width, spacing_mm) / self.spacing_mm
        return min(max(factor, 1.0 / MAX_RESAMPLE), MAX_RESAMPLE)

    def resized(self, height: int, width: int, spacing_mm: tuple[float, float] | None = None) -> tuple[int, int]:
        """(height, width) after the resize: each side times :meth:`factor`, rounded, at least 1 px (as
        albumentations' ``LongestMaxSize`` rounds)."""
        factor = self.factor(height, width, spacing_mm)
        return max(1, round(height * factor)), max(1, round(width * factor))
