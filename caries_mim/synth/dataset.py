"""A whole synthetic dataset on disk: unlabeled DICOM files, labeled DICOM files with COCO splits, a manifest.

Layout::

    OUT/manifest.json                 generator, version, seed, config, counts ("complete": true at the end)
    OUT/unlabeled/synth_000000.dcm    for pretraining
    OUT/labeled/images/synth_000000.dcm
    OUT/labeled/{train,val,test}.json COCO, file_name relative to OUT/labeled, about 70/15/15 by image

Output folder policy: OUT may be missing, empty, or a previous output of this generator (it has our
manifest.json). In the last case only our own files are replaced (``synth_*.dcm`` in our two image folders,
the three COCO files and the manifest); anything else in OUT is left alone. Any other non-empty folder is
refused, so a typo can never delete a user's data.

Every image has its own random generator seeded by ``SeedSequence([seed, split, index])``: results do not
depend on the number of workers or the order in which images are produced.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caries_mim.atomic_files import atomic_write_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.synth.config import SynthConfig
from caries_mim.synth.dicom import write_dicom
from caries_mim.synth.lesions import LABELS
from caries_mim.synth.render import LesionAnnotation, SyntheticRadiograph, render_radiograph

GENERATOR = "caries-mim synth"
GENERATOR_VERSION = "1.1"
SPLIT_TAGS = {"unlabeled": 0, "labeled": 1}
COCO_SPLITS = ("train", "val", "test")
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "lesion"} for i, name in enumerate(LABELS)]
_SPLIT_PERMUTATION_TAG = 2


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one image: independent of every other image, of workers and of order."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_TAGS[split], index]))


def render_indexed(seed: int, split: str, index: int, config: SynthConfig) -> SyntheticRadiograph:
    """Render image ``index`` of ``split`` exactly as :func:`generate_dataset` does."""
    return render_radiograph(image_rng(seed, split, index), config)


def file_name(index: int) -> str:
    return f"synth_{index:06d}.dcm"


@dataclass
class SynthSummary:
    """What :func:`generate_dataset` wrote. ``to_dict`` is JSON-serializable."""

    out_dir: str
    seed: int
    n_unlabeled: int
    n_labeled: int
    splits: dict[str, int] = field(default_factory=dict)
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    photometrics: dict[str, int] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    lesions: dict[str, int] = field(default_factory=dict)
    labeled_without_lesions: int = 0
    #: Lesions drawn in labeled images but under the visibility floor (not annotated).
    subthreshold_lesions: int = 0
    elapsed_s: float = 0.0

    @property
    def n_images(self) -> int:
        return self.n_unlabeled + self.n_labeled

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "seed": self.seed,
            "images": self.n_images,
            "unlabeled": self.n_unlabeled,
            "labeled": self.n_labeled,
            "splits": dict(self.splits),
            "transfer_syntaxes": dict(self.transfer_syntaxes),
            "photometrics": dict(self.photometrics),
            "views": dict(self.views),
            "lesions": dict(self.lesions),
            "labeled_without_lesions": self.labeled_without_lesions,
            "subthreshold_lesions": self.subthreshold_lesions,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode("utf-8"))


def _is_our_output(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("generator") == GENERATOR


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not _is_our_output(out):
            raise InvalidArgumentError(
                f"{out} is not empty and is not a previous 'caries-mim synth' output (no manifest.json from it); "
                "choose a new or empty folder"
            )
        for folder in (out / "unlabeled", out / "labeled" / "images"):
            for stale in folder.glob("synth_*.dcm"):
                stale.unlink()
        for name in COCO_SPLITS:
            (out / "labeled" / f"{name}.json").unlink(missing_ok=True)
    try:
        (out / "unlabeled").mkdir(parents=True, exist_ok=True)
        (out / "labeled" / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, no permission, a full disk
        raise InvalidArgumentError(f"cannot create the output folders under {out}: {exc.strerror or exc}") from None


def _produce(job: tuple[str, str, int, int, dict[str, Any]]) -> dict[str, Any]:
    """Render and write one image; returns what the COCO files and the summary need (runs in workers)."""
    folder, split, index, seed, config_dict = job
    config = SynthConfig.from_dict(config_dict)
    rng = image_rng(seed, split, index)
    # Unlabeled images' annotations are never written: skip the conspicuity measurement (same pixels).
    image = render_radiograph(rng, config, label=split != "unlabeled")
    # Drawn after rendering from the same generator, so the choice is as deterministic as the pixels.
    photometric = "MONOCHROME1" if rng.random() < config.monochrome1_fraction else "MONOCHROME2"
    transfer_syntax = config.transfer_syntaxes[index % len(config.transfer_syntaxes)]
    write_dicom(
        image,
        Path(folder) / file_name(index),
        index=index,
        seed=seed,
        transfer_syntax=transfer_syntax,
        photometric=photometric,
        split=split,
    )
    return {
        "split": split,
        "index": index,
        "height": int(image.pixels.shape[0]),
        "width": int(image.pixels.shape[1]),
        "view": image.view,
        "transfer_syntax": transfer_syntax,
        "photometric": photometric,
        "lesions": [_lesion_record(les) for les in image.lesions],
        "subthreshold_lesions": [_lesion_record(les) for les in image.subthreshold_lesions],
    }


def _lesion_record(lesion: LesionAnnotation) -> dict[str, Any]:
    return {
        "box": list(lesion.box),
        "field_box": list(lesion.field_box) if lesion.field_box is not None else None,
        "conspicuity": lesion.conspicuity,
        "label": lesion.label,
        "surface": lesion.surface,
        "depth": lesion.depth,
        "tooth": lesion.tooth,
    }


def split_assignment(n_labeled: int, seed: int) -> dict[int, str]:
    """Labeled index -> "train" / "val" / "test", about 70/15/15, a pure function of (n_labeled, seed)."""
    order = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_PERMUTATION_TAG])).permutation(n_labeled)
    n_val = n_test = round(0.15 * n_labeled)
    if n_labeled >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n_labeled - n_val - n_test)
    return {int(index): names[rank] for rank, index in enumerate(order)}


def _coco(records: list[dict[str, Any]]) -> dict[str, Any]:
    images, annotations = [], []
    for record in sorted(records, key=lambda r: r["index"]):
        image_id = record["index"] + 1
        images.append(
            {
                "id": image_id,
                "file_name": f"images/{file_name(record['index'])}",
                "width": record["width"],
                "height": record["height"],
                # Drawn and rendered, under the visibility floor: not findings (see caries_mim.synth.conspicuity).
                "subthreshold_lesions": [
                    {key: lesion[key] for key in ("field_box", "conspicuity", "label", "surface", "depth", "tooth")}
                    for lesion in record["subthreshold_lesions"]
                ],
            }
        )
        for lesion in record["lesions"]:
            x0, y0, x1, y1 = lesion["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": LABELS.index(lesion["label"]) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "surface": lesion["surface"],
                    "depth": lesion["depth"],
                    "tooth": lesion["tooth"],
                    "conspicuity": lesion["conspicuity"],
                    "field_bbox": _coco_box(lesion["field_box"]),
                }
            )
    return {
        "info": {"description": "caries-mim synthetic radiographs", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def _coco_box(box: list[float] | None) -> list[float] | None:
    return None if box is None else [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def generate_dataset(
    out_dir: str | os.PathLike,
    n_unlabeled: int,
    n_labeled: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    progress: bool = True,
    workers: int = 1,
) -> SynthSummary:
    """Render and write a dataset (layout and folder policy in the module docstring).

    Args:
        n_unlabeled, n_labeled: image counts (>= 0, not both 0).
        seed: any non-negative integer; same seed and config give identical files.
        workers: processes rendering in parallel (1 = in this process); the output does not depend on it.
    Raises:
        InvalidArgumentError: bad counts, seed or workers, or an OUT folder we must not write into.
    """
    for name, value in (("n_unlabeled", n_unlabeled), ("n_labeled", n_labeled), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    if n_unlabeled == 0 and n_labeled == 0:
        raise InvalidArgumentError("nothing to generate: --unlabeled and --labeled are both 0")
    if not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
    config = config or SynthConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    _prepare_out_dir(out)
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "config": config.to_dict(),
        "complete": False,
    }
    _write_json(out / "manifest.json", manifest)

    config_dict = config.to_dict()
    jobs = [(str(out / "unlabeled"), "unlabeled", i, int(seed), config_dict) for i in range(n_unlabeled)]
    jobs += [(str(out / "labeled" / "images"), "labeled", i, int(seed), config_dict) for i in range(n_labeled)]
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    records = []
    if workers == 1:
        for job in jobs:
            records.append(_produce(job))
            bar.update()
    else:
        # spawn: a forked copy of a parent that already runs threads (torch, tqdm) can deadlock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap(_produce, jobs, chunksize=4):
                records.append(record)
                bar.update()
    bar.close()

    assignment = split_assignment(n_labeled, int(seed))
    labeled = [r for r in records if r["split"] == "labeled"]
    for name in COCO_SPLITS:
        _write_json(out / "labeled" / f"{name}.json", _coco([r for r in labeled if assignment[r["index"]] == name]))

    summary = SynthSummary(
        out_dir=str(out),
        seed=int(seed),
        n_unlabeled=n_unlabeled,
        n_labeled=n_labeled,
        splits=dict(Counter(assignment.values())),
        transfer_syntaxes=dict(Counter(r["transfer_syntax"] for r in records)),
        photometrics=dict(Counter(r["photometric"] for r in records)),
        views=dict(Counter(r["view"] for r in records)),
        lesions=dict(Counter(les["label"] for r in labeled for les in r["lesions"])),
        labeled_without_lesions=sum(1 for r in labeled if not r["lesions"]),
        subthreshold_lesions=sum(len(r["subthreshold_lesions"]) for r in labeled),
        elapsed_s=time.perf_counter() - started,
    )
    manifest.update(complete=True, counts=summary.to_dict())
    manifest["counts"].pop("out_dir")
    manifest["counts"].pop("elapsed_s")
    _write_json(out / "manifest.json", manifest)
    return summary
