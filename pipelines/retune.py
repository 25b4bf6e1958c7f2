"""``caries-mim retune``: give a trained model package new inference settings and choose its threshold again.

How a detector selects and fuses its boxes (score floor, NMS, box voting, test-time flips, the sliding window)
changes what it outputs, and so where its operating threshold must sit, without touching its weights. A new
inference recipe should not need a new fine-tuning run: retuning applies the new values, predicts on validation
images with them, chooses the threshold for the package's target lesion sensitivity exactly as fine-tuning does
(:func:`~caries_mim.metrics.select_operating_point` on the validation predictions), and writes a new package. Its
provenance keeps everything the old one had and adds a ``retuned`` entry per retune: the package it came from
(content checksum), each changed setting with its old and new value, and the validation figures and threshold.

The validation images must be ones the detector did not train on (the fine-tuning run's validation split), or the
threshold is chosen on data the model has memorised. Nothing checks that here: the caller knows its splits.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caries_mim import __version__
from caries_mim.detection import DetectorConfig
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Predictor
from caries_mim.io import ReadOptions
from caries_mim.metrics import coco_metrics, froc, select_operating_point
from caries_mim.package import ModelPackage, read_package, save_package
from pipelines.evaluate import load_evaluation_data, predict_items

#: The detector settings that act only at inference: a package's weights fit any values of these.
INFERENCE_SETTINGS = (
    "score_threshold",
    "nms_threshold",
    "candidates_per_level",
    "detections_per_image",
    "box_fusion_iou",
    "test_time_flip",
    "test_time_vertical_flip",
    "roi_size",
    "sliding_window_overlap",
    "sliding_window_batch_size",
)


def inference_settings(detector: dict[str, Any]) -> dict[str, Any]:
    """Every inference setting of a recipe's ``detector`` section: its value there, else the default of
    :class:`DetectorConfig` (what a detector fine-tuned with that recipe would use)."""
    defaults = {field.name: field.default for field in dataclasses.fields(DetectorConfig)}
    return {key: detector.get(key, defaults[key]) for key in INFERENCE_SETTINGS}


def retuned_config(config: DetectorConfig, settings: dict[str, Any]) -> DetectorConfig:
    """``config`` with ``settings`` (inference-only keys) applied and checked.

    Raises:
        InvalidArgumentError: a key that is not an inference setting (it would not fit the trained weights), or a
            value the config refuses.
    """
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise InvalidArgumentError(
            f"not an inference setting: {', '.join(unknown)} (retuning changes only {', '.join(INFERENCE_SETTINGS)};"
            " anything else needs fine-tuning)"
        )
    return DetectorConfig.from_dict({**config.to_dict(), **settings})


def retune_package(
    model: str | os.PathLike,
    validation: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: dict[str, Any],
    *,
    target_sensitivity: float | None = None,
    progress: bool = True,
    device: str | None = None,
    options: ReadOptions | None = None,
) -> dict[str, Any]:
    """Write ``out``: the package ``model`` with ``settings`` and a threshold chosen on ``validation`` with them.

    Args:
        model: the model package to retune (not changed; ``out`` may name it to replace it, atomically).
        validation: annotation files (COCO, DENTEX or box CSV) of images the detector did not train on.
        out: the new package's path.
        settings: detector inference settings (:data:`INFERENCE_SETTINGS`) and their new values; may be empty
            (the threshold is then chosen again for the same inference, e.g. on other validation data).
        target_sensitivity: the lesion sensitivity in (0, 1] to choose the threshold for; None keeps the package's.
        progress: a progress bar (rate and time left) on stderr.
        device: "cpu", "cuda", "cuda:N", or None for CUDA when available.
        options: what the image reader accepts.

    Returns:
        A summary: the changed settings, validation AP50 and FROC, the old and new thresholds, the output path.

    Raises:
        InvalidCheckpointError: the package is missing or unusable.
        InvalidDatasetError: an annotation file is missing or malformed.
        InvalidArgumentError: a setting that is not an inference setting or has a bad value, no target sensitivity
            (neither given nor in the package), classes that do not match the package's.
    """
    started = time.perf_counter()
    package = read_package(model)
    config = retuned_config(package.config, settings)
    target = target_sensitivity if target_sensitivity is not None else package.target_sensitivity
    if target is None or not 0.0 < target <= 1.0:
        raise InvalidArgumentError(
            f"a target sensitivity in (0, 1] is needed to choose the threshold; the package has "
            f"{package.target_sensitivity!r} and {target_sensitivity!r} was given"
        )
    options = options or ReadOptions()
    evaluation = load_evaluation_data(validation, list(config.class_names))
    predictor = Predictor(dataclasses.replace(package, config=config), device=device, source=str(model))
    images = predict_items(predictor, evaluation, options, progress=progress, desc="retune (validating)")
    point = select_operating_point(images, target_sensitivity=target)
    validation_figures = {
        "files": [Path(path).name for path in validation],
        "images": len(images),
        "ap50": float(coco_metrics(images, config.class_names).ap50),
        "froc": float(froc(images).score),
        "threshold": float(point.threshold),
        "sensitivity_at_threshold": None if point.sensitivity is None else float(point.sensitivity),
    }
    before, after = package.config.to_dict(), config.to_dict()
    record = {
        "by": f"caries-mim {__version__} retune",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from_checksum": package.checksum,
        "settings": {key: {"from": before[key], "to": after[key]} for key in settings if before[key] != after[key]},
        "previous_threshold": package.threshold,
        "target_sensitivity": target,
        "validation": validation_figures,
    }
    retuned = ModelPackage(
        config=config,
        state_dict=package.state_dict,
        threshold=point.threshold,
        target_sensitivity=target,
        version=package.version,
        provenance={**package.provenance, "retuned": [*package.provenance.get("retuned", []), record]},
    )
    save_package(retuned, out)
    return {
        "out": str(out),
        "settings": record["settings"],
        "validation_images": len(images),
        "val_ap50": validation_figures["ap50"],
        "val_froc": validation_figures["froc"],
        "previous_threshold": package.threshold,
        "threshold": point.threshold,
        "sensitivity_at_threshold": validation_figures["sensitivity_at_threshold"],
        "seconds": round(time.perf_counter() - started, 1),
    }
