"""`caries-mim analyze`: what pretraining did to one or several encoders, measured on the same radiographs.

For each encoder (``--encoder NAME=PATH``, repeatable), on ``--images`` radiographs of ``--data`` resampled to the
working spacing and cropped to ``--crop`` px around their centre:

- mean attention distance per block and head, in pixels and in mm (:func:`caries_mim.analysis.mean_attention_distance`);
- normalized mutual information between queries and keys per block and head (attention collapse);
- the relative log amplitude of the highest frequency of each block's token maps (Fourier analysis);
- the effective rank of each block's token features (representation collapse);
- with ``--labels`` (a COCO file, or any format ``caries_mim.data`` reads): linear-probe and k-NN accuracy of the
  frozen features (the mean of the final patch tokens) on crops of lesions and of healthy surfaces, trained on 70%
  of the labelled images and tested on the rest (split by image, so no image is on both sides);
- attention maps of the CLS token for a few heads of the first and the last block, as PNGs.

Writes ``analysis.json`` and one figure per measure (every encoder overlaid) into ``--out``; prints one JSON
summary line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from caries_mim.analysis import (
    attention_nmi,
    centre_crop,
    effective_rank,
    high_frequency_log_amplitude,
    knn_accuracy,
    linear_probe_accuracy,
    mean_attention_distance,
    patch_distances,
    surface_crops,
    to_working_scale,
)
from caries_mim.analysis.figures import attention_picture, layer_figure, probe_figure
from caries_mim.atomic_files import atomic_path
from caries_mim.data import find_radiographs, load_annotations
from caries_mim.errors import InvalidArgumentError
from caries_mim.io import ReadOptions, read_radiograph
from caries_mim.models import VisionTransformer, load_encoder

#: Share of the labelled images whose crops train the probes; the rest test them.
PROBE_TRAIN_SHARE = 0.7
#: Heads drawn in the attention pictures (the first ones).
PICTURED_HEADS = 4
#: Radiographs drawn with their attention maps.
PICTURED_IMAGES = 2


@dataclass(frozen=True)
class AnalysisSettings:
    """``spacing_mm``: the working spacing radiographs are resampled to; ``crop``: the side (px) of the field the
    attention and spectral measures see; ``probe_crop``: the side of a probe crop; ``healthy_per_image``: healthy
    surface crops drawn from each labelled image."""

    images: int = 16
    spacing_mm: float = 0.1
    crop: int = 160
    probe_crop: int = 64
    healthy_per_image: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.crop < 1 or self.probe_crop < 1 or self.healthy_per_image < 0:
            raise InvalidArgumentError("--images, --crop and --probe-crop must be >= 1, healthy crops >= 0")
        if not self.spacing_mm > 0:
            raise InvalidArgumentError(f"--spacing-mm must be > 0, got {self.spacing_mm}")


def parse_encoders(values: Sequence[str]) -> dict[str, Path]:
    """``NAME=PATH`` (or a bare ``PATH``, named by its folder and file) -> {name: path}; names must differ."""
    encoders: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            name, path = f"{Path(value).parent.name}/{Path(value).stem}".lstrip("/"), value
        if not name or not path:
            raise InvalidArgumentError(f"--encoder {value!r}: expected NAME=PATH")
        if name in encoders:
            raise InvalidArgumentError(f"--encoder: the name {name!r} is given twice")
        encoders[name] = Path(path)
    if not encoders:
        raise InvalidArgumentError("give at least one --encoder NAME=PATH")
    return encoders


def _read_at_working_scale(
    path: Path, settings: AnalysisSettings, options: ReadOptions | None
) -> tuple[np.ndarray, float]:
    """A radiograph's pixels resampled to the working spacing, and the factor from its own pixels."""
    radiograph = read_radiograph(path, options)
    return to_working_scale(radiograph.pixels, radiograph.spacing_mm, settings.spacing_mm)


def _fields(data: Path, settings: AnalysisSettings, options: ReadOptions | None) -> tuple[torch.Tensor, list[str]]:
    """(B, 1, crop, crop) float32 centre crops at the working scale of up to ``settings.images`` radiographs of
    ``data`` (a seeded choice), and their file names."""
    files = find_radiographs(data)
    if not files:
        raise InvalidArgumentError(f"--data {data}: no radiographs found (DICOM, PNG, JPEG, TIFF, MHA, NRRD, NIfTI)")
    rng = np.random.default_rng(settings.seed)
    chosen = sorted(rng.choice(len(files), size=min(settings.images, len(files)), replace=False).tolist())
    crops, names = [], []
    for index in chosen:
        image, _ = _read_at_working_scale(files[index], settings, options)
        crops.append(centre_crop(image, settings.crop))
        names.append(files[index].name)
    return torch.from_numpy(np.stack(crops)).unsqueeze(1), names


