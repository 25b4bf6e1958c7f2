"""What MONAI's loss machinery adds to a fine-tuning step, against the network alone (the limit of a free loss).

A RetinaNet step is the network (encoder, pyramid, heads: forward and backward) plus the loss: anchors matched to
the boxes image by image (ATSS), sampled, encoded, then classification and box losses. On a CPU the network
dominates; on a GPU the per-image matching is host work (thousands of small kernel launches and host
synchronizations per step) that the GPU waits on. This times, per batch size, with the reference recipe's detector
(``+ 2 head convs`` of detector_step.py, fp32, 256 px crops with two lesions each):
  * step     - forward, losses, backward, AdamW (what fine-tuning runs);
  * network  - forward and backward of the network alone, its outputs summed as a stand-in loss (the peer: what a
               step would cost if the loss were free);
and reports the loss machinery's share. Ends with a JSON line.

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

    def network_only() -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = network(images)  # {key: [one (B, C, H, W) map per pyramid level]}
        sum(level.float().sum() for levels in outputs.values() for level in levels).backward()

    step_ms, network_ms = (
        1000.0 * median_seconds(action, timed=steps, warmup=2, device=device) for action in (step, network_only)
    )
    return {
        "batch": size,
        "step_ms": round(step_ms, 1),
        "network_ms": round(network_ms, 1),
        "loss_share": round(max(step_ms - network_ms, 0.0) / step_ms, 3),
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
    print(f"{'batch':>6}{'step ms':>10}{'network ms':>12}{'loss share':>12}{'crops/s':>10}{'network only':>14}")
    for row in rows:
        print(
            f"{row['batch']:>6}{row['step_ms']:>10.1f}{row['network_ms']:>12.1f}{row['loss_share']:>12.2f}"
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
