"""``caries-mim demo``: the main job on embedded synthetic data.

Today: generate a synthetic set, read every file back through the same reader real data uses, load the COCO
splits through the same loaders (and pycocotools), draw what a person would want to see (labeled images with
their boxes, the detection augmentation applied to them), then pretrain a tiny MAE encoder on every image with
the shipped ``tiny`` config and show its reconstructions. Later issues extend it to fine-tune -> evaluate ->
predict.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pydicom.uid import UID
from tqdm import tqdm

from caries_mim.data import DetectionDataset, detection_train_transform, find_radiographs, load_annotations
from caries_mim.errors import CariesMimError, InvalidArgumentError
from caries_mim.io import read_radiograph
from caries_mim.synth import generate_dataset
from caries_mim.visualization import draw_findings, tile
from pipelines.pretrain import load_pretrain_config, run_pretrain

SPLITS = ("train", "val", "test")
PREVIEW_IMAGES = 8


def _read_back(data_dir: Path) -> dict[str, Any]:
    """Read every generated file with read_radiograph; count formats. Any failure is a generator bug."""
    syntaxes: Counter[str] = Counter()
    photometrics: Counter[str] = Counter()
    failures: list[str] = []
    files = find_radiographs([data_dir])
    for path in tqdm(files, desc="read back", unit="file"):
        try:
            radiograph = read_radiograph(path)
        except CariesMimError as exc:
            failures.append(f"{path.name}: [{exc.code}] {exc.message}")
            continue
        syntaxes[UID(radiograph.transfer_syntax_uid or "").name or "none"] += 1
        photometrics[radiograph.photometric_interpretation or "none"] += 1
    if failures:
        raise RuntimeError(f"{len(failures)} generated file(s) did not read back: {failures[:3]}")
    return {"files": len(files), "transfer_syntaxes": dict(syntaxes), "photometric": dict(photometrics)}


def _check_with_pycocotools(path: Path) -> int:
    """Load a COCO file with the reference implementation (quietly: it prints progress) and count its boxes."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    return len(coco.getAnnIds())


def _previews(out: Path, train_json: Path) -> dict[str, str]:
    """Two pictures: labeled images with their boxes, and the same images through the training augmentation."""
    annotations = load_annotations(train_json)
    with_boxes = [r for r in annotations.records if len(r.boxes)]
    without = [r for r in annotations.records if not len(r.boxes)]
    chosen = (with_boxes[: PREVIEW_IMAGES - 2] + without[:2])[:PREVIEW_IMAGES]
    if not chosen:
        raise InvalidArgumentError("the demo set has no labeled training images to preview")

    labeled = []
    for record in chosen:
        pixels = read_radiograph(record.image_path).pixels
        labels = [annotations.classes[i] for i in record.labels]
        labeled.append(draw_findings(pixels, record.boxes, labels))
    labeled_path = out / "preview_labeled.png"
    tile(labeled, columns=4).save(labeled_path)

    augmented_set = DetectionDataset(chosen, transform=detection_train_transform(size=512, seed=0), progress=False)
    augmented = []
    for index in range(len(augmented_set)):
        item = augmented_set[index]
        labels = [annotations.classes[i] for i in item["labels"].tolist()]
        augmented.append(draw_findings(item["image"][0].numpy(), item["boxes"].numpy(), labels))
    augmented_path = out / "preview_augmented.png"
    tile(augmented, columns=4, cell_width=384).save(augmented_path)
    return {"labeled": str(labeled_path), "augmented": str(augmented_path)}


def _pretrain(out: Path, data_dir: Path, images: int, steps: int, seed: int) -> dict[str, Any]:
    """The tiny MAE config on every synthetic image (labels are not needed for MIM) into ``out/pretrain``."""
    run = out / "pretrain"
    if run.exists():
        # The demo owns this folder: a re-run starts it over instead of refusing like `caries-mim pretrain` does.
        shutil.rmtree(run)
    tiny = load_pretrain_config("tiny", None)
    batch = min(tiny.optim.batch_size, images)
    config = load_pretrain_config("tiny", [f"train.steps={steps}", f"train.seed={seed}", f"optim.batch_size={batch}"])
    summary = run_pretrain([data_dir], run, config)
    pictures = sorted((run / "reconstructions").glob("step_*.png"))
    return {**summary, "reconstructions": str(pictures[-1]) if pictures else None}