def _probe_samples(
    labels: Path, settings: AnalysisSettings, options: ReadOptions | None, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, tuple[str, ...]]:
    """Surface crops of every labelled image: (M, 1, s, s) pixels, (M,) labels (0 healthy), (M,) image index, and
    the class names behind labels 1...; raises when no crop could be made."""
    annotations = load_annotations(labels)
    rng = np.random.default_rng(settings.seed)
    pixels, targets, images = [], [], []
    records = tqdm(annotations.records, desc="probe crops", unit="image", leave=False, disable=not progress)
    for number, record in enumerate(records):
        image, factor = _read_at_working_scale(record.image_path, settings, options)
        for crop in surface_crops(
            image, record.boxes * factor, record.labels, settings.probe_crop, settings.healthy_per_image, rng
        ):
            pixels.append(crop.pixels)
            targets.append(crop.label)
            images.append(number)
    if not pixels:
        raise InvalidArgumentError(f"--labels {labels}: no crops could be made (no images?)")
    return (
        torch.from_numpy(np.stack(pixels)).unsqueeze(1),
        torch.tensor(targets),
        np.asarray(images),
        annotations.classes,
    )


def _check_patch_size(name: str, encoder: VisionTransformer, settings: AnalysisSettings) -> None:
    patch = encoder.patch_size
    if settings.crop % patch or settings.probe_crop % patch:
        raise InvalidArgumentError(
            f"encoder {name!r} has {patch} px patches: --crop ({settings.crop}) and --probe-crop "
            f"({settings.probe_crop}) must be multiples of it"
        )


@torch.inference_mode()
def measure_layers(encoder: VisionTransformer, fields: torch.Tensor, spacing_mm: float) -> dict[str, Any]:
    """Every per-block measure of ``encoder`` on ``fields`` (B, 1, S, S) in [0, 1] (see the module docstring), and
    the CLS token's attention over the patches in the first and last block (for the pictures)."""
    depth = len(encoder.blocks)
    output = encoder(fields, hidden_blocks=range(depth), attention_blocks=range(depth))
    grid, patch = output.grid, encoder.patch_size
    layers: dict[str, Any] = {
        key: [] for key in ("attention_distance_px", "attention_distance_mm", "nmi", "high_frequency", "effective_rank")
    }
    for block in range(depth):
        attention = output.attention[block]
        distance = mean_attention_distance(attention, grid, patch_size=patch)
        layers["attention_distance_px"].append([round(value, 3) for value in distance.tolist()])
        layers["attention_distance_mm"].append([round(value * spacing_mm, 4) for value in distance.tolist()])
        layers["nmi"].append([round(value, 4) for value in attention_nmi(attention, grid).tolist()])
        layers["high_frequency"].append(round(high_frequency_log_amplitude(output.feature_map(block)), 4))
        tokens = output.hidden[block][:, 1:]
        layers["effective_rank"].append(round(effective_rank(tokens.reshape(-1, tokens.shape[-1])), 3))
    uniform = patch_distances(grid, patch).mean().item()  # what a head attending everywhere alike would give
    layers["uniform_attention_distance_mm"] = round(uniform * spacing_mm, 4)
    rows, columns = grid
    cls_attention = {
        block: output.attention[block][:, :, 0, 1:].reshape(fields.shape[0], -1, rows, columns)
        for block in (0, depth - 1)
    }
    return {"layers": layers, "cls_attention": cls_attention}


