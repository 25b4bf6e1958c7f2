"""Augmentation presets (albumentations 2.x) for single-channel float32 radiographs in [0, 1].

Images enter and leave as (H, W) float32 in [0, 1]. Detection presets take ``bboxes`` as pascal_voc
[x0, y0, x1, y1] pixels with a ``labels`` field, and return boxes clipped to the image with x1 > x0, y1 > y0;
boxes that lose most of their area to a crop or an affine move are removed together with their labels.

Resizing keeps the aspect ratio (longest side to ``size``) and pads the bottom and right with black up to a
square: caries are a few pixels wide on a bitewing, and a stretched tooth is not a tooth the model will see at
inference. Padding at the top-left anchor keeps the map back to original pixels a pure scale
(:class:`Letterbox`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import get_worker_info

from caries_mim.data.scale import ScaleRule

#: Key under which detection transforms carry the class indices of ``bboxes``.
LABEL_FIELD = "labels"
#: Key under which detection transforms get the image's (row, column) spacing in mm, or None.
SPACING_FIELD = "spacing_mm"
#: Key under which the training transform carries each box's weight in the choice of the lesion a positive crop
#: holds (:class:`LesionCrop`); all ones when the caller gives none.
BOX_WEIGHT_FIELD = "box_weights"
#: Augmentation presets of :func:`detection_train_transform` (``data.augmentation`` in the fine-tuning config).
DETECTION_AUGMENTATIONS = ("standard", "sensor")


class FloatClahe(A.ImageOnlyTransform):
    """CLAHE for float32 images in [0, 1] that keeps their sub-8-bit detail.

    OpenCV's CLAHE (and albumentations' ``A.CLAHE``, which converts float input to uint8 and back) works on
    uint8: its clip limit is defined for a 256-bin histogram. Radiographs come from 12-16 bit detectors, and the
    enamel/dentin contrast of an early lesion can sit below one 8-bit step. So the equalization mapping is computed
    and applied on the uint8-rounded image, as CLAHE is defined, and the rounding residual (the part below one
    8-bit step) is added back afterwards instead of being thrown away.
    """

    def __init__(
        self,
        clip_limit: tuple[float, float] = (1.0, 3.0),
        tile_grid_size: tuple[int, int] = (8, 8),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.clip_limit = clip_limit
        self.tile_grid_size = tile_grid_size

    def get_params(self) -> dict[str, float]:
        return {"clip_limit": self.py_random.uniform(*self.clip_limit)}

    def apply(self, img: np.ndarray, clip_limit: float, **params: Any) -> np.ndarray:
        if img.dtype != np.float32:
            raise TypeError(f"FloatClahe expects float32 images in [0, 1], got {img.dtype}")
        if img.ndim == 3 and img.shape[-1] == 1:
            return self.apply(img[..., 0], clip_limit)[..., None]
        rounded = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
        equalized = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=self.tile_grid_size).apply(rounded)
        residual = img - rounded.astype(np.float32) / 255.0
        return np.clip(equalized.astype(np.float32) / 255.0 + residual, 0.0, 1.0).astype(np.float32)


def _letterbox(size: int) -> list[A.BasicTransform]:
    return [
        # Area averaging when shrinking (anti-aliasing keeps thin enamel edges), linear when enlarging.
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0.0),
    ]


def _bbox_params(min_visibility: float, label_fields: Sequence[str] = (LABEL_FIELD,)) -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc",
        label_fields=list(label_fields),
        clip=True,
        filter_invalid_bboxes=True,
        min_visibility=min_visibility,
        # Boxes squeezed under one pixel by a resize carry no trainable signal.
        min_width=1.0,
        min_height=1.0,
    )


def mim_pretrain_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    seed: int | None = None,
    *,
    spacing_mm: float | None = None,
) -> A.Compose:
    """MAE-style augmentation for masked image modeling, to ``size`` x ``size`` crops, float32 in [0, 1].

    Without ``spacing_mm``: a random resized crop with area fraction in ``scale`` (the image's own scale is
    lost). With ``spacing_mm`` (the detector's working spacing): the image is resampled to that spacing as the
    detector does (:class:`~caries_mim.data.scale.ScaleRule`; pass ``spacing_mm=(row, column)`` with the image),
    then a random crop of ``size`` is taken, jittered in scale by +-15% (sensors and magnification differ that
    much), so the encoder learns the anatomy at the size the detector will show it. Then horizontal flip and mild
    brightness/contrast/gamma jitter (detector and exposure variation between practices, kept mild so
    reconstruction targets stay realistic).
    """
    return A.Compose(
        [
            *_pretrain_geometry(size, scale, spacing_mm, scale_jitter=0.15),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.5),
        ],
        seed=seed,
    )


def _pretrain_geometry(
    size: int, scale: tuple[float, float], spacing_mm: float | None, *, scale_jitter: float
) -> list[A.BasicTransform]:
    """A ``size`` x ``size`` crop: a random resized crop of area fraction ``scale`` without ``spacing_mm``; with it,
    the image resampled to that spacing as the detector does, jittered in scale by +-``scale_jitter``, then cropped."""
    if spacing_mm is None:
        return [
            A.RandomResizedCrop(
                size=(size, size),
                scale=scale,
                ratio=(3 / 4, 4 / 3),
                interpolation=cv2.INTER_LINEAR,
                area_for_downscale="image",
            )
        ]
    return [
        ModelScale(ScaleRule(size, 1.0, spacing_mm=spacing_mm)),
        A.RandomScale(scale_limit=scale_jitter, interpolation=cv2.INTER_LINEAR, p=1.0),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left", border_mode=cv2.BORDER_CONSTANT),
        A.RandomCrop(size, size),
    ]


def contrastive_view_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    seed: int | None = None,
    *,
    spacing_mm: float | None = None,
) -> A.Compose:
    """One view for two-view (contrastive) objectives, to ``size`` x ``size`` float32 in [0, 1]; apply it twice to
    the same decoded image for the two views.

    MoCo v3's recipe made for single-channel radiographs: colour jitter and grayscale are no-ops on one channel, so
    what stays is the geometry (as :func:`mim_pretrain_transform`, with +-30% scale jitter at a working spacing),
    both flips (a bitewing upside down is a bitewing with its jaws swapped), strong brightness/contrast and gamma
    (exposure and sensor response), Gaussian blur (focal spot, motion), sensor noise, CLAHE (the contrast
    enhancement viewers apply) and a rare solarization (MoCo v3 solarizes one view in five). Stronger than the MIM
    preset: two views must differ enough that matching them takes the anatomy, not the pixels.
    """
    return A.Compose(
        [
            *_pretrain_geometry(size, scale, spacing_mm, scale_jitter=0.3),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),
            A.GaussianBlur(blur_limit=(3, 9), sigma_limit=(0.1, 2.0), p=0.5),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
            FloatClahe(p=0.3),
            A.Solarize(threshold_range=(0.5, 0.5), p=0.1),
        ],
        seed=seed,
    )


class ModelScale(A.LongestMaxSize):
    """Resize by the :class:`~caries_mim.data.scale.ScaleRule`, aspect kept: exactly the geometry inference uses.
    Area averaging when shrinking (anti-aliasing keeps thin enamel edges), linear when enlarging.

    The physical rule needs the image's spacing: pass it with the image, ``transform(image=..., spacing_mm=(row,
    column) or None, ...)``.
    """

    def __init__(self, rule: ScaleRule) -> None:
        super().__init__(max_size=rule.image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0)
        self.rule = rule

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"scale": self.rule.factor(height, width, data.get(SPACING_FIELD))}


class LesionCrop(A.AtLeastOneBBoxRandomCrop):
    """A ``height`` x ``width`` crop holding one whole box, the box drawn in proportion to its weight.

    albumentations' :class:`~albumentations.AtLeastOneBBoxRandomCrop` draws the box uniformly. Repeat factor sampling
    over annotation attributes (``caries_mim.data.repeat_factors``) over-samples images for a rare kind of lesion,
    but such an image usually holds common lesions too, and a uniform choice would spend most of its extra crops
    on them: the box weights (``box_weights``, the second label field: column 5 of albumentations' box array) let
    the rare lesion be the one the crop is built around. With equal weights the draw is the parent's, unchanged.
    A box of weight 0 is never chosen: that is how an ignore region travels beside the lesions
    (:class:`~caries_mim.data.DetectionDataset` with ``ignore_regions``); without any other box the crop is the
    parent's uniform one.
    """

    #: Column of a box's weight in albumentations' box array: 4 coordinates, the label, then the weight.
    _WEIGHT_COLUMN = 5

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        bboxes = np.asarray(data.get("bboxes", ()))
        if len(bboxes) and bboxes.shape[1] > self._WEIGHT_COLUMN:
            lesions = bboxes[:, self._WEIGHT_COLUMN] > 0
            if not lesions.all():
                bboxes = bboxes[lesions]
                data = {**data, "bboxes": bboxes}
        if len(bboxes) > 1 and bboxes.shape[1] > self._WEIGHT_COLUMN:
            weights = bboxes[:, self._WEIGHT_COLUMN]
            if np.ptp(weights) > 0:
                cumulative = np.cumsum(weights, dtype=np.float64)
                chosen = int(np.searchsorted(cumulative, self.py_random.random() * cumulative[-1], side="right"))
                chosen = min(chosen, len(bboxes) - 1)
                data = {**data, "bboxes": bboxes[chosen : chosen + 1]}
        return super().get_params_dependent_on_data(params, data)


class StructureCrop(A.RandomCrop):
    """A ``height`` x ``width`` crop centred on a point drawn in proportion to the squared local edge strength.

    Uniform crops of a radiograph are mostly bone, soft tissue and air; the regions that fool a caries detector are
    where the tooth contours are: proximal surfaces and contacts, embrasures, the cemento-enamel junction,
    restoration margins. Those are the strongest edges of the image, so drawing negative crops there gives the
    look-alikes of caries their share of training without any annotation of them. Edge strength is the Sobel
    gradient magnitude of the image shrunk 8x (cheap, and insensitive to pixel noise).
    """

    _SHRINK = 8

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        if self.height > height or self.width > width:
            return super().get_params_dependent_on_data(params, data)
        image = np.asarray(data["image"], dtype=np.float32)
        image = image[..., 0] if image.ndim == 3 else image
        small = cv2.resize(image, (max(width // self._SHRINK, 1), max(height // self._SHRINK, 1)), cv2.INTER_AREA)
        strength = np.square(cv2.Sobel(small, cv2.CV_32F, 1, 0)) + np.square(cv2.Sobel(small, cv2.CV_32F, 0, 1))
        cumulative = np.cumsum(np.square(strength, dtype=np.float64).ravel())
        if not cumulative.size or cumulative[-1] <= 0:
            return super().get_params_dependent_on_data(params, data)
        index = int(np.searchsorted(cumulative, self.py_random.random() * cumulative[-1], side="right"))
        row, column = divmod(min(index, cumulative.size - 1), small.shape[1])
        centre_y = (row + 0.5) * height / small.shape[0]
        centre_x = (column + 0.5) * width / small.shape[1]
        y0 = int(np.clip(round(centre_y - self.height / 2), 0, height - self.height))
        x0 = int(np.clip(round(centre_x - self.width / 2), 0, width - self.width))
        return {"crop_coords": (x0, y0, x0 + self.width, y0 + self.height), "pad_params": None}


@dataclass(frozen=True)
class TrainTransform:
    """A training transform in two stages: ``scale``, the deterministic resize to the model's scale (the same for
    every crop of an image), then ``augment``, the random crop and augmentation drawn anew for every crop.

    Called like one albumentations transform. A dataset that draws many crops of the same image can run ``scale``
    once per image and keep its result (:class:`~caries_mim.data.DetectionDataset` does, within a memory budget):
    on 2 CPU cores the cache read and the whole-image resize were two thirds of a crop's cost.
    """

    scale: A.Compose
    augment: A.Compose

    def __call__(self, **data: Any) -> dict[str, Any]:
        if BOX_WEIGHT_FIELD not in data:
            data[BOX_WEIGHT_FIELD] = np.ones(len(data.get("bboxes", ())), dtype=np.float32)
        return self.augment(**self.scale(**data))

    def set_random_seed(self, seed: int) -> None:
        self.augment.set_random_seed(seed)


def detection_train_transform(
    size: int = 512,
    min_visibility: float = 0.3,
    seed: int | None = None,
    *,
    crop_size: int | None = None,
    positive_fraction: float = 0.5,
    max_downscale: float = 4.0,
    rule: ScaleRule | None = None,
    augmentation: str = "standard",
    vertical_flip: float = 0.0,
) -> TrainTransform:
    """Box-aware training augmentation in the geometry of inference, on patches of ``crop_size`` x ``crop_size``.

    1. Resize as inference does (:class:`ModelScale` with ``rule``; by default the letterbox rule: long side to
       ``size``, shrunk by at most ``max_downscale``). The letterbox rule pads bottom/right with black to the
       ``size`` x ``size`` square (or, for a larger image, to at least one patch); the physical rule (working
       spacing in mm) pads only images smaller than a patch.
    2. Take a ``crop_size`` patch (default ``size``: the whole letterboxed intra-oral image). With probability
       ``positive_fraction`` the patch contains a whole lesion, drawn in proportion to its box weight
       (:class:`LesionCrop`; lesions cover well under 1% of a radiograph, so uniform patches would mostly teach
       "background"; MONAI's detection recipes sample positive patches the same way, ``RandCropBoxByPosNegLabeld``).
       The other patches are half centred on strong edges
       (:class:`StructureCrop`: proximal surfaces, embrasures, restorations, the look-alikes of caries) and half
       drawn uniformly. Inference then slides a window of the same size (``DetectorConfig.roi_size``).
    3. ``augmentation="standard"``: horizontal flip (caries look the same mirrored), small affine (scale 0.9-1.1,
       shift 5%, rotation 5 degrees: sensor placement varies that much), CLAHE, brightness/contrast/gamma,
       Gaussian noise (quantum noise of low-dose sensors) and slight blur (motion, focal spot).
       ``augmentation="sensor"``: the same flip, then what differs between sensors and vendors, in the order an
       acquisition applies it (:func:`_sensor_augmentation`): scale 0.8-1.25 (a declared spacing off by the
       magnification, another sensor's pixel pitch), rotation 10 degrees, blur or a coarser pixel grid (focal
       spot, scintillator spread, resolution), quantum and electronic noise up to 4% of the range, vendor edge
       enhancement, then contrast, gamma and CLAHE (the display processing).
       Either way, with probability ``vertical_flip`` the patch is also turned upside down after the horizontal
       flip (a bitewing upside down has its jaws swapped: the same kind of image; what a detector predicting with
       ``test_time_vertical_flip`` sees in its extra passes).

    Boxes keeping under ``min_visibility`` of their area are dropped with their labels. Call as
    ``transform(image=img, bboxes=boxes_xyxy, labels=labels, spacing_mm=(row, column) or None)``, optionally with
    ``box_weights`` (float (N,), > 0; default all 1: every lesion equally likely); output image
    float32 (crop_size, crop_size) in [0, 1], boxes in its pixels.
    """
    crop = size if crop_size is None else crop_size
    if not 0 < crop <= size:
        raise ValueError(f"crop_size must be in [1, {size}], got {crop}")
    rule = rule or ScaleRule(size, max_downscale)
    padded = crop if rule.physical else size
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if augmentation not in DETECTION_AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(DETECTION_AUGMENTATIONS)}, got {augmentation!r}")
    if not 0.0 <= vertical_flip <= 1.0:
        raise ValueError(f"vertical_flip must be in [0, 1], got {vertical_flip}")
    # The boxes keep all their area in the resize: only the crop and the augmentation may drop one.
    fields = (LABEL_FIELD, BOX_WEIGHT_FIELD)
    scale = A.Compose([ModelScale(rule)], bbox_params=_bbox_params(0.0, fields))
    augment = A.Compose(
        [
            A.PadIfNeeded(
                min_height=padded, min_width=padded, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0.0
            ),
            A.OneOf(
                [
                    LesionCrop(crop, crop, p=positive_fraction),
                    StructureCrop(crop, crop, p=0.5 * (1.0 - positive_fraction)),
                    A.RandomCrop(crop, crop, p=0.5 * (1.0 - positive_fraction)),
                ],
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
            # Left out at 0 rather than added with p=0: a transform draws from the seeded generator even when it
            # does not apply, which would change the crops of every recipe trained before this setting existed.
            *([A.VerticalFlip(p=vertical_flip)] if vertical_flip > 0 else []),
            *(_sensor_augmentation() if augmentation == "sensor" else _standard_augmentation()),
        ],
        bbox_params=_bbox_params(min_visibility, fields),
        seed=seed,
    )
    return TrainTransform(scale, augment)


def _placement(scale: tuple[float, float], degrees: float, p: float) -> A.Affine:
    """Scale, a 5% shift and a rotation of up to ``degrees``, with black where the image moved away."""
    return A.Affine(
        scale=scale,
        translate_percent=(-0.05, 0.05),
        rotate=(-degrees, degrees),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0.0,
        p=p,
    )


def _standard_augmentation() -> list[A.BasicTransform]:
    """The recipe's augmentation after the crop and flip (see :func:`detection_train_transform`)."""
    return [
        _placement(scale=(0.9, 1.1), degrees=5, p=0.5),
        FloatClahe(p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.5),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ]


def _sensor_augmentation() -> list[A.BasicTransform]:
    """Augmentation for radiographs from other sensors than the training set's, after the crop and flip.

    In acquisition order: geometry (a PixelSpacing that is really ImagerPixelSpacing is off by the magnification,
    1.05-1.3 for intra-oral geometry; pixel pitches differ by sensor), the sensor's blur or coarser grid, its noise,
    the vendor's edge enhancement (which sharpens that noise too), then the display processing.
    """
    return [
        _placement(scale=(0.8, 1.25), degrees=10, p=0.7),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=0, sigma_limit=(0.5, 1.5)),
                A.Downscale(
                    scale_range=(0.5, 0.85),
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
                ),
            ],
            p=0.4,
        ),
        A.GaussNoise(std_range=(0.005, 0.04), p=0.5),
        A.Sharpen(alpha=(0.1, 0.4), lightness=(1.0, 1.0), p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.25, p=0.6),
        A.RandomGamma(gamma_limit=(70, 140), p=0.5),
        FloatClahe(p=0.3),
    ]