def run_demo(
    out: Path, *, seed: int = 0, n_unlabeled: int = 96, n_labeled: int = 40, pretrain_steps: int | None = None
) -> dict[str, Any]:
    """Run the demo into ``out`` and return (and print, and write as ``out/demo_summary.json``) its summary.

    ``pretrain_steps``: None runs the tiny config's own length, 0 skips pretraining."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "synthetic"
    stages = 4 if pretrain_steps == 0 else 5

    print(f"[1/{stages}] generating {n_unlabeled} unlabeled + {n_labeled} labeled synthetic radiographs in {data_dir}")
    synth = generate_dataset(
        data_dir, n_unlabeled=n_unlabeled, n_labeled=n_labeled, seed=seed, progress=True, workers=2
    )

    print(f"[2/{stages}] reading every file back through caries_mim.io.read_radiograph")
    read_back = _read_back(data_dir)

    print(f"[3/{stages}] loading the COCO splits (caries_mim.data and pycocotools)")
    splits: dict[str, Any] = {}
    for split in SPLITS:
        path = data_dir / "labeled" / f"{split}.json"
        annotations = load_annotations(path)
        per_class = Counter(annotations.classes[i] for record in annotations.records for i in record.labels)
        pycocotools_boxes = _check_with_pycocotools(path)
        if pycocotools_boxes != sum(per_class.values()):
            raise RuntimeError(f"{path}: pycocotools sees {pycocotools_boxes} boxes, caries_mim.data sees {per_class}")
        splits[split] = {
            "images": len(annotations.records),
            "images_without_lesions": sum(1 for r in annotations.records if not len(r.boxes)),
            "boxes": dict(per_class),
        }

    print(f"[4/{stages}] drawing previews")
    pictures = _previews(out, data_dir / "labeled" / "train.json")

    pretrain = None
    if pretrain_steps != 0:
        steps = load_pretrain_config("tiny", None).train.steps if pretrain_steps is None else pretrain_steps
        print(f"[5/{stages}] pretraining a tiny MAE encoder for {steps} steps (config: tiny)")
        pretrain = _pretrain(out, data_dir, read_back["files"], steps, seed)

    summary = {
        "data": str(data_dir),
        "synth": synth.to_dict(),
        "read_back": read_back,
        "splits": splits,
        "pictures": pictures,
        "pretrain": pretrain,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    read_back = summary["read_back"]
    print()
    print(f"caries-mim demo finished in {summary['elapsed_s']} s")
    print(f"  data:       {summary['data']}")
    print(f"  read back:  {read_back['files']} files, all readable")
    print(f"              transfer syntaxes {json.dumps(read_back['transfer_syntaxes'])}")
    print(f"              photometric {json.dumps(read_back['photometric'])}")
    for split, info in summary["splits"].items():
        boxes = ", ".join(f"{name} {count}" for name, count in sorted(info["boxes"].items())) or "none"
        print(
            f"  {split + ':':<11} {info['images']} images ({info['images_without_lesions']} without lesions), "
            f"boxes: {boxes}"
        )
    print(f"  pictures:   {summary['pictures']['labeled']}")
    print(f"              {summary['pictures']['augmented']}")
    pretrain = summary["pretrain"]
    if pretrain:
        print(
            f"  pretrain:   {pretrain['steps']} MAE steps, loss {pretrain['first_loss']:.4f} -> "
            f"{pretrain['last_loss']:.4f}, {pretrain['images_per_second']} img/s"
        )
        print(f"              encoder {pretrain['encoder']}")
        print(f"              reconstructions {pretrain['reconstructions']}")
    print(f"  summary:    {Path(summary['data']).parent / 'demo_summary.json'}")
