"""``caries-mim evaluate``: a model package against annotated radiographs, with every figure a report needs.

Writes into OUT:

* ``metrics.json`` - the model (path, checksum, versions, threshold), the data (files, image and lesion counts),
  COCO AP/AP50/AP75/AR overall and per class, FROC, image-level sensitivity/specificity/AUC at the package's
  threshold, the operating point (lesion-level sensitivity overall, by depth class, by conspicuity bin and by
  surface when the annotations carry ``depth`` / ``conspicuity`` / ``surface``, and false positives per image),
  bootstrap 95% intervals, the threshold and the run time;
* ``predictions.json`` - every detection in pycocotools' results format, ``[{image_id, category_id, bbox
  [x, y, w, h], score}]``, so ``COCOeval`` can re-check the numbers against the annotation file;
* ``pr_curve.png``, ``froc.png`` - precision-recall per class at IoU 0.5, and the FROC curve;
* ``overlays/<stem>.png`` - a few images with predictions at the operating point and the ground truth.

Metrics are computed over *all* detections the package returns, not only those above its threshold: AP and FROC
sweep the threshold themselves. Only image-level sensitivity and specificity, and the overlays, use the
package's operating threshold, as does the operating-point section.

No image header is read beyond the pixels and the spacing: no patient name or ID reaches any output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from caries_mim import __version__
from caries_mim.atomic_files import atomic_path
from caries_mim.curves import plot_froc, plot_precision_recall
from caries_mim.data import AnnotationSet, load_annotations
from caries_mim.data.coco import read_json
from caries_mim.errors import CariesMimError, InvalidArgumentError
from caries_mim.inference import Findings, Predictor
from caries_mim.io import Radiograph, ReadOptions, read_radiograph
from caries_mim.metrics import (
    DetectionMetrics,
    EvaluatedImage,
    FrocResult,
    ImageLevelMetrics,
    MetricConfidenceIntervals,
    coco_metrics,
    froc,
    image_level_metrics,
    metric_confidence_intervals,
    precision_recall_curve,
)
from caries_mim.metrics.class_confusion import ClassConfusion, class_confusion
from caries_mim.metrics.stratified import OperatingPointReport, conspicuity_bin, operating_point_report
from caries_mim.package import CHECKSUM_ALGORITHM, PACKAGE_FORMAT_VERSION, load_package
from caries_mim.visualization import draw_predictions_and_truth
from pipelines.predict import overlay_path


@dataclass(frozen=True, eq=False)
class EvaluationItem:
    """One annotated image, its labels mapped to the package's classes.

    Attributes:
        image_path: the radiograph file.
        gt_boxes: float64 (G, 4), [x0, y0, x1, y1] in pixels of the original image.
        gt_labels: int64 (G,), indices into the package's class names.
        result_id: the image id written to ``predictions.json``.
        gt_attributes: per ground-truth box, its reporting attributes (``depth``, ``conspicuity``; see
            :data:`~caries_mim.data.records.BOX_ATTRIBUTES`); empty dicts when the file has none.
    """

    image_path: Path
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    result_id: int | str
    gt_attributes: tuple[dict[str, Any], ...] = ()

    def strata(self) -> dict[str, list[str | None]]:
        """Per box, its depth class, conspicuity bin and surface (None where the annotation lacks them)."""
        attributes = self.gt_attributes or tuple({} for _ in range(len(self.gt_boxes)))
        return {
            "depth": [attribute.get("depth") for attribute in attributes],
            "conspicuity": [conspicuity_bin(attribute.get("conspicuity")) for attribute in attributes],
            "surface": [attribute.get("surface") for attribute in attributes],
        }


@dataclass(frozen=True)
class EvaluationData:
    """What ``--data`` gave, ready to predict on.

    Attributes:
        items: every image of every file, in file order.
        category_ids: class index -> ``category_id`` in ``predictions.json``.
        ids: "source" when image and category ids are the COCO file's own, "sequential" when they are 1..N.
        files: the annotation files.
    """

    items: list[EvaluationItem]
    category_ids: dict[int, int]
    ids: str
    files: list[Path]


def load_evaluation_data(paths: Sequence[str | os.PathLike], class_names: Sequence[str]) -> EvaluationData:
    """Load annotation files (COCO, DENTEX, box CSV) and map their classes to ``class_names`` by name.

    Image and category ids of ``predictions.json`` are the COCO file's own when every file is COCO, their image
    ids are distinct across files and their category ids are whole numbers agreeing on names; a package class the
    files do not list gets the next free category id. Otherwise images and categories are numbered from 1 in
    evaluation order and ``class_names`` order.

    Raises:
        InvalidArgumentError: no file, or a file with boxes of a class the package does not know (by name).
        InvalidDatasetError: a missing or malformed annotation file, or images it lists that do not exist.
    """
    if not paths:
        raise InvalidArgumentError("give at least one annotation file")
    names = list(class_names)
    sets = [load_annotations(path) for path in paths]
    items: list[EvaluationItem] = []
    for annotation_set in sets:
        to_package = _class_map(annotation_set, names)
        items.extend(
            EvaluationItem(
                image_path=record.image_path,
                gt_boxes=np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4),
                gt_labels=to_package[record.labels],
                result_id=record.image_id,
                gt_attributes=record.box_attributes,
            )
            for record in annotation_set.records
        )
    files = [Path(path) for path in paths]
    category_ids = _source_category_ids(sets, names)
    if category_ids is not None and _distinct(item.result_id for item in items):
        return EvaluationData(items, category_ids, "source", files)
    sequential = [dataclasses.replace(item, result_id=index + 1) for index, item in enumerate(items)]
    return EvaluationData(sequential, {index: index + 1 for index in range(len(names))}, "sequential", files)


def _class_map(annotation_set: AnnotationSet, names: list[str]) -> np.ndarray:
    """int64 (C,): the annotation set's label -> the package's label, refusing classes the package lacks."""
    unknown = annotation_set.classes_outside(names)
    if unknown:
        raise InvalidArgumentError(
            f"{annotation_set.source}: boxes of class(es) {unknown} that the model package does not predict "
            f"(its classes: {names}); classes are matched by name"
        )
    # Classes listed without any box are harmless; they map to -1 and never occur.
    return annotation_set.label_map(names)


def _distinct(values: Any) -> bool:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            return False
        seen.add(value)
    return True


def _source_category_ids(sets: Sequence[AnnotationSet], names: list[str]) -> dict[int, int] | None:
    """Class index -> the COCO files' category id for that name, or None when the files cannot supply them."""
    if any(annotation_set.format != "coco" for annotation_set in sets):
        return None
    by_name: dict[str, int] = {}
    taken: set[int] = set()
    for annotation_set in sets:
        for category in read_json(annotation_set.source)["categories"]:
            category_id, name = category["id"], str(category["name"])
            if isinstance(category_id, bool) or not isinstance(category_id, int):
                return None
            taken.add(category_id)
            if by_name.setdefault(name, category_id) != category_id and name in names:
                return None
    known = [by_name[name] for name in names if name in by_name]
    if len(set(known)) != len(known):
        return None
    next_free = max(taken, default=0) + 1
    ids = {}
    for index, name in enumerate(names):
        if name in by_name:
            ids[index] = by_name[name]
        else:
            ids[index], next_free = next_free, next_free + 1
    return ids


