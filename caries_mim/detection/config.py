"""Everything that determines a caries detector: encoder architecture, classes, input geometry, anchors, training
sample selection and box selection, as one serializable config.

A model package stores :meth:`DetectorConfig.to_dict` beside the weights, so prediction needs nothing from the
training config.

Coordinates: boxes are ``[x0, y0, x1, y1]`` with x along image columns (width) and y along rows (height); anchor
shapes are given as (width, height) in the same convention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from caries_mim.data.scale import ScaleRule
from caries_mim.detection.pyramid import pyramid_strides
from caries_mim.detection.spatial_prior import STEM_STRIDE, servable_stride
from caries_mim.errors import InvalidArgumentError
from caries_mim.models.config import ViTConfig
from caries_mim.typed_values import checked_kwargs

#: Classification losses :class:`~caries_mim.detection.detector.CariesDetector` can train with.
CLASSIFICATION_LOSSES = ("focal", "bce")
#: Box regression losses: smooth L1 on the encoded anchor offsets (RetinaNet) or generalized IoU on decoded boxes.
BOX_REGRESSION_LOSSES = ("smooth_l1", "giou")
#: Backbones: the ViT encoder (the product: MIM pretrains it) or a CNN yardstick (MONAI ResNet + FPN).
BACKBONES = ("vit", "resnet10", "resnet18")
#: Pyramid depths: strides p/2, p, 2p; or p/4 as well.
PYRAMID_LEVELS = (3, 4)
#: How class scores are formed: RetinaNet's sigmoid per class, or one lesion score times a softmax over the classes
#: (:mod:`caries_mim.detection.lesion_times_class`).
CLASS_SCORES = ("per_class", "lesion_times_class")
#: The spatial prior's stems (:mod:`caries_mim.detection.spatial_prior`).
SPATIAL_PRIOR_STEMS = ("vit_adapter", "strided")
#: Convolution blocks MONAI's RetinaNet heads are built with; ``head_convs`` keeps the first 1 to 4 of them.
MAX_HEAD_CONVS = 4


@dataclass(frozen=True)
class DetectorConfig:
    """A RetinaNet-style caries detector on a ViT encoder with a simple feature pyramid.

    Attributes:
        encoder: ViT architecture (a :class:`ViTConfig` or its dict). Its ``image_size`` is set to
            (``image_size``, ``image_size``): the detector input is the encoder's reference grid.
        backbone: ``vit`` (the encoder above) or a CNN yardstick, ``resnet10`` / ``resnet18`` (MONAI's ResNet with
            half the classic widths under a small FPN, :mod:`caries_mim.detection.cnn_backbone`; it needs
            ``encoder.patch_size`` 16, whose strides 8, 16 and 32 it has, and takes only the encoder's input
            standardization).
        class_names: one name per class, in label order (labels are indices into this tuple).
        image_size: side in pixels of the square the encoder is built for (its reference grid). With a working
            spacing it is the side of the training crops and, by default, of the sliding window; without one
            (the letterbox rule) intra-oral radiographs are scaled (aspect kept) so their long side is this (see
            :mod:`caries_mim.detection.preprocessing`). A multiple of twice the patch size (the coarsest stride).
        max_downscale: letterbox rule only: largest factor an input is shrunk by. Images whose long side exceeds
            ``image_size * max_downscale`` (panoramics, not intra-oral images) are shrunk by exactly this factor,
            stay larger than ``image_size`` and go through the sliding window instead of being squeezed.
        spacing_mm: the working spacing in mm per model pixel: every image is resampled to it from its own
            spacing (:class:`~caries_mim.data.scale.ScaleRule`), and anchors and windows are sizes at that
            spacing. None: the letterbox rule (packages trained before the physical rule).
        assumed_long_side_mm: with ``spacing_mm``, the physical length of the long side of an image that carries
            no spacing (intra-oral sensors are 30-45 mm long).
        pyramid_channels: channels of every pyramid level and of the heads (a multiple of 8: MONAI's heads use
            GroupNorm with 8 groups).
        pyramid_levels: 3 (strides p/2, p and 2p) or 4 (a stride-p/4 level added below them, ViTDet's 4x
            upsampling or a CNN's stride-4 stage: finer anchor positions for lesions a few cells wide).
        spatial_prior_width: ``vit`` backbone only: the stride-4 width of ViT-Adapter's convolutional spatial prior
            (:mod:`caries_mim.detection.spatial_prior`), whose maps join every pyramid level to give the plain ViT
            fine detail; coarser levels get twice the width. None: the plain ViTDet pyramid. Needs a finest
            stride of at least 4.
        spatial_prior_stem: how the spatial prior reaches stride 4. ``vit_adapter``: ViT-Adapter's ResNet-style stem
            (three 3x3 convolutions at stride 2, then 2x max pooling); ``strided``: two stride-2 3x3 convolutions
            (to half the width, then the width) and one at stride 4. At 256 px crops ViT-Adapter's two stride-1
            convolutions on the 128 x 128 map are about a quarter of a fine-tuning step on a CPU; ``strided``
            computes its last convolution on a 4x smaller map.
        head_convs: 3x3 convolution blocks (convolution, GroupNorm, ReLU) in each of MONAI's RetinaNet heads before
            its output convolution: 4 as RetinaNet and MONAI (1 to 4). The heads run on every pyramid level; with
            a stride-4 level they are most of a step's cost, and 2 blocks halve it.
        anchor_shapes: (width, height) in pixels of the anchors of the finest level (stride p/2, or p/4 with four
            levels); each next level uses 2x the shapes of the one before.
        atss_candidates: anchor positions per level that ATSS considers for each ground-truth box.
        atss_center_in_gt: whether ATSS positives must have their centre inside the box (MONAI advises against
            it for small objects).
        classification_loss: ``focal`` (RetinaNet's sigmoid focal loss over every anchor, divided by the number of
            positive anchors) or ``bce`` (binary cross-entropy averaged over the anchors the hard negative sampler
            picks, MONAI's default).
        focal_gamma, focal_alpha: the focal loss's focusing exponent and positive-class weight (None: unweighted).
        box_regression_loss: ``smooth_l1`` (RetinaNet's: smooth L1 on the encoded offsets of the positive anchors)
            or ``giou`` (1 - generalized IoU between the decoded box and its lesion: it optimizes the overlap that
            AP50 scores, with the same weight for a small lesion as for a large one).
        class_scores: ``per_class`` (RetinaNet: one sigmoid per class, each trained with the classification loss)
            or ``lesion_times_class`` (the heads score "lesion" once per anchor with the focal loss and the class
            with a softmax trained on matched anchors only; the score of a class is their product, see
            :mod:`caries_mim.detection.lesion_times_class`). Needs two or more classes and the focal loss.
        class_loss_weight: with ``lesion_times_class``, the weight of the class cross-entropy in the loss.
        hard_negative_sampling: train the classifier on a sample of anchors per image (all positives up to
            ``sampler_positive_fraction``, plus the hardest negatives) instead of on every anchor. Needed with
            ``bce``; the focal loss is designed to use every anchor.
        sampler_batch_size: anchors per image in the classification loss (hard negative sampler).
        sampler_positive_fraction: at most this fraction of them positive.
        sampler_min_negatives: negatives kept even for an image with few positives (or none).
        sampler_pool_size: hard negatives are drawn at random from the ``pool_size`` times as many
            highest-scoring negatives.
        score_threshold: detections scoring below this (sigmoid probability in [0, 1]) are discarded. Kept low:
            the operating threshold is chosen later on a validation FROC and stored in the model package.
        nms_threshold: IoU above which the lower-scoring of two overlapping detections is suppressed.
        candidates_per_level: best-scoring boxes per pyramid level kept before NMS.
        detections_per_image: most detections returned per image.
        box_fusion_iou: in (0, 1]: each box NMS keeps becomes the score-weighted mean of the candidates of its class
            overlapping it at IoU >= this (box voting), and with test-time flips the passes' detections are
            fused at this overlap (:mod:`caries_mim.detection.box_fusion`). None: plain NMS (packages made before).
        test_time_flip: predict on the image and on its left-right mirror and fuse the passes (needs
            ``box_fusion_iou``); twice the inference cost. The package's operating threshold is chosen with the same
            inference, so it fits.
        test_time_vertical_flip: predict on the upside-down image too (a bitewing upside down is one with its jaws
            swapped: the same kind of image), fused likewise (needs ``box_fusion_iou``). With ``test_time_flip``
            both mirrors and the image turned 180 degrees: four passes.
        roi_size: side in pixels of the square sliding window used for inputs larger than it; ``None`` (the
            default) means ``image_size``, the scale the model was trained at.
        sliding_window_overlap: fraction in [0, 1) by which neighbouring windows overlap.
        sliding_window_batch_size: windows run through the network at once.
    """

    encoder: ViTConfig = field(default_factory=ViTConfig)
    backbone: str = "vit"
    class_names: tuple[str, ...] = ("caries",)
    image_size: int = 512
    max_downscale: float = 4.0
    spacing_mm: float | None = None
    assumed_long_side_mm: float = 35.0
    pyramid_channels: int = 256
    pyramid_levels: int = 3
    spatial_prior_width: int | None = None
    spatial_prior_stem: str = "vit_adapter"
    head_convs: int = 4
    anchor_shapes: tuple[tuple[float, float], ...] = ((16.0, 16.0), (12.0, 20.0), (20.0, 12.0))
    atss_candidates: int = 4
    atss_center_in_gt: bool = False
    classification_loss: str = "focal"
    focal_gamma: float = 2.0
    focal_alpha: float | None = 0.25
    box_regression_loss: str = "smooth_l1"
    class_scores: str = "per_class"
    class_loss_weight: float = 1.0
    hard_negative_sampling: bool = False
    sampler_batch_size: int = 64
    sampler_positive_fraction: float = 0.3
    sampler_min_negatives: int = 16
    sampler_pool_size: float = 20.0
    score_threshold: float = 0.05
    nms_threshold: float = 0.3
    candidates_per_level: int = 1000
    detections_per_image: int = 100
    box_fusion_iou: float | None = None
    test_time_flip: bool = False
    test_time_vertical_flip: bool = False
    roi_size: int | None = None
    sliding_window_overlap: float = 0.25
    sliding_window_batch_size: int = 4

    def __post_init__(self) -> None:
        encoder = self.encoder
        if isinstance(encoder, dict):
            encoder = _encoder_from_dict(encoder)
        elif not isinstance(encoder, ViTConfig):
            raise InvalidArgumentError(f"detector config encoder must be a ViT config mapping, got {encoder!r}")
        if self.roi_size is None:
            object.__setattr__(self, "roi_size", self.image_size)
        problems = self._problems(encoder.patch_size)
        if problems:
            raise InvalidArgumentError("invalid detector config: " + "; ".join(problems))
        if encoder.image_size != (self.image_size, self.image_size):
            encoder = ViTConfig.from_dict({**encoder.to_dict(), "image_size": [self.image_size, self.image_size]})
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "anchor_shapes", tuple((float(w), float(h)) for w, h in self.anchor_shapes))

    def _problems(self, patch_size: int) -> list[str]:
        problems = []
        if patch_size % 2:
            problems.append(
                f"encoder patch_size {patch_size} must be even (the finest pyramid level has half its stride)"
            )
        coarsest = 2 * patch_size  # the stride of the max-pooled pyramid level
        if not self.class_names or any(not isinstance(name, str) or not name.strip() for name in self.class_names):
            problems.append(f"class_names must be one or more non-empty names, got {list(self.class_names)}")
        elif len(set(self.class_names)) != len(self.class_names):
            problems.append(f"class_names must be distinct, got {list(self.class_names)}")
        for key in ("image_size", "roi_size"):
            value = getattr(self, key)
            if value < coarsest or value % coarsest:
                problems.append(f"{key} {value} must be a positive multiple of {coarsest} (twice the patch size)")
        if not 0.0 <= self.sliding_window_overlap < 1.0:
            problems.append(f"sliding_window_overlap must be in [0, 1), got {self.sliding_window_overlap}")
        else:
            # MONAI places windows at multiples of this step (truncated to whole pixels); off the coarsest stride,
            # the stitched maps of the coarse levels would no longer line up with their anchors.
            step = int(self.roi_size * (1.0 - self.sliding_window_overlap))
            if step < coarsest or step % coarsest:
                problems.append(
                    f"the sliding window step int(roi_size * (1 - overlap)) = {step} must be a positive multiple "
                    f"of {coarsest}"
                )
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        elif self.backbone != "vit" and patch_size != 16:
            problems.append(f"backbone {self.backbone} has strides 8, 16 and 32: it needs patch_size 16")
        if self.classification_loss not in CLASSIFICATION_LOSSES:
            problems.append(
                f"classification_loss must be one of {', '.join(CLASSIFICATION_LOSSES)}, "
                f"got {self.classification_loss!r}"
            )
        if self.box_regression_loss not in BOX_REGRESSION_LOSSES:
            problems.append(
                f"box_regression_loss must be one of {', '.join(BOX_REGRESSION_LOSSES)}, "
                f"got {self.box_regression_loss!r}"
            )
        if self.class_scores not in CLASS_SCORES:
            problems.append(f"class_scores must be one of {', '.join(CLASS_SCORES)}, got {self.class_scores!r}")
        elif self.class_scores == "lesion_times_class":
            if len(self.class_names) < 2:
                problems.append("class_scores lesion_times_class needs two or more classes (one class is per_class)")
            if self.classification_loss != "focal":
                # MONAI's hard negative sampler ranks anchors by their largest logit, which here mixes the lesion
                # logit with class logits that say nothing about "lesion or not".
                problems.append(
                    "class_scores lesion_times_class trains its lesion score with classification_loss focal"
                )
        if not 0.0 < self.class_loss_weight <= 100.0:
            problems.append(f"class_loss_weight must be in (0, 100], got {self.class_loss_weight}")
        if self.classification_loss == "bce" and not self.hard_negative_sampling:
            problems.append(
                "classification_loss bce needs hard_negative_sampling: true (averaged over every anchor, the "
                "background would swamp the lesions)"
            )
        if self.focal_gamma < 0.0:
            problems.append(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            problems.append(f"focal_alpha must be in [0, 1] or null, got {self.focal_alpha}")
        if self.spacing_mm is not None and not 0.0 < self.spacing_mm <= 10.0:
            problems.append(f"spacing_mm must be in (0, 10] mm per pixel or null, got {self.spacing_mm}")
        if not 1.0 <= self.assumed_long_side_mm <= 1000.0:
            problems.append(f"assumed_long_side_mm must be in [1, 1000], got {self.assumed_long_side_mm}")
        if self.max_downscale < 1.0:
            problems.append(f"max_downscale must be >= 1, got {self.max_downscale}")
        if self.pyramid_levels not in PYRAMID_LEVELS:
            problems.append(f"pyramid_levels must be 3 or 4, got {self.pyramid_levels}")
        elif self.pyramid_levels == 4 and patch_size % 4:
            problems.append(
                f"pyramid_levels 4 needs a patch_size divisible by 4 (a stride-p/4 level), got {patch_size}"
            )
        if self.spatial_prior_width is not None:
            if self.backbone != "vit":
                problems.append(f"spatial_prior_width is for the vit backbone ({self.backbone} is convolutional)")
            if not 8 <= self.spatial_prior_width <= 1024:
                problems.append(f"spatial_prior_width must be in [8, 1024] or null, got {self.spatial_prior_width}")
            finest = pyramid_strides(patch_size, self.pyramid_levels)[0]
            if not servable_stride(finest):
                problems.append(
                    f"spatial_prior_width needs pyramid strides that are powers of two from {STEM_STRIDE} up "
                    f"(its stem has stride {STEM_STRIDE}); patch_size {patch_size} with {self.pyramid_levels} "
                    f"levels has a finest stride of {finest}"
                )
        if self.spatial_prior_stem not in SPATIAL_PRIOR_STEMS:
            problems.append(
                f"spatial_prior_stem must be one of {', '.join(SPATIAL_PRIOR_STEMS)}, got {self.spatial_prior_stem!r}"
            )
        if not 1 <= self.head_convs <= MAX_HEAD_CONVS:
            problems.append(f"head_convs must be in [1, {MAX_HEAD_CONVS}], got {self.head_convs}")
        if self.pyramid_channels < 8 or self.pyramid_channels % 8:
            problems.append(f"pyramid_channels {self.pyramid_channels} must be a positive multiple of 8")
        if not self.anchor_shapes or any(len(s) != 2 or min(s) <= 0 for s in self.anchor_shapes):
            problems.append(f"anchor_shapes must be one or more positive (width, height), got {self.anchor_shapes}")
        counts = (
            "atss_candidates",
            "sampler_batch_size",
            "candidates_per_level",
            "detections_per_image",
            "sliding_window_batch_size",
        )
        problems.extend(f"{key} must be >= 1, got {getattr(self, key)}" for key in counts if getattr(self, key) < 1)
        if self.sampler_min_negatives < 0:
            problems.append(f"sampler_min_negatives must be >= 0, got {self.sampler_min_negatives}")
        if self.sampler_pool_size < 1.0:
            problems.append(f"sampler_pool_size must be >= 1, got {self.sampler_pool_size}")
        problems.extend(
            f"{key} must be in (0, 1], got {getattr(self, key)}"
            for key in ("sampler_positive_fraction", "nms_threshold")
            if not 0.0 < getattr(self, key) <= 1.0
        )
        if self.box_fusion_iou is not None and not 0.0 < self.box_fusion_iou <= 1.0:
            problems.append(f"box_fusion_iou must be in (0, 1] or null, got {self.box_fusion_iou}")
        problems.extend(
            f"{key} fuses the passes' boxes: it needs box_fusion_iou (0.5 is usual)"
            for key in ("test_time_flip", "test_time_vertical_flip")
            if getattr(self, key) and self.box_fusion_iou is None
        )
        if not 0.0 <= self.score_threshold < 1.0:
            problems.append(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        return problems

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def test_time_mirrors(self) -> tuple[tuple[bool, bool], ...]:
        """The inference passes (see :func:`test_time_mirrors`)."""
        return test_time_mirrors(self.test_time_flip, self.test_time_vertical_flip)

    @property
    def head_outputs(self) -> int:
        """Classification outputs per anchor: one per class, and the lesion score after them with
        ``lesion_times_class``."""
        return self.num_classes + (self.class_scores == "lesion_times_class")

    @property
    def scale_rule(self) -> ScaleRule:
        """How an input is resized before the network (the same rule in training and inference)."""
        return ScaleRule(self.image_size, self.max_downscale, self.spacing_mm, self.assumed_long_side_mm)

    @property
    def strides(self) -> tuple[int, ...]:
        """Pyramid strides in pixels, finest first: patch_size / 2, patch_size, 2 * patch_size, with
        patch_size / 4 before them for four levels."""
        return pyramid_strides(self.encoder.patch_size, self.pyramid_levels)

    @property
    def anchor_scales(self) -> tuple[int, ...]:
        """Each level's anchor shapes relative to ``anchor_shapes`` (the finest level's), finest first: its stride
        over the finest stride, so anchors grow with the grid they sit on."""
        finest = self.strides[0]
        return tuple(stride // finest for stride in self.strides)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, numbers, strings, bools), loadable with ``torch.load(weights_only=True)``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["encoder"] = self.encoder.to_dict()
        values["class_names"] = list(self.class_names)
        values["anchor_shapes"] = [list(shape) for shape in self.anchor_shapes]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorConfig:
        """Inverse of :meth:`to_dict`; an unknown key or a value of the wrong type is an error that names it."""
        if not isinstance(values, dict):
            raise InvalidArgumentError(f"a detector config must be a mapping, got {values!r}")
        checked = checked_kwargs(cls, values, "detector config")
        if "encoder" in checked and not isinstance(checked["encoder"], ViTConfig):
            checked["encoder"] = _encoder_from_dict(checked["encoder"])
        return cls(**checked)


def test_time_mirrors(horizontal: bool, vertical: bool) -> tuple[tuple[bool, bool], ...]:
    """The inference passes as (left-right mirrored, upside down) pairs, the plain image first: one pass without
    test-time flips, two with one of them, four with both (``DetectorConfig.test_time_flip`` and
    ``test_time_vertical_flip``)."""
    horizontal_passes = (False, True) if horizontal else (False,)
    vertical_passes = (False, True) if vertical else (False,)
    return tuple((mirror_x, mirror_y) for mirror_y in vertical_passes for mirror_x in horizontal_passes)


def _encoder_from_dict(values: Any) -> ViTConfig:
    if not isinstance(values, dict):
        raise InvalidArgumentError(f"detector config encoder must be a ViT config mapping, got {values!r}")
    try:
        return ViTConfig.from_dict(values)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"detector config encoder: {exc.message}") from None
