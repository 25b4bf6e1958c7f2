"""``caries-mim finetune``: train the caries detector on annotated radiographs, from a MIM encoder or from scratch.

Run folder (``--out RUN``)::

    config.yaml          the resolved config (defaults + file + --set), what --resume starts from
    checkpoint.pt        last full training state (model, optimizer, schedule, scaler, RNG, data position, best)
    model.cmpkg          the model package of the best validation AP50 so far, with its operating threshold
    metrics.jsonl        one line per logged interval (``split: train``) and per validation (``split: val``)
    tensorboard/         scalars and validation overlays
    overlays/            step_NNNNNN.png: validation images, true boxes green, predictions at the threshold
    decode_cache/        decoded pixels (unless data.cache_dir points elsewhere)
    summary.json         written when the run completes

Validation runs every ``eval.every`` steps on the whole validation set through the inference path
(:func:`caries_mim.detection.detect`: the same resize, sliding window and box mapping as the model package), so the
AP50 that picks the best checkpoint is the AP50 the package will have. Each validation also chooses the operating
threshold for ``eval.target_sensitivity`` and writes a checkpoint; training stops early after ``eval.patience``
validations without a better AP50.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from caries_mim import __version__
from caries_mim.atomic_files import atomic_path
from caries_mim.data import (
    AnnotationSet,
    DecodeCache,
    DetectionDataset,
    DetectionRecord,
    ResumableEpochSampler,
    category_repeat_factors,
    detection_train_transform,
    image_repeat_factors,
    load_annotations,
)
from caries_mim.data.indexing import IndexedImage
from caries_mim.data.records import CATEGORICAL_BOX_ATTRIBUTES, box_categories
from caries_mim.data.transforms import DETECTION_AUGMENTATIONS
from caries_mim.detection import CariesDetector, DetectorConfig, build_detector, detect
from caries_mim.detection.anchors import anchor_shapes_for_boxes
from caries_mim.errors import (
    CariesMimError,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidDatasetError,
)
from caries_mim.io import DEFAULT_ALLOWED_MODALITIES, ReadOptions
from caries_mim.metrics import EvaluatedImage, coco_metrics, froc, select_operating_point
from caries_mim.models import ViTConfig, load_encoder
from caries_mim.package import ModelPackage, read_package, save_package
from caries_mim.visualization import draw_predictions_and_truth, tile
from pipelines import config as configs
from pipelines import distributed
from pipelines.distributed import Distributed
from pipelines.engine import LoopPosition, TrainingEngine
from pipelines.run_folder import (
    append_metrics,
    finish_summary,
    prepare_run_folder,
    read_resumable_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from pipelines.training import (
    TrainConfig,
    WarmupCosine,
    capture_rng,
    configure_threads,
    endless_batches,
    freeze_encoder_layers,
    layer_decay_param_groups,
    resolve_precision,
    restore_optimization,
    resumable_loader,
    weight_average,
)

log = logging.getLogger("caries_mim.finetune")

CHECKPOINT_FORMAT = "caries-mim-finetune-checkpoint"
CHECKPOINT_VERSION = 1
PACKAGE_NAME = "model.cmpkg"
#: Config sections that must not change when resuming (they decide parameter shapes, the optimizer's groups or what
#: the data means).
FROZEN_ON_RESUME = ("model", "detector", "data.label_fraction", "data.seed", "optim.frozen_layers")


@dataclass(frozen=True)
class ModelConfig:
    """The encoder. With ``encoder`` (``--encoder``) its architecture comes from that file and ``size``,
    ``patch_size`` and ``depth`` are not used."""

    #: An ``encoder.pt`` from ``caries-mim pretrain``; null trains from a random initialization.
    encoder: str | None = None
    #: Take only the architecture of ``encoder`` and start from random weights: the from-scratch arm of a
    #: comparison, with exactly the pretrained model's shape.
    reinitialize: bool = False
    size: str = "vit_small"
    patch_size: int = 16
    depth: int | None = None
    drop_path_rate: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    workers: int = 2
    #: Decoded-pixel cache folder; null = RUN/decode_cache. Share one folder between runs on the same data.
    cache_dir: str | None = None
    modalities: list[str] = field(default_factory=lambda: sorted(DEFAULT_ALLOWED_MODALITIES))
    allow_non_dicom: bool = True
    #: Fraction of the training images used (label-efficiency studies); a seeded subset, nested across fractions.
    label_fraction: float = 1.0
    #: Seed of that subset (independent of train.seed, so runs with other training seeds share the images).
    seed: int = 0
    #: Chance that a training patch is drawn around a lesion (the rest uniformly); see detection_train_transform.
    positive_fraction: float = 0.5
    #: Boxes cut by a crop or affine below this fraction of their area are dropped from that sample.
    min_visibility: float = 0.3
    #: Training augmentation preset (caries_mim.data.transforms.detection_train_transform): standard, or sensor
    #: (wider scale, blur, coarser grids, noise and edge enhancement: for radiographs from other sensors).
    augmentation: str = "standard"
    #: Chance that a training patch is also turned upside down (see detection_train_transform).
    vertical_flip: float = 0.0
    #: Megabytes of training images kept at the working scale in memory, per training process, split evenly over
    #: its loader workers (each keeps its own): later crops of a kept image skip the cache read and the resize.
    #: 0: keep none.
    memo_mb: float = 1024.0
    #: Repeat factor sampling (LVIS): images holding a class found in fewer than this fraction of the training
    #: images are drawn more often, by sqrt(threshold / fraction) (caries_mim.data.repeat_factors), and a positive
    #: patch holds a lesion chosen in proportion to its category's factor. null: off.
    repeat_threshold: float | None = None
    #: An annotation attribute that splits each class into categories for that sampling (e.g. surface: an occlusal
    #: caries is then as rare as it is, not as common as caries); boxes without it form their class's own category.
    #: One of caries_mim.data.records.CATEGORICAL_BOX_ATTRIBUTES; null: classes alone.
    repeat_attribute: str | None = None
    #: Leave the anchors on the annotations' ignore regions out of the detector's loss (COCO iscrowd boxes, the
    #: synthetic generator's lesions under its visibility floor): not findings, but penalizing a detection there
    #: teaches the detector to overlook the faintest real lesions. false: they are background like any other pixel.
    ignore_regions: bool = False

    def __post_init__(self) -> None:
        if self.repeat_threshold is not None and not 0.0 < self.repeat_threshold <= 1.0:
            raise ValueError(f"repeat_threshold must be in (0, 1] or null, got {self.repeat_threshold}")
        if self.repeat_attribute is not None:
            if self.repeat_attribute not in CATEGORICAL_BOX_ATTRIBUTES:
                raise ValueError(
                    f"repeat_attribute must be one of {', '.join(CATEGORICAL_BOX_ATTRIBUTES)} or null, "
                    f"got {self.repeat_attribute!r}"
                )
            if self.repeat_threshold is None:
                raise ValueError("repeat_attribute needs repeat_threshold: it refines repeat factor sampling")
        if not 0.0 <= self.memo_mb < math.inf:
            raise ValueError(f"memo_mb must be a finite number >= 0, got {self.memo_mb}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not all(0.0 <= value <= 1.0 for value in (self.positive_fraction, self.min_visibility, self.vertical_flip)):
            raise ValueError("positive_fraction, min_visibility and vertical_flip must be in [0, 1]")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.augmentation not in DETECTION_AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {', '.join(DETECTION_AUGMENTATIONS)}, got {self.augmentation!r}"
            )


@dataclass(frozen=True)
class OptimConfig:
    #: Patches per process per micro-batch; the effective batch is batch_size * accumulate * processes.
    batch_size: int = 8
    accumulate: int = 1
    #: Peak learning rate of the pyramid and heads; encoder block i learns at lr * layer_decay ** (depth - i).
    lr: float = 2e-4
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    #: Max gradient norm; null = no clipping.
    clip_grad: float | None = 1.0
    #: Encoder layers kept at their pretrained weights, in layer-decay numbering (0: none; 1: the patch embedding;
    #: 1 + i: it and blocks 0..i-1; depth + 1: the whole encoder but its final norm).
    frozen_layers: int = 0
    #: Decay of an exponential moving average of the weights, which validation, the overlays and the package use
    #: instead of the last weights (:func:`pipelines.training.weight_average`); null: none.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("batch_size and accumulate must be >= 1")
        if self.lr <= 0 or not 0.0 < self.layer_decay <= 1.0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 < layer_decay <= 1, weight_decay >= 0, warmup_steps >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or null, got {self.clip_grad}")
        if self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0, got {self.frozen_layers}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")


@dataclass(frozen=True)
class EvalConfig:
    #: Optimizer steps between validations (each also writes a checkpoint); the last step always validates.
    every: int = 200
    #: Validations without a better AP50 before training stops; null = never stop early.
    patience: int | None = None
    #: Lesion-level sensitivity the operating threshold is chosen for on the validation set.
    target_sensitivity: float = 0.9
    #: Validation images drawn in each overlay picture.
    overlays: int = 6

    def __post_init__(self) -> None:
        if self.every < 1 or self.overlays < 0:
            raise ValueError("every must be >= 1 and overlays >= 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or null, got {self.patience}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: :class:`~caries_mim.detection.DetectorConfig` fields (image_size, roi_size, pyramid_channels, anchors, loss,
    #: box selection); the encoder and the class names are filled in from the model section and the data.
    detector: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        reserved = {"encoder", "class_names"} & set(self.detector)
        if reserved:
            keys = ", ".join(f"detector.{key}" for key in sorted(reserved))
            raise ValueError(f"{keys}: set from the model section and the training data, not in detector")


def load_finetune_config(
    config: str | None, overrides: list[str] | None, *, base: dict[str, Any] | None = None
) -> FinetuneConfig:
    """Defaults <- ``base`` (a resumed run's config.yaml) <- ``config`` file or shipped name <- ``--set`` overrides."""
    built, origin = configs.load_layered(FinetuneConfig, "finetune", config, overrides, base)
    try:
        # Two placeholder classes: the data's are not read yet, and some options (class_scores) need two.
        settings = detector_config(built, ("caries", "deep_caries"), encoder_architecture(built))
    except InvalidArgumentError as exc:
        raise InvalidConfigError(f"detector: {exc.message} ({origin})") from None
    frozen, depth = built.optim.frozen_layers, settings.encoder.depth
    if frozen and settings.backbone != "vit":
        raise InvalidConfigError(f"optim.frozen_layers: the {settings.backbone} backbone has no ViT encoder to freeze")
    if frozen > depth + 1:
        raise InvalidConfigError(
            f"optim.frozen_layers must be at most {depth + 1} (the patch embedding and the encoder's {depth} blocks), "
            f"got {frozen}"
        )
    return built


def encoder_architecture(config: FinetuneConfig) -> ViTConfig:
    """The encoder's architecture: from ``model.encoder`` when given (checked and read once here), else named."""
    if config.model.encoder is not None:
        architecture = load_encoder(config.model.encoder).encoder.config
        if architecture.in_channels != 1:
            raise InvalidConfigError(
                f"model.encoder: {config.model.encoder} takes {architecture.in_channels}-channel images; "
                "radiographs have one channel"
            )
        return architecture
    depth = {} if config.model.depth is None else {"depth": config.model.depth}
    try:
        return ViTConfig.named(config.model.size, patch_size=config.model.patch_size, **depth)
    except InvalidArgumentError as exc:
        raise InvalidConfigError(f"model: {exc.message}") from None


#: ``detector.spacing_mm: median``: the training images' median spacing (nnDetection's rule).
MEDIAN = "median"
#: ``detector.anchor_shapes: auto``: shapes from the training boxes at the working scale.
AUTO = "auto"


@dataclass(frozen=True)
class DataStatistics:
    """What the data-dependent detector settings are computed from.

    Attributes:
        spacings_mm: mean (row, column) spacing of each training image that has one.
        long_sides_mm: physical long side of those images.
        boxes: per training image, (its spacing or None, its (height, width), its boxes (N, 4) xyxy in pixels).
    """

    spacings_mm: list[float]
    long_sides_mm: list[float]
    boxes: list[tuple[tuple[float, float] | None, tuple[int, int], np.ndarray]]


def data_statistics(dataset: DetectionDataset) -> DataStatistics:
    """Spacings and boxes of a dataset's images (a validated dataset's, without decoding anything again)."""
    spacings, long_sides, boxes = [], [], []
    for record in dataset.records:
        image = dataset.decoded.get(record.image_path)
        if image is None:  # a dataset built without validation: decode (through the cache) to learn its size
            radiograph = dataset.load(record.image_path)
            image = IndexedImage(record.image_path, radiograph.height, radiograph.width, radiograph.spacing_mm)
        spacing = image.spacing_mm
        if spacing is not None:
            spacings.append(0.5 * (spacing[0] + spacing[1]))
            long_sides.append(max(image.height * spacing[0], image.width * spacing[1]))
        boxes.append((spacing, (image.height, image.width), record.boxes))
    return DataStatistics(spacings, long_sides, boxes)


def detector_config(
    config: FinetuneConfig,
    class_names: Sequence[str],
    encoder: ViTConfig,
    statistics: DataStatistics | None = None,
) -> DetectorConfig:
    """The :class:`DetectorConfig` of a run: the detector section, the encoder (with the run's drop-path) and the
    training data's classes.

    ``detector.spacing_mm: median`` becomes the training images' median spacing (and ``assumed_long_side_mm``, when
    not given, their median long side in mm); ``detector.anchor_shapes: auto`` becomes shapes fitted to the
    training boxes at the working scale (:func:`~caries_mim.detection.anchors.anchor_shapes_for_boxes`). Without
    ``statistics`` (checking a config before any data is read) placeholders stand in for both.

    Raises:
        InvalidDatasetError: ``median`` with no training image that has a spacing.
    """
    section = dict(config.detector)
    if section.get("spacing_mm") == MEDIAN:
        if statistics is None:
            section["spacing_mm"] = 0.1
        elif not statistics.spacings_mm:
            raise InvalidDatasetError(
                "detector.spacing_mm: median needs training images with a pixel spacing, and none has one: "
                "set the working spacing in mm (e.g. detector.spacing_mm=0.05)"
            )
        else:
            section["spacing_mm"] = round(float(np.median(statistics.spacings_mm)), 5)
            section.setdefault("assumed_long_side_mm", round(float(np.median(statistics.long_sides_mm)), 2))
    auto_anchors = section.get("anchor_shapes") == AUTO
    if auto_anchors:
        section.pop("anchor_shapes")
    encoder_values = {**encoder.to_dict(), "drop_path_rate": config.model.drop_path_rate}
    built = DetectorConfig.from_dict({**section, "encoder": encoder_values, "class_names": list(class_names)})
    if statistics is not None:
        widths, heights = _model_box_sizes(built, statistics)
        if auto_anchors:
            built = dataclasses.replace(
                built, anchor_shapes=anchor_shapes_for_boxes(widths, heights, built.pyramid_levels)
            )
        _warn_if_boxes_vanish(built, widths, heights)
    return built


def _warn_if_boxes_vanish(config: DetectorConfig, widths: np.ndarray, heights: np.ndarray) -> None:
    """Say so when the model scale makes most lesions smaller than the finest pyramid stride."""
    if widths.size == 0:
        return
    median = float(np.median(np.sqrt(widths * heights)))
    finest = config.strides[0]
    if median < finest:
        log.warning(
            "at this model scale the median lesion box is %.1f px, under the finest pyramid stride (%d px): "
            "lesions that small are hard to find; use a finer detector.spacing_mm or a smaller patch size",
            median,
            finest,
        )


def _model_box_sizes(config: DetectorConfig, statistics: DataStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights of the training boxes in model pixels (after the working-scale resize)."""
    widths, heights = [], []
    rule = config.scale_rule
    for spacing, (height, width), boxes in statistics.boxes:
        if len(boxes) == 0:
            continue
        factor = rule.factor(height, width, spacing)
        widths.append((boxes[:, 2] - boxes[:, 0]) * factor)
        heights.append((boxes[:, 3] - boxes[:, 1]) * factor)
    if not widths:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(widths), np.concatenate(heights)


def label_subset(records: Sequence[DetectionRecord], fraction: float, seed: int) -> list[DetectionRecord]:
    """The first ``ceil(fraction * n)`` records (at least one) of a seeded permutation of ``records``.

    The permutation depends only on ``seed`` and the number of records, so subsets are nested: the 10% subset
    contains the 5% one, and a study's curve measures more labels, not other images."""
    if fraction >= 1.0:
        return list(records)
    order = np.random.default_rng(seed).permutation(len(records))
    # The tolerance keeps a product like 0.07 * 100 = 7.000000000000001 at 7 images, not 8.
    keep = max(1, math.ceil(fraction * len(records) - 1e-9))
    return [records[index] for index in sorted(order[:keep])]


def data_fingerprint(files: Sequence[Path], records: Sequence[DetectionRecord]) -> str:
    """sha256 over the annotation files' bytes and the images used (names and boxes): what a model learned from."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    for record in records:
        digest.update(str(record.image_path.name).encode())
        digest.update(np.ascontiguousarray(record.boxes, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(record.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _load_sets(files: Sequence[Path], what: str) -> list[AnnotationSet]:
    if not files:
        raise InvalidArgumentError(f"--{what}: give at least one annotation file")
    return [load_annotations(path) for path in files]


def _merged_records(sets: Sequence[AnnotationSet], classes: Sequence[str], what: str) -> list[DetectionRecord]:
    """Records of several annotation sets with labels re-indexed into ``classes`` (by name)."""
    records: list[DetectionRecord] = []
    for annotation_set in sets:
        unknown = annotation_set.classes_outside(classes)
        if unknown:
            raise InvalidDatasetError(
                f"--{what}: class(es) {', '.join(unknown)} are not in the training classes {', '.join(classes)}"
            )
        to_training = annotation_set.label_map(classes)
        records.extend(
            dataclasses.replace(record, labels=to_training[record.labels]) for record in annotation_set.records
        )
    return records


def _category_name(category: int | tuple[int, str | None], classes: Sequence[str]) -> str:
    """``caries`` for a class index, ``caries/occlusal`` for a (class, attribute value) pair."""
    if isinstance(category, tuple):
        label, value = category
        return f"{classes[label]}/{value if value is not None else '-'}"
    return classes[category]


def _training_classes(sets: Sequence[AnnotationSet]) -> tuple[str, ...]:
    """Class names in first-seen order across the training files (a class listed by any file counts)."""
    classes: list[str] = []
    for annotation_set in sets:
        classes.extend(name for name in annotation_set.classes if name not in classes)
    if not classes:
        raise InvalidDatasetError("--train: the annotation files define no classes")
    return tuple(classes)


@dataclass
class TrainingState(LoopPosition):
    """What decides the rest of a run besides the weights: the loop's position and the best validation so far."""

    best_ap50: float | None = None
    best_step: int | None = None
    validations_since_best: int = 0


def run_finetune(
    train: Sequence[Path],
    val: Sequence[Path],
    out: Path,
    config: FinetuneConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a detector; returns the summary (also written to RUN/summary.json on rank 0).

    Raises:
        InvalidConfigError: ``optim.frozen_layers`` without a pretrained encoder to keep (none given, or
            ``model.reinitialize``): frozen random weights would stay random.
    """
    if config.optim.frozen_layers and (config.model.encoder is None or config.model.reinitialize):
        raise InvalidConfigError(
            "optim.frozen_layers: a randomly initialized encoder would stay random; give a pretrained encoder "
            "(--encoder) or set optim.frozen_layers=0"
        )
    context = distributed.start(config.train.device)
    try:
        return _Finetuning(list(train), list(val), out, config, context, resume=resume, progress=progress).run()
    finally:
        distributed.stop(context)


class _Finetuning:
    def __init__(
        self,
        train_files: list[Path],
        val_files: list[Path],
        out: Path,
        config: FinetuneConfig,
        context: Distributed,
        *,
        resume: bool,
        progress: bool,
    ) -> None:
        self.train_files = train_files
        self.val_files = val_files
        self.out = out
        self.config = config
        self.context = context
        self.device = context.device
        self.resume = resume
        self.progress = progress and context.is_main
        self.precision = resolve_precision(config.train.precision, self.device)
        self.checkpoint_path = out / "checkpoint.pt"

    def _prepare_folder(self) -> None:
        # A package without a checkpoint is someone's model (a run never writes one before its first
        # checkpoint), so it is not overwritten either.
        prepare_run_folder(
            self.out,
            resume=self.resume,
            outputs=("checkpoint.pt", PACKAGE_NAME),
            kind="fine-tuning",
            is_main=self.context.is_main,
        )
        distributed.barrier(self.context)

    def _datasets(self, encoder: ViTConfig) -> tuple[DetectionDataset, DetectionDataset, DetectorConfig]:
        config = self.config
        train_sets = _load_sets(self.train_files, "train")
        val_sets = _load_sets(self.val_files, "val")
        classes = _training_classes(train_sets)
        all_train = _merged_records(train_sets, classes, "train")
        train_records = label_subset(all_train, config.data.label_fraction, config.data.seed)
        val_records = _merged_records(val_sets, classes, "val")
        if not any(len(record.boxes) for record in train_records):
            raise InvalidDatasetError(
                f"--train: none of the {len(train_records)} training image(s) has a lesion box; nothing to learn"
            )
        if not any(len(record.boxes) for record in val_records):
            raise InvalidDatasetError("--val: no validation image has a lesion box, so AP50 is undefined")
        try:  # with the data's classes, before minutes of decoding
            detector_config(config, classes, encoder)
        except InvalidArgumentError as exc:
            raise InvalidConfigError(f"detector: {exc.message} (training classes: {', '.join(classes)})") from None
        data = config.data
        cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else self.out / "decode_cache"
        cache = DecodeCache(cache_dir)
        options = ReadOptions(allowed_modalities=frozenset(data.modalities), allow_non_dicom=data.allow_non_dicom)
        with distributed.main_first(self.context):
            train_set = DetectionDataset(
                train_records,
                cache=cache,
                options=options,
                progress=self.progress,
                memo_mb=data.memo_mb / max(data.workers, 1),
                ignore_regions=data.ignore_regions,
            )
            val_set = DetectionDataset(val_records, cache=cache, options=options, progress=self.progress)
        detector = detector_config(config, classes, encoder, data_statistics(train_set))
        train_set.transform = detection_train_transform(
            detector.image_size,
            min_visibility=data.min_visibility,
            crop_size=detector.roi_size,
            positive_fraction=data.positive_fraction,
            rule=detector.scale_rule,
            augmentation=data.augmentation,
            vertical_flip=data.vertical_flip,
        )
        self.fingerprint = data_fingerprint(self.train_files, train_set.records)
        self.all_train_images = len(all_train)
        return train_set, val_set, detector

    def _detector(self, config: DetectorConfig) -> CariesDetector:
        encoder_path = None if self.config.model.reinitialize else self.config.model.encoder
        detector, report = build_detector(config, encoder_path)
        if self.context.is_main:
            if config.backbone != "vit":
                log.info("backbone: %s (CNN yardstick), random initialization", config.backbone)
            elif encoder_path is None:
                log.info("encoder: random initialization (%d tensors)", len(report.missing))
            else:
                log.info("encoder from %s: %s", encoder_path, report.summary())
        return detector

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()  # a time limit counts the start-up too
        config, context = self.config, self.context
        self._prepare_folder()
        threads = configure_threads(self.device, context.local_world_size, config.train.threads)
        torch.manual_seed(config.train.seed * 1000 + context.rank)
        train_set, val_set, detector_settings = self._datasets(encoder_architecture(config))
        classes = detector_settings.class_names
        # Same initial weights on every rank: seeded identically for the build, then per rank for drop-path.
        torch.manual_seed(config.train.seed)
        detector = self._detector(detector_settings).to(self.device)
        torch.manual_seed(config.train.seed * 1000 + context.rank)
        frozen = freeze_encoder_layers(detector, config.optim.frozen_layers, detector.config.encoder.depth)
        if frozen and context.is_main:
            log.info("encoder: its first %d layer(s) frozen (%d tensors)", config.optim.frozen_layers, frozen)
        model: torch.nn.Module = detector
        if context.enabled:
            model = DistributedDataParallel(
                detector, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.train.compile:
            model = torch.compile(model)

        optim = config.optim
        optimizer = torch.optim.AdamW(
            layer_decay_param_groups(
                detector,
                base_lr=optim.lr,
                weight_decay=optim.weight_decay,
                layer_decay=optim.layer_decay,
                depth=detector.config.encoder.depth,
            ),
            lr=optim.lr,
            betas=optim.betas,
            fused=self.device.type in ("cpu", "cuda"),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(config.train.steps, optim.warmup_steps, optim.min_lr_ratio)
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        global_batch = optim.batch_size * context.world_size
        # Patches, not images, are the training samples: a set smaller than one batch (a 5% label fraction) is
        # repeated so that an epoch holds a whole batch; every repetition draws other patches and augmentations.
        repeats = math.ceil(global_batch / len(train_set))
        epoch_set = RepeatedDataset(train_set, repeats) if repeats > 1 else train_set
        if repeats > 1 and context.is_main:
            log.info("%d training image(s) repeated %dx to fill a batch of %d", len(train_set), repeats, global_batch)
        factors = None
        if config.data.repeat_threshold is not None:
            categories = [box_categories(record, config.data.repeat_attribute) for record in train_set.records]
            per_category = category_repeat_factors(categories, config.data.repeat_threshold)
            train_set.box_weights = [[per_category[category] for category in image] for image in categories]
            factors = image_repeat_factors(categories, per_category)
            if context.is_main:
                log.info(
                    "repeat factor sampling (threshold %g, categories: class%s): %d of %d training image(s) "
                    "over-sampled, up to %.2fx; factors %s",
                    config.data.repeat_threshold,
                    f" x {config.data.repeat_attribute}" if config.data.repeat_attribute else "",
                    sum(factor > 1.0 for factor in factors),
                    len(train_set),
                    max(factors),
                    ", ".join(
                        f"{_category_name(category, classes)} {factor:.2f}"
                        for category, factor in sorted(per_category.items(), key=str)
                    ),
                )
            factors = factors * repeats
        if config.data.ignore_regions and context.is_main:
            regions = [len(record.ignore_boxes) for record in train_set.records]
            log.info(
                "ignore regions: %d in %d training image(s), left out of the classification loss",
                sum(regions),
                sum(count > 0 for count in regions),
            )
        sampler = ResumableEpochSampler(
            len(epoch_set),
            batch_size=optim.batch_size,
            rank=context.rank,
            world_size=context.world_size,
            seed=config.train.seed,
            repeat_factors=factors,
        )
        average = None if optim.ema_decay is None else weight_average(detector, optim.ema_decay)
        state = TrainingState()
        if self.resume:
            state = self._load_checkpoint(detector, optimizer, scheduler, scaler, average)
        elif context.is_main:
            configs.write_yaml(self.out / "config.yaml", configs.to_dict(config))
        if context.is_main:
            log.info(
                "fine-tuning %s on %d training image(s) (%d%% of %d), %d validation image(s), classes %s, %s x %d "
                "process(es), %s, %d thread(s)",
                "from scratch"
                if config.model.reinitialize or not config.model.encoder
                else f"from {config.model.encoder}",
                len(train_set),
                round(100 * config.data.label_fraction),
                self.all_train_images,
                len(val_set),
                ", ".join(classes),
                self.device,
                context.world_size,
                self.precision.name,
                threads,
            )
        loop = _Loop(
            self, epoch_set, val_set, sampler, detector, model, optimizer, scheduler, scaler, state, average, started
        )
        return loop.run()

    def _load_checkpoint(self, detector, optimizer, scheduler, scaler, average) -> TrainingState:
        payload = read_resumable_checkpoint(
            self.checkpoint_path,
            checkpoint_format=CHECKPOINT_FORMAT,
            version=CHECKPOINT_VERSION,
            kind="fine-tuning",
            config=self.config,
            frozen=FROZEN_ON_RESUME,
            frozen_reason="these decide the model's shapes or its training images (start a new run)",
        )
        detector.load_state_dict(payload["detector"])
        if (average is None) != (payload.get("weight_average") is None):
            raise InvalidConfigError(
                f"optim.ema_decay is {'null' if average is None else self.config.optim.ema_decay} but "
                f"{self.checkpoint_path} was trained "
                f"{'without' if average is not None else 'with'} a weight average: resume with the setting it was "
                "trained with"
            )
        if average is not None:
            average.load_state_dict(payload["weight_average"])
        state = TrainingState(**payload["state"])
        restore_optimization(
            payload,
            optimizer,
            scheduler,
            scaler,
            context=self.context,
            position=state,
            batch_size=self.config.optim.batch_size,
        )
        if state.best_step is not None and _package_step(self.out / PACKAGE_NAME) != state.best_step:
            # Killed between a checkpoint and the package of its new best: the next validation writes one.
            log.warning(
                "%s does not hold the best step %d; the next validation writes it", PACKAGE_NAME, state.best_step
            )
            state.best_ap50 = state.best_step = None
        if self.context.is_main:
            truncate_metrics(self.out / "metrics.jsonl", state.step)
            log.info("resumed from %s at step %d", self.checkpoint_path, state.step)
        return state


class RepeatedDataset(torch.utils.data.Dataset):
    """``dataset`` ``times`` over; keys are indices or ``(index, augmentation_seed)`` as the sampler yields."""

    def __init__(self, dataset: DetectionDataset, times: int) -> None:
        self.dataset = dataset
        self.times = times
        self.records = dataset.records

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index %= len(self.dataset)
        return self.dataset[index if seed is None else (index, seed)]


def _package_step(path: Path) -> int | None:
    """The training step a run's model package was saved at, or None when it is missing or unreadable."""
    try:
        return read_package(path).provenance.get("step")
    except CariesMimError:
        return None


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "targets": [
            {"boxes": item["boxes"], "labels": item["labels"], "ignore_boxes": item["ignore_boxes"]} for item in items
        ],
    }


class _Loop:
    """What fine-tuning feeds the training engine (:mod:`pipelines.engine`): the detector's losses, validations every
    ``eval.every`` steps and at the last (each a checkpoint), the weight average, and everything it writes (rank 0):
    metrics, TensorBoard, overlays, checkpoints, the model package."""

    def __init__(
        self,
        run: _Finetuning,
        train_set: DetectionDataset,
        val_set: DetectionDataset,
        sampler: ResumableEpochSampler,
        detector: CariesDetector,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler,
        state: TrainingState,
        average: torch.optim.swa_utils.AveragedModel | None,
        started: float,
    ) -> None:
        self.run_state = run
        self.config = run.config
        self.context = run.context
        self.device = run.device
        self.out = run.out
        self.train_set = train_set
        self.val_set = val_set
        self.sampler = sampler
        self.detector = detector
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.state = state
        self.average = average
        #: What validation, the overlays and the package use: the weight average when there is one.
        self.evaluated: CariesDetector = detector if average is None else average.module
        self.loader = resumable_loader(
            train_set,
            sampler,
            batch_size=self.config.optim.batch_size,
            workers=self.config.data.workers,
            device=self.device,
            collate_fn=_collate,
        )
        self.writer = (
            SummaryWriter(str(self.out / "tensorboard"), purge_step=state.step or None)
            if self.context.is_main
            else None
        )
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_validation: dict[str, Any] | None = None
        self.pending_package: tuple[Any, dict[str, Any]] | None = None
        self.engine = TrainingEngine.for_run(
            run,
            model=model,
            module=detector,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            batches=endless_batches(self.loader, sampler, state),
            position=state,
            lr_key="optim.lr",
            description="finetune",
            started=started,
        )

    def run(self) -> dict[str, Any]:
        try:
            outcome = self.engine.run(self)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._finish(outcome.seconds, outcome.steps_run, outcome.stopped_early)

    # -- the engine's task ----------------------------------------------------------------------------------

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        # Targets stay on the host: the detector checks them there and then moves them (on a GPU a check of a
        # device tensor is a host synchronization per image).
        return self.model(images, batch["targets"])

    def after_update(self) -> None:
        if self.average is not None:
            self.average.update_parameters(self.detector)

    def is_milestone(self, step: int, last: bool) -> bool:
        return step % self.config.eval.every == 0 or last

    def after_step(self, step: int, *, last: bool, milestone: bool, stopping: bool, bar) -> bool:
        stopped_early = self._validate(bar) if milestone else False
        if milestone or stopping:
            self._save_checkpoint()
        if self.pending_package is not None:
            self._save_package(*self.pending_package)
            self.pending_package = None
        return stopped_early

    def log(self, means: dict[str, float], images_per_second: float, lr: float, grad_norm: float | None) -> None:
        step = self.state.step
        total = means["total"]
        if self.first_loss is None:
            self.first_loss = total
        self.last_loss = total
        row = {"split": "train", "step": step, "epoch": self.state.epoch, "lr": lr, "img_s": images_per_second}
        row.update({f"loss_{name}": value for name, value in means.items()})
        for name, value in means.items():
            self.writer.add_scalar(f"train/loss_{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_second", images_per_second, step)
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        append_metrics(self.out / "metrics.jsonl", row)

    # -- validation -----------------------------------------------------------------------------------------

    def _predict_validation(self) -> list[EvaluatedImage]:
        self.evaluated.eval()
        evaluated = []
        with torch.inference_mode(), self.run_state.precision.autocast(self.device):
            for index, record in enumerate(self.val_set.records):
                radiograph = self.val_set.load(record.image_path)
                found = detect(self.evaluated, radiograph.pixels, radiograph.spacing_mm)
                evaluated.append(
                    EvaluatedImage(
                        image_id=index,
                        gt_boxes=record.boxes,
                        gt_labels=record.labels,
                        pred_boxes=found.boxes,
                        pred_labels=found.labels,
                        pred_scores=found.scores,
                    )
                )
        self.detector.train()
        return evaluated

    def _validate(self, bar) -> bool:
        """Validate on rank 0 (the others wait); returns whether training should stop early (same on all ranks)."""
        stop = False
        if self.context.is_main:
            started = time.perf_counter()
            bar.set_description("finetune (validating)")
            evaluated = self._predict_validation()
            classes = self.detector.config.class_names
            metrics = coco_metrics(evaluated, classes)
            lesion_froc = froc(evaluated)
            point = select_operating_point(evaluated, target_sensitivity=self.config.eval.target_sensitivity)
            ap50 = float(metrics.ap50)
            step = self.state.step
            row = {
                "split": "val",
                "step": step,
                "ap50": ap50,
                "ap": float(metrics.ap),
                "ap50_per_class": {name: per_class.ap50 for name, per_class in metrics.per_class.items()},
                "froc": lesion_froc.score,
                "threshold": point.threshold,
                "sensitivity_at_threshold": point.sensitivity,
                "seconds": round(time.perf_counter() - started, 2),
            }
            append_metrics(self.out / "metrics.jsonl", row)
            self.writer.add_scalar("val/ap50", ap50, step)
            self.writer.add_scalar("val/ap", float(metrics.ap), step)
            self.writer.add_scalar("val/froc", lesion_froc.score, step)
            for name, per_class in metrics.per_class.items():
                if per_class.ap50 is not None:
                    self.writer.add_scalar(f"val/ap50_{name}", per_class.ap50, step)
            self._write_overlays(evaluated, point.threshold, step)
            improved = self.state.best_ap50 is None or ap50 > self.state.best_ap50
            if improved:
                self.state.best_ap50, self.state.best_step = ap50, step
                self.state.validations_since_best = 0
                # Written after this validation's checkpoint (see run()): a kill in between leaves a checkpoint
                # whose best step has no package yet, which a resume detects and repairs.
                self.pending_package = (point, row)
            else:
                self.state.validations_since_best += 1
            patience = self.config.eval.patience
            stop = patience is not None and self.state.validations_since_best >= patience
            self.last_validation = row
            bar.set_description("finetune")
            bar.write(
                f"step {step}: val AP50 {ap50:.3f} (best {self.state.best_ap50:.3f} at step {self.state.best_step}), "
                f"FROC {lesion_froc.score:.3f}, threshold {point.threshold:.3f} for sensitivity "
                f"{point.sensitivity if point.sensitivity is not None else float('nan'):.2f}"
                + (" - stopping early" if stop else ""),
                file=sys.stderr,  # stdout carries only the run's JSON summary
            )
        stop = distributed.any_rank(stop, self.context)
        distributed.barrier(self.context)
        return stop

    def _write_overlays(self, evaluated: list[EvaluatedImage], threshold: float, step: int) -> None:
        count = min(self.config.eval.overlays, len(evaluated))
        if count == 0:
            return
        # Images with lesions first, in file order: the same images at every validation, comparable over steps.
        order = sorted(range(len(evaluated)), key=lambda index: (len(evaluated[index].gt_boxes) == 0, index))
        names = self.detector.config.class_names
        cells = [
            draw_predictions_and_truth(
                self.val_set.load(self.val_set.records[index].image_path).pixels, evaluated[index], names, threshold
            )
            for index in order[:count]
        ]
        grid = tile(cells, columns=min(3, count), cell_width=480)
        folder = self.out / "overlays"
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / f"step_{step:06d}.png") as temporary:
            grid.save(temporary, format="PNG")
        self.writer.add_image("val/overlays", np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def _save_package(self, point, row: dict[str, Any]) -> None:
        package = ModelPackage.from_detector(
            self.evaluated,
            point.threshold,
            target_sensitivity=self.config.eval.target_sensitivity,
            version=__version__,
            provenance={
                "trained_by": f"caries-mim {__version__} finetune",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": configs.to_dict(self.config),
                "train_files": [Path(path).name for path in self.run_state.train_files],
                "train_images": len(self.train_set.records),
                "data_fingerprint": self.run_state.fingerprint,
                "step": self.state.step,
                "validation": {key: value for key, value in row.items() if key not in ("split", "seconds")},
            },
        )
        save_package(package, self.out / PACKAGE_NAME)

    def _save_checkpoint(self) -> None:
        rng_states = distributed.gather_objects(capture_rng(self.device), self.context)
        if not self.context.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "detector": self.detector.state_dict(),
            "weight_average": None if self.average is None else self.average.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "state": dataclasses.asdict(self.state),
            "global_batch": self.config.optim.batch_size * self.context.world_size,
            "config": configs.to_dict(self.config),
        }
        save_checkpoint(self.run_state.checkpoint_path, payload)

    def _finish(self, seconds: float, steps_run: int, stopped_early: bool) -> dict[str, Any]:
        config = self.config
        images = steps_run * config.optim.batch_size * config.optim.accumulate * self.context.world_size
        summary = {
            "out": str(self.out),
            "package": str(self.out / PACKAGE_NAME),
            "encoder": None if config.model.reinitialize else config.model.encoder,
            "label_fraction": config.data.label_fraction,
            "train_images": len(self.train_set.records),
            "val_images": len(self.val_set),
            "steps": self.state.step,
            "steps_this_run": steps_run,
            "stopped_early": stopped_early,
            "best_val_ap50": self.state.best_ap50,
            "best_step": self.state.best_step,
            "last_validation": self.last_validation,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        }
        return finish_summary(
            self.out,
            summary,
            seconds=seconds,
            images=images,
            device=self.device,
            processes=self.context.world_size,
            precision=self.run_state.precision.name,
            is_main=self.context.is_main,
        )