def read_image(path: Path, options: ReadOptions) -> Radiograph:
    """Read one evaluation image; the error names the file (some reader messages do not)."""
    try:
        return read_radiograph(path, options)
    except CariesMimError as exc:
        if str(path) in exc.message:
            raise
        raise type(exc)(f"{path}: {exc.message}") from None


def evaluated_image(item: EvaluationItem, findings: Findings, class_names: Sequence[str]) -> EvaluatedImage:
    """Ground truth and every detection of one image (above the threshold or not), for the metrics."""
    found = findings.findings
    return EvaluatedImage(
        image_id=item.result_id,
        gt_boxes=item.gt_boxes,
        gt_labels=item.gt_labels,
        pred_boxes=np.array([finding.box for finding in found], dtype=np.float64).reshape(-1, 4),
        pred_labels=np.array([class_names.index(finding.label) for finding in found], dtype=np.int64),
        pred_scores=np.array([finding.score for finding in found], dtype=np.float64),
    )


def predict_items(
    predictor: Predictor, data: EvaluationData, options: ReadOptions, *, progress: bool, desc: str = "evaluate"
) -> list[EvaluatedImage]:
    """Every item of ``data`` predicted by ``predictor``, with its ground truth, in file order (a progress bar with
    rate and time left on stderr when ``progress``)."""
    class_names = predictor.class_names
    return [
        evaluated_image(item, predictor.predict(read_image(item.image_path, options)), class_names)
        for item in tqdm(data.items, desc=desc, unit="image", disable=not progress)
    ]


