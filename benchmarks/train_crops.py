"""What the fine-tuning data pipeline costs per crop, beside what the training step it feeds costs.

A DataLoader worker prepares the next batch while the step runs; it stays out of the way as long as preparing a
batch takes less than the step. In one run, on synthetic labeled radiographs decoded once into a warm cache:
  * cache read  - ``DetectionDataset.load`` (hash the file, read the cache entry): the floor of any epoch after the
    first;
  * crop        - ``DetectionDataset[i]`` with the training transform (cache read, resampling the whole image to
    the working spacing, the lesion / structure / uniform crop, augmentation), at the reference's scale (256 px at
    0.06 mm/px) and the demo's (192 px at 0.08 mm/px);
  * kept crop   - the same with the scaled image kept in memory (``DetectionDataset(memo_mb=...)``, what
    fine-tuning does): every crop after an image's first skips the cache read and the resize;
  * step        - one bf16 forward+backward+AdamW step of the recipe's detector on a batch of such crops
    (``benchmarks/detector_step.py``'s measurement), the time the worker has to prepare the next batch.
Prints a table, then a final JSON line.

    python benchmarks/train_crops.py [--images 24] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch
from detector_step import time_steps  # benchmarks/detector_step.py (this folder is on sys.path as a script)
from machine import cpu_name

from caries_mim.data import DecodeCache, DetectionDataset, detection_train_transform, load_annotations
from caries_mim.data.scale import ScaleRule
from caries_mim.synth import generate_dataset

#: (name, crop px, working spacing mm/px, detector_step overrides) of the two recipes.
SCALES = (
    ("reference: 256 px at 0.06 mm/px", 256, 0.06, {}),
    (
        "demo: 192 px at 0.08 mm/px",
        192,
        0.08,
        {"image_size": 192, "spacing_mm": 0.08, "sliding_window_overlap": 0.3333},
    ),
    (
        "demo: 160 px at 0.1 mm/px",
        160,
        0.1,
        {"image_size": 160, "spacing_mm": 0.1, "sliding_window_overlap": 0.4},
    ),
)
LIGHT_DETECTOR = {"spatial_prior_width": 32, "spatial_prior_stem": "strided", "head_convs": 2}


def per_item_ms(function, count: int, repeats: int = 3) -> float:
    """Median over ``repeats`` passes of the mean milliseconds of ``function(i)`` for i < ``count``."""
    passes = []
    for repeat in range(repeats):
        started = time.perf_counter()
        for index in range(count):
            function(index, repeat)
        passes.append((time.perf_counter() - started) * 1000 / count)
    return statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="synthetic labeled images (at least 10)")
    parser.add_argument("--batch", type=int, default=8, help="crops per step (the recipes': 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the step")
    args = parser.parse_args()
    if args.images < 10 or args.batch < 1 or args.threads < 1:
        sys.exit("--images must be >= 10, --batch and --threads >= 1")
    cv2.setNumThreads(1)  # a DataLoader worker runs its transforms on one thread
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", n_unlabeled=0, n_labeled=args.images, seed=0, progress=False)
        records = load_annotations(root / "data" / "labeled" / "train.json").records
        dataset = DetectionDataset(records, cache=DecodeCache(root / "cache"), progress=False)  # warms the cache
        count = len(dataset)
        read_ms = per_item_ms(lambda index, _: dataset.load(dataset.records[index].image_path), count)
        torch.set_num_threads(args.threads)
        for name, crop, spacing, overrides in SCALES:
            dataset.transform = detection_train_transform(
                crop, crop_size=crop, positive_fraction=0.7, rule=ScaleRule(crop, 4.0, spacing)
            )
            crop_ms = per_item_ms(lambda index, repeat: dataset[(index, repeat * count + index)], count)
            kept = DetectionDataset(records, cache=dataset.load.cache, progress=False, validate=False, memo_mb=1024)
            kept.transform = dataset.transform
            for index in range(count):  # every image scaled once and kept
                kept[index]
            kept_ms = per_item_ms(lambda index, repeat, kept=kept: kept[(index, repeat * count + index)], count)
            step = time_steps(name, {**LIGHT_DETECTOR, **overrides}, True, args.batch, 4, torch.device("cpu"))
            rows.append(
                {
                    "scale": name,
                    "cache_read_ms": round(read_ms, 2),
                    "crop_ms": round(crop_ms, 2),
                    "kept_crop_ms": round(kept_ms, 2),
                    "batch_ms": round(crop_ms * args.batch, 1),
                    "kept_batch_ms": round(kept_ms * args.batch, 1),
                    "step_ms": step["ms_per_step"],
                    "batch_over_step": round(crop_ms * args.batch / step["ms_per_step"], 3),
                }
            )
    print(f"{'scale':<34}{'read ms':>9}{'crop ms':>9}{'kept ms':>9}{'batch ms':>10}{'step ms':>9}{'batch/step':>12}")
    for row in rows:
        print(
            f"{row['scale']:<34}{row['cache_read_ms']:>9.2f}{row['crop_ms']:>9.2f}{row['kept_crop_ms']:>9.2f}"
            f"{row['batch_ms']:>10.1f}{row['step_ms']:>9.1f}{row['batch_over_step']:>12.3f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "train_crops",
                "machine": cpu_name(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "images": count,
                "batch": args.batch,
                "threads": args.threads,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
