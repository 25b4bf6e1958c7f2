"""What the loss machinery adds to a fine-tuning step: ours (batched), MONAI's (per image), and none at all.

A RetinaNet step is the network (encoder, pyramid, heads: forward and backward) plus the loss: anchors matched to
the boxes (ATSS), encoded, then classification and box losses. MONAI matches image by image; on a GPU that is host
work (thousands of small kernel launches and host synchronizations per step) that the GPU waits on, so the
detector matches the whole batch at once (caries_mim/detection/batched_loss.py). This times, per batch size, with
the reference recipe's detector (``+ 2 head convs`` of detector_step.py, fp32, 256 px crops with two lesions each):
  * step       - forward, losses, backward, AdamW (what fine-tuning runs, with the batched loss);
  * MONAI step - the same with MONAI's per-image ``compute_loss`` (the peer);
  * network    - forward and backward of the network alone, its outputs summed as a stand-in loss (the limit:
                 what a step would cost if the loss were free);
and reports the loss machinery's share of each step. On a CPU the network dominates and the three are close.
Ends with a JSON line.

    python benchmarks/detector_loss_share.py [--batches 8,16,32,64] [--steps 5] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from detector_step import VARIANTS, batch, config  # benchmarks/ is on sys.path when run as a script
from machine import cpu_name
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

from caries_mim.detection import CariesDetector
from pipelines.step_budget import median_seconds

RECIPE = next(overrides for name, overrides, bf16 in VARIANTS if name == "+ 2 head convs")


def measure(size: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    detector = CariesDetector(config(RECIPE)).to(device).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4)
    images, targets = batch(size, device)
    network = detector.retinanet.network

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        detector.losses(images, targets)["total"].backward()
        optimizer.step()

    def monai_step() -> None:
        # MONAI's per-image compute_loss on the same detector: the method the batched one overrides.
        retinanet = detector.retinanet
        retinanet.compute_loss = RetinaNetDetector.compute_loss.__get__(retinanet)
        try:
            step()
        finally:
            del retinanet.compute_loss

    def network_only() -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = network(images)  # {key: [one (B, C, H, W) map per pyramid level]}
        sum(level.float().sum() for levels in outputs.values() for level in levels).backward()

    step_ms, monai_ms, network_ms = (
        1000.0 * median_seconds(action, timed=steps, warmup=2, device=device)
        for action in (step, monai_step, network_only)
    )
    return {
        "batch": size,
        "step_ms": round(step_ms, 1),
        "monai_step_ms": round(monai_ms, 1),
        "network_ms": round(network_ms, 1),
        "loss_share": round(max(step_ms - network_ms, 0.0) / step_ms, 3),
        "monai_loss_share": round(max(monai_ms - network_ms, 0.0) / monai_ms, 3),
        "speedup_over_monai": round(monai_ms / step_ms, 2),
        "crops_per_s": round(1000.0 * size / step_ms, 1),
        "crops_per_s_network_only": round(1000.0 * size / network_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measure, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    try:
        sizes = [int(part) for part in args.batches.split(",")]
    except ValueError:
        sys.exit(f"--batches expects comma-separated integers, got {args.batches!r}")
    if args.steps < 1 or args.threads < 1 or not sizes or min(sizes) < 1:
        sys.exit("--steps, --threads and every batch size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(size, args.steps, device) for size in sizes]
    print(
        f"{'batch':>6}{'step ms':>10}{'MONAI step ms':>15}{'network ms':>12}{'loss share':>12}{'MONAI share':>13}"
        f"{'crops/s':>10}{'network only':>14}"
    )
    for row in rows:
        print(
            f"{row['batch']:>6}{row['step_ms']:>10.1f}{row['monai_step_ms']:>15.1f}{row['network_ms']:>12.1f}"
            f"{row['loss_share']:>12.2f}{row['monai_loss_share']:>13.2f}"
            f"{row['crops_per_s']:>10.1f}{row['crops_per_s_network_only']:>14.1f}"
        )
    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(
        json.dumps(
            {
                "benchmark": "detector_loss_share",
                "machine": machine,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": args.threads,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