@dataclass(frozen=True, eq=False)
class EvaluationMetrics:
    """The metric sections of ``metrics.json``, as the :mod:`caries_mim.metrics` results they come from.

    Attributes:
        coco: COCO AP, AP50, AP75, AR, overall and per class.
        froc: lesion-level FROC (its curve feeds ``froc.png``).
        image_level: image-level figures at the operating threshold.
        operating_point: lesion-level sensitivity (overall, by depth class and by conspicuity bin) and false
            positives per image at the operating threshold.
        class_confusion: the class of the best finding on each lesion at the operating threshold, and AP50 with
            the classes merged (whether a detector loses lesions or their class).
        confidence_intervals: bootstrap 95% intervals, or None when no resample was asked for.
    """

    coco: DetectionMetrics
    froc: FrocResult
    image_level: ImageLevelMetrics
    operating_point: OperatingPointReport
    class_confusion: ClassConfusion
    confidence_intervals: MetricConfidenceIntervals | None

    def to_dict(self) -> dict[str, Any]:
        """``coco``, ``froc``, ``image_level``, ``operating_point``, ``class_confusion`` and ``confidence_intervals``
        as JSON values."""
        return {
            "coco": self.coco.to_dict(),
            "froc": self.froc.to_dict(),
            "image_level": self.image_level.to_dict(),
            "operating_point": self.operating_point.to_dict(),
            "class_confusion": self.class_confusion.to_dict(),
            "confidence_intervals": None if self.confidence_intervals is None else self.confidence_intervals.to_dict(),
        }


