"""What one NMS for a whole batch saves over MONAI's NMS loop, image by image.

In one run, on candidate boxes shaped like the demo model's (see ``candidates``), for batches of 1, 8 and 16 images:
  * monai - ``monai.data.box_utils.batched_nms`` per image: what ``RetinaNetDetector`` runs (the peer);
  * ours  - ``caries_mim.detection.box_selection.batched_nms`` on the batch: what ``CariesDetector`` runs.
Both must keep the same boxes (checked); prints milliseconds per image, then a final JSON line.

    python benchmarks/box_selection.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from machine import cpu_name  # benchmarks/machine.py (this folder is on sys.path when run as a script)
from monai.data.box_utils import batched_nms as monai_batched_nms

from caries_mim.detection import DetectorConfig
from caries_mim.detection.box_selection import batched_nms

#: The demo model's box selection (DetectorConfig's defaults): IoU threshold and boxes kept per image.
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DetectorConfig)}
IOU_THRESHOLD, MAX_KEPT = _DEFAULTS["nms_threshold"], _DEFAULTS["detections_per_image"]
BATCHES = (1, 8, 16)


def candidates(generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's candidates as the demo model gives them on a 384 px bitewing (measured on 8 images: 1,100-2,000
    above the 0.05 score threshold, half per class, the 100th box kept near rank 500): 1,600 boxes of 8-40 px in
    clusters of 20 around 80 places, the centre of a cluster scoring highest."""
    places, per_place = 80, 20
    centres = torch.rand(places, 1, 2, generator=generator) * 340 + 20
    sizes = torch.rand(places, 1, 2, generator=generator) * 32 + 8
    jitter = torch.randn(places, per_place, 2, generator=generator) * sizes * 0.25
    scale = 1 + torch.randn(places, per_place, 1, generator=generator).abs() * 0.2
    half = sizes * scale / 2
    middle = centres + jitter
    boxes = torch.cat([middle - half, middle + half], dim=-1).clamp(0, 384).reshape(-1, 4)
    distance = jitter.norm(dim=-1).reshape(-1) / sizes.norm(dim=-1).expand(places, per_place).reshape(-1)
    scores = (0.6 * torch.rand(places, 1, generator=generator).expand(places, per_place).reshape(-1)) * torch.exp(
        -3 * distance
    ) + 0.05
    labels = torch.randint(0, 2, (places * per_place,), generator=generator)
    return boxes.to(device), scores.to(device), labels.to(device)


def timed_ms(function: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls, after one warm-up call."""
    function()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size and method")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator().manual_seed(0)
    images = [candidates(generator, device) for _ in range(max(BATCHES))]
    results = {}
    print(f"{'batch':>5} {'monai ms/image':>15} {'ours ms/image':>14} {'speedup':>8}")
    for batch in BATCHES:
        boxes, scores, labels = zip(*images[:batch], strict=True)
        expected = [monai_batched_nms(*image, IOU_THRESHOLD, max_proposals=MAX_KEPT) for image in images[:batch]]
        kept = batched_nms(boxes, scores, labels, IOU_THRESHOLD, MAX_KEPT)
        if not all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True)):
            print(f"error: batch {batch}: our NMS kept other boxes than MONAI's", file=sys.stderr)
            return 1
        monai_ms = timed_ms(
            lambda batch=batch: [
                monai_batched_nms(*image, IOU_THRESHOLD, max_proposals=MAX_KEPT) for image in images[:batch]
            ],
            sync,
            args.repeats,
        )
        ours_ms = timed_ms(
            lambda boxes=boxes, scores=scores, labels=labels: batched_nms(
                boxes, scores, labels, IOU_THRESHOLD, MAX_KEPT
            ),
            sync,
            args.repeats,
        )
        results[batch] = {
            "monai_ms_per_image": round(monai_ms / batch, 2),
            "ours_ms_per_image": round(ours_ms / batch, 2),
            "speedup": round(monai_ms / ours_ms, 1),
            "kept_per_image": round(sum(len(k) for k in kept) / batch, 1),
        }
        row = results[batch]
        print(f"{batch:>5} {row['monai_ms_per_image']:>15} {row['ours_ms_per_image']:>14} {row['speedup']:>7}x")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    summary = {
        "benchmark": "box_selection",
        "device": str(device),
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "candidates_per_image": int(images[0][0].shape[0]),
        **{f"monai_ms_b{b}": results[b]["monai_ms_per_image"] for b in BATCHES},
        **{f"ours_ms_b{b}": results[b]["ours_ms_per_image"] for b in BATCHES},
        "speedup_b1": results[1]["speedup"],
        "speedup_b16": results[16]["speedup"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