@torch.inference_mode()
def pooled_features(encoder: VisionTransformer, crops: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(M, 1, s, s) crops -> (M, D) mean of the final (normed) patch tokens."""
    return torch.cat([encoder(crops[i : i + batch]).patch_tokens.mean(dim=1) for i in range(0, len(crops), batch)])


def probe(features: torch.Tensor, labels: torch.Tensor, images: np.ndarray, seed: int) -> dict[str, float]:
    """Linear-probe and k-NN accuracy on a by-image split of ``features`` (see :data:`PROBE_TRAIN_SHARE`)."""
    unique = np.unique(images)
    rng = np.random.default_rng(seed)
    training_images = set(rng.permutation(unique)[: max(1, round(PROBE_TRAIN_SHARE * len(unique)))].tolist())
    train = torch.from_numpy(np.isin(images, list(training_images)))
    if train.all() or not train.any():
        raise InvalidArgumentError("the probe needs labelled crops from at least 2 images")
    test = ~train
    return {
        "linear_probe": round(linear_probe_accuracy(features[train], labels[train], features[test], labels[test]), 4),
        "knn": round(knn_accuracy(features[train], labels[train], features[test], labels[test]), 4),
        "train_crops": int(train.sum()),
        "test_crops": int(test.sum()),
    }


def _mean(values: Sequence[Sequence[float]]) -> list[float]:
    return [round(float(np.mean(heads)), 4) for heads in values]


def _write_figures(out: Path, results: Mapping[str, dict[str, Any]], chance: float | None) -> dict[str, str]:
    layers = {name: result["layers"] for name, result in results.items()}
    figures = {
        "attention_distance": layer_figure(
            out / "attention_distance.png",
            "mean attention distance (dots: heads)",
            "distance (mm)",
            {name: _mean(layer["attention_distance_mm"]) for name, layer in layers.items()},
            {name: layer["attention_distance_mm"] for name, layer in layers.items()},
            reference=(next(iter(layers.values()))["uniform_attention_distance_mm"], "uniform attention"),
        ),
        "nmi": layer_figure(
            out / "nmi.png",
            "query-key normalized mutual information (low: collapse)",
            "NMI",
            {name: _mean(layer["nmi"]) for name, layer in layers.items()},
            {name: layer["nmi"] for name, layer in layers.items()},
            reference=(0.0, "collapse: every query attends alike"),
        ),
        "high_frequency": layer_figure(
            out / "fourier.png",
            "token maps: log amplitude of the highest frequency relative to 0",
            "delta log amplitude",
            {name: layer["high_frequency"] for name, layer in layers.items()},
        ),
        "effective_rank": layer_figure(
            out / "effective_rank.png",
            "effective rank of the token features",
            "effective rank",
            {name: layer["effective_rank"] for name, layer in layers.items()},
        ),
    }
    probes = {name: result["probe"] for name, result in results.items() if "probe" in result}
    if probes and chance is not None:
        figures["probe"] = probe_figure(out / "probe.png", probes, chance)
    return {key: str(path) for key, path in figures.items()}


def run_analyze(
    encoders: Mapping[str, Path],
    data: Path,
    out: Path,
    *,
    labels: Path | None = None,
    settings: AnalysisSettings | None = None,
    options: ReadOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every encoder of ``encoders`` ({name: encoder.pt}) on ``data`` (and ``labels``); write the JSON,
    figures and attention pictures into ``out``; return the summary written as ``analysis.json``.

    Raises:
        caries_mim.errors.CariesMimError: an unreadable encoder, data or labels, a crop the patch size does not
            divide (before anything is written to ``out``).
    """
    settings = settings or AnalysisSettings()
    loaded = {}
    for name, path in encoders.items():
        encoder = load_encoder(path)
        _check_patch_size(name, encoder.encoder, settings)
        loaded[name] = (encoder.encoder.eval(), encoder.metadata)
    fields, field_names = _fields(data, settings, options)
    samples = _probe_samples(labels, settings, options, progress) if labels is not None else None

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name, (encoder, metadata) in tqdm(loaded.items(), desc="analyze", unit="encoder", disable=not progress):
        measured = measure_layers(encoder, fields, settings.spacing_mm)
        result: dict[str, Any] = {
            "path": str(encoders[name]),
            "objective": (metadata.get("objective") or {}).get("name"),
            "steps": metadata.get("steps"),
            "layers": measured["layers"],
        }
        if samples is not None:
            crops, targets, images, _ = samples
            result["probe"] = probe(pooled_features(encoder, crops), targets, images, settings.seed)
        pictures = []
        for block, maps in measured["cls_attention"].items():
            for index in range(min(PICTURED_IMAGES, fields.shape[0])):
                picture = attention_picture(
                    fields[index, 0].numpy(), maps[index], range(min(PICTURED_HEADS, maps.shape[1]))
                )
                path = out / "attention" / f"{_file_name(name)}_block{block + 1}_{index}.png"
                path.parent.mkdir(exist_ok=True)
                with atomic_path(path) as temporary:
                    picture.save(temporary, format="PNG")
                pictures.append(str(path))
        result["attention_pictures"] = pictures
        results[name] = result

    chance = None
    probe_classes: dict[str, int] = {}
    if samples is not None:
        _, targets, _, classes = samples
        counts = torch.bincount(targets, minlength=len(classes) + 1)
        probe_classes = {label: int(count) for label, count in zip(("healthy", *classes), counts.tolist(), strict=True)}
        chance = round(float(counts.max() / counts.sum()), 4)
    summary = {
        "data": str(data),
        "labels": str(labels) if labels is not None else None,
        "settings": settings.__dict__,
        "images": field_names,
        "probe_crops": probe_classes or None,
        "probe_chance": chance,
        "encoders": results,
        "figures": _write_figures(out, results, chance),
    }
    with atomic_path(out / "analysis.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    return summary


def _file_name(name: str) -> str:
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in name)


def summary_line(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One line per run: per encoder, the last block's mean distance (mm), NMI, high frequency, rank, probes."""
    line: dict[str, Any] = {}
    for name, result in summary["encoders"].items():
        layers = result["layers"]
        line[name] = {
            "last_block_distance_mm": _mean(layers["attention_distance_mm"])[-1],
            "last_block_nmi": _mean(layers["nmi"])[-1],
            "last_block_high_frequency": layers["high_frequency"][-1],
            "last_block_effective_rank": layers["effective_rank"][-1],
            **(
                {"linear_probe": result["probe"]["linear_probe"], "knn": result["probe"]["knn"]}
                if "probe" in result
                else {}
            ),
        }
    return {"analysis": line}