def compute_metrics(
    images: Sequence[EvaluatedImage],
    class_names: Sequence[str],
    *,
    threshold: float,
    strata: dict[str, Sequence[Sequence[str | None]]] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> EvaluationMetrics:
    """COCO metrics, FROC, image-level and lesion-level figures at ``threshold`` and their bootstrap intervals.

    Args:
        images: predictions (all of them, whatever their score) and ground truth per image.
        strata: per-lesion attributes to split the operating point's sensitivity by (see
            :func:`~caries_mim.metrics.stratified.operating_point_report`); None: overall only.
        class_names: the names the labels index.
        threshold: the operating threshold in [0, 1] for the image-level figures.
        bootstrap: resamples for the 95% intervals; 0 leaves ``confidence_intervals`` None.
        seed: seed of the resamples.

    Raises:
        InvalidArgumentError: see the :mod:`caries_mim.metrics` functions.
    """
    intervals = None
    if bootstrap:
        intervals = metric_confidence_intervals(
            images, class_names, threshold=threshold, n_resamples=bootstrap, seed=seed
        )
    return EvaluationMetrics(
        coco=coco_metrics(images, class_names),
        froc=froc(images),
        image_level=image_level_metrics(images, threshold=threshold),
        operating_point=operating_point_report(images, strata or {}, threshold=threshold),
        class_confusion=class_confusion(images, class_names, threshold=threshold),
        confidence_intervals=intervals,
    )


def coco_results(images: Sequence[EvaluatedImage], category_ids: dict[int, int]) -> list[dict[str, Any]]:
    """Every detection in pycocotools' results format; ``image_id`` is each image's ``image_id``."""
    results = []
    for image in images:
        for box, label, score in zip(image.pred_boxes, image.pred_labels, image.pred_scores, strict=True):
            x0, y0, x1, y1 = (float(value) for value in box)
            results.append(
                {
                    "image_id": image.image_id,
                    "category_id": category_ids[int(label)],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    return results


def choose_overlays(images: Sequence[EvaluatedImage], threshold: float, count: int) -> list[int]:
    """Indices of up to ``count`` images worth looking at, deterministically.

    Images with a lesion or a finding at the operating point come first (the hits, misses and false alarms a
    reader wants to see), then the rest; each group keeps evaluation order.
    """
    interesting = [image.is_positive or bool((image.pred_scores >= threshold).any()) for image in images]
    order = sorted(range(len(images)), key=lambda index: (not interesting[index], index))
    return order[:count]


def _write_json(path: Path, value: Any) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _write_png(path: Path, picture: Image.Image) -> Path:
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return path


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"{path}: cannot create the output folder ({exc.strerror or exc})") from None


def _model_section(model: Path, predictor: Predictor) -> dict[str, Any]:
    package = predictor.package
    return {
        "path": str(model),
        "checksum": {"algorithm": CHECKSUM_ALGORITHM, "value": package.checksum},
        "package_version": package.version,
        "format_version": PACKAGE_FORMAT_VERSION,
        "class_names": list(package.class_names),
        "threshold": package.threshold,
        "target_sensitivity": package.target_sensitivity,
        "provenance": package.provenance,
    }


def _data_section(data: EvaluationData, class_names: Sequence[str]) -> dict[str, Any]:
    counts = np.bincount(
        np.concatenate([item.gt_labels for item in data.items]).astype(np.int64), minlength=len(class_names)
    )
    return {
        "files": [str(path) for path in data.files],
        "images": len(data.items),
        "positive_images": sum(len(item.gt_labels) > 0 for item in data.items),
        "lesions": {name: int(count) for name, count in zip(class_names, counts, strict=True)},
        "ids": data.ids,
        # predictions.json refers to images by id; with numbered ids this is the only way back to the files.
        "image_ids": [{"id": item.result_id, "file": item.image_path.name} for item in data.items],
    }


def run_evaluate(
    model: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overlays: int = 8,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
    options: ReadOptions | None = None,
) -> dict[str, Any]:
    """Evaluate a model package on annotated images; write OUT's files (see the module docstring).

    Args:
        model: the model package file.
        data: annotation files (COCO, DENTEX or box CSV); their classes must be among the package's, by name.
        out: the output folder (created; files of an earlier run in it are replaced, other files left alone).
        overlays: how many overlay pictures to draw (0: none).
        bootstrap: resamples for the 95% intervals (0: no intervals).
        seed: seed of the bootstrap resamples.
        progress: show a progress bar (rate and time left) on stderr.
        device: "cpu", "cuda", "cuda:N", or None for CUDA when available.
        options: what the image reader accepts.

    Returns:
        A summary: key figures and the paths written.

    Raises:
        InvalidCheckpointError: the package is missing or unusable.
        InvalidDatasetError: an annotation file is missing or malformed.
        InvalidArgumentError: classes that do not match, a bad device or count, an output folder that cannot be
            made.
        caries_mim.errors.CariesMimError: an image that cannot be read (the message names it).
    """
    for name, value in (("overlays", overlays), ("bootstrap", bootstrap), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} must be a whole number >= 0, got {value!r}")
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    options = options or ReadOptions()
    predictor = load_package(model, device=device)
    class_names = list(predictor.class_names)
    threshold = predictor.threshold
    evaluation = load_evaluation_data(data, class_names)
    _make_folder(out)

    images = predict_items(predictor, evaluation, options, progress=progress)

    item_strata = [item.strata() for item in evaluation.items]
    strata = {name: [per_item[name] for per_item in item_strata] for name in ("depth", "conspicuity", "surface")}
    computed = compute_metrics(images, class_names, threshold=threshold, strata=strata, bootstrap=bootstrap, seed=seed)
    metrics = computed.to_dict()
    curves = precision_recall_curve(images, class_names, iou_threshold=0.5)
    pr_path = plot_precision_recall(curves, out / "pr_curve.png")
    froc_path = plot_froc(computed.froc, out / "froc.png")
    predictions_path = _write_json(out / "predictions.json", coco_results(images, evaluation.category_ids))

    overlay_paths = []
    if overlays:
        folder = out / "overlays"
        _make_folder(folder)
        used: set[str] = set()
        for index in choose_overlays(images, threshold, overlays):
            item = evaluation.items[index]
            pixels = read_image(item.image_path, options).pixels
            target = overlay_path(folder, item.image_path, used)
            overlay_paths.append(
                _write_png(target, draw_predictions_and_truth(pixels, images[index], class_names, threshold))
            )

    seconds = round(time.perf_counter() - started, 3)
    report = {
        "caries_mim_version": __version__,
        "model": _model_section(model, predictor),
        "data": _data_section(evaluation, class_names),
        **metrics,
        "threshold": threshold,
        "seconds": seconds,
    }
    metrics_path = _write_json(out / "metrics.json", report)
    coco, intervals = metrics["coco"], metrics["confidence_intervals"]
    return {
        "out": str(out),
        "images": len(images),
        "lesions": sum(report["data"]["lesions"].values()),
        "ap": coco["ap"],
        "ap50": coco["ap50"],
        "ap50_ci": None if intervals is None else [intervals["ap50"]["low"], intervals["ap50"]["high"]],
        "ap50_classes_merged": metrics["class_confusion"]["merged_ap50"],
        "class_accuracy": metrics["class_confusion"]["class_accuracy"],
        "froc_score": metrics["froc"]["score"],
        "sensitivity": metrics["image_level"]["sensitivity"],
        "specificity": metrics["image_level"]["specificity"],
        "auc": metrics["image_level"]["auc"],
        "lesion_sensitivity": metrics["operating_point"]["sensitivity"],
        "false_positives_per_image": metrics["operating_point"]["false_positives_per_image"],
        "sensitivity_by_depth": _sensitivities(metrics["operating_point"]["by_depth"]),
        "sensitivity_by_conspicuity": _sensitivities(metrics["operating_point"]["by_conspicuity"]),
        "sensitivity_by_surface": _sensitivities(metrics["operating_point"]["by_surface"]),
        "threshold": threshold,
        "seconds": seconds,
        "metrics": str(metrics_path),
        "predictions": str(predictions_path),
        "plots": [str(pr_path), str(froc_path)],
        "overlays": [str(path) for path in overlay_paths],
    }


def _sensitivities(strata: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    return {name: stratum["sensitivity"] for name, stratum in strata.items()}


__all__ = [
    "EvaluationData",
    "EvaluationItem",
    "EvaluationMetrics",
    "choose_overlays",
    "coco_results",
    "compute_metrics",
    "evaluated_image",
    "load_evaluation_data",
    "read_image",
    "run_evaluate",
]
