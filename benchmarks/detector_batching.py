"""What the detector's batched inference saves over MONAI's stock RetinaNetDetector path, per image, by batch size.

In one run, on one synthetic bitewing repeated to batches of 1, 8 and 16 images, with a trained package:
  * monai - MONAI's ``SlidingWindowInferer`` and ``RetinaNetDetector.postprocess_detections`` (stitching and box
            selection image by image, NMS in a Python loop): the peer;
  * ours  - ``CariesDetector.predict`` as shipped (``BatchSlidingWindow``; selection and one NMS for the batch).
Same network, same windows per network call; both must return the same boxes (checked). Reports milliseconds per
image and tensor operations dispatched per image (each one a kernel launch and host work on a GPU, where they, not
the arithmetic, bound a small model's batch), then a final JSON line.

    python benchmarks/detector_batching.py [--model runs/demo/finetune/model.cmpkg] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (this folder is on sys.path when run as a script)
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from torch.profiler import ProfilerActivity, profile

from caries_mim.detection import CariesDetector, prepare_image
from caries_mim.io import read_radiograph
from caries_mim.package import load_package
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.app import GPU_WINDOW_BATCH_SIZE  # the service's windows per network call on a GPU

BATCHES = (1, 8, 16)


def monai_path(detector: CariesDetector, windows: int) -> CariesDetector:
    """The same detector object switched to MONAI's own sliding window and box selection."""
    retinanet = detector.retinanet
    config = detector.config
    retinanet.set_sliding_window_inferer(
        roi_size=(config.roi_size, config.roi_size),
        sw_batch_size=windows,
        overlap=config.sliding_window_overlap,
        mode="constant",
    )
    retinanet.postprocess_detections = types.MethodType(RetinaNetDetector.postprocess_detections, retinanet)
    return detector


def operations(function, images: torch.Tensor) -> int:
    """Top-level ATen operations one call dispatches (an op inside another op is not counted again)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function(images)
    count = 0
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/demo/finetune/model.cmpkg"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size and path")
    args = parser.parse_args()
    if not args.model.is_file():
        print(f"error: no model package at {args.model}: run `make demo` first, or pass --model", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ours = load_package(args.model, device).detector
    peer = copy.deepcopy(ours)  # the same weights, switched to MONAI's path below
    windows = GPU_WINDOW_BATCH_SIZE if device.type == "cuda" else ours.config.sliding_window_batch_size
    ours.set_window_batch_size(windows)
    monai_path(peer, windows)
    with tempfile.TemporaryDirectory() as tmp:
        image = render_indexed(0, "labeled", 0, SynthConfig())
        path = Path(tmp) / "bitewing.dcm"
        write_dicom(
            image, path, index=0, seed=0, transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME2"
        )
        radiograph = read_radiograph(path)
    tensor = prepare_image(radiograph.pixels, ours.config)[0].to(device)
    print(f"model {args.model}, {radiograph.height} x {radiograph.width} {image.view} -> {tuple(tensor.shape[-2:])}")

    results = {}
    header = ("batch", "monai ms/img", "ours ms/img", "monai ops/img", "ours ops/img", "boxes")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (5, 13, 12, 14, 13, 6), strict=True)))
    for batch in BATCHES:
        images = tensor.expand(batch, -1, -1, -1).contiguous()
        timings: dict[str, list[float]] = {"monai": [], "ours": []}
        with torch.inference_mode():
            found, expected = ours.predict(images), peer.predict(images)
            for mine, theirs in zip(found, expected, strict=True):
                same = mine["boxes"].shape == theirs["boxes"].shape and torch.allclose(
                    mine["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3
                )
                if not same or not torch.equal(mine["labels"], theirs["labels"]):
                    print(f"error: batch {batch}: the two paths found different boxes", file=sys.stderr)
                    return 1
            for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits both alike
                for name, detector in (("monai", peer), ("ours", ours)):
                    sync()
                    started = time.perf_counter()
                    detector.predict(images)
                    sync()
                    timings[name].append((time.perf_counter() - started) * 1000 / batch)
            ops = {name: operations(d.predict, images) / batch for name, d in (("monai", peer), ("ours", ours))}
        row = {
            "monai_ms_per_image": round(statistics.median(timings["monai"]), 1),
            "ours_ms_per_image": round(statistics.median(timings["ours"]), 1),
            "monai_ops_per_image": round(ops["monai"]),
            "ours_ops_per_image": round(ops["ours"]),
            "boxes_per_image": round(sum(len(f["scores"]) for f in found) / batch, 1),
        }
        results[batch] = row
        print(
            f"{batch:>5} {row['monai_ms_per_image']:>13} {row['ours_ms_per_image']:>12} "
            f"{row['monai_ops_per_image']:>14} {row['ours_ops_per_image']:>13} {row['boxes_per_image']:>6}"
        )
    summary = {
        "benchmark": "detector_batching",
        "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "windows_per_call": windows,
        **{f"{key}_b{batch}": value for batch, row in results.items() for key, value in row.items()},
        "speedup_b1": round(results[1]["monai_ms_per_image"] / results[1]["ours_ms_per_image"], 2),
        "speedup_b16": round(results[16]["monai_ms_per_image"] / results[16]["ours_ms_per_image"], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