def detection_eval_transform(size: int = 512) -> A.Compose:
    """Deterministic letterbox to ``size`` x ``size`` (no intensity change). Map predictions back to original
    pixels with ``Letterbox.for_image(height, width, size).to_original(boxes)``.

    albumentations requires the box fields on every call: at inference pass ``bboxes=np.zeros((0, 4))`` and
    ``labels=np.zeros(0)``.
    """
    return A.Compose(_letterbox(size), bbox_params=_bbox_params(min_visibility=0.0))


@dataclass(frozen=True)
class Letterbox:
    """Geometry of :func:`detection_eval_transform` for one image: original (H, W) -> resized, padded square.

    Attributes:
        size: side of the padded square the model sees.
        original: (height, width) of the source image in pixels.
        resized: (height, width) of the image inside the square, before bottom/right padding.
    """

    size: int
    original: tuple[int, int]
    resized: tuple[int, int]

    @classmethod
    def for_image(cls, height: int, width: int, size: int) -> Letterbox:
        """The geometry albumentations' LongestMaxSize produces (each side rounded, at least one pixel)."""
        scale = size / max(height, width)
        resized = (max(1, round(height * scale)), max(1, round(width * scale)))
        return cls(size=size, original=(height, width), resized=resized)

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(x, y) factors from original to model pixels; they differ slightly because each side is rounded."""
        return self.resized[1] / self.original[1], self.resized[0] / self.original[0]

    def to_model(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> float32 (N, 4) xyxy in model pixels."""
        sx, sy = self.scale_xy
        return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * (sx, sy, sx, sy)).astype(np.float32)

    def to_original(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """(N, 4) xyxy in model pixels -> float32 (N, 4) xyxy in original pixels, clipped to the original image
        (a prediction reaching into the padding ends at the image border)."""
        sx, sy = self.scale_xy
        height, width = self.original
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / (sx, sy, sx, sy)
        return np.clip(out, 0.0, (width, height, width, height)).astype(np.float32)


def reseed_for_worker(transform: Any, seeded: int | None) -> int | None:
    """Give ``transform`` this DataLoader worker's own seed, once per worker; returns the seed now in use.

    Every worker starts with a copy of the same transform and hence the same random state (albumentations 2.0
    does not reseed per worker), so without this all workers would draw identical augmentations. torch gives
    each worker a distinct seed that also changes every epoch. Outside workers nothing changes.
    """
    info = get_worker_info()
    if info is None or transform is None or not hasattr(transform, "set_random_seed"):
        return seeded
    seed = info.seed % 2**32
    if seed != seeded:
        transform.set_random_seed(seed)
    return seed
