"""What one fine-tuning step costs per backbone: the ViT with and without the spatial prior, beside the CNN yardstick.

The recipe's learning curves (docs/detection_recipe.md) compare these detectors per step; this says what a step
costs, so a curve can be read per CPU-minute too. In one run, with the recipe's detector options (0.06 mm/px
working scale, 256 px crops, 64 pyramid channels, four levels, GIoU), on random crops holding two lesions each:
  * resnet18      - the CNN yardstick (MONAI's ResNet-18 at half width under a small FPN): the peer;
  * vit           - ViT-Tiny/16 with 6 blocks under ViTDet's simple pyramid;
  * vit + prior   - the same with ViT-Adapter's spatial prior (``detector.spatial_prior_width``);
  * + strided stem, + 2 head convs - the lighter prior stem and heads (``detector.spatial_prior_stem: strided``,
    ``detector.head_convs: 2``) of the demo's and the reference's recipe, each added to the row before;
  * + bf16        - that detector under bf16 autocast (``train.precision: bf16``; ``auto`` picks it on a GPU and on
    a CPU with AMX-BF16, where oneDNN runs bf16 on its tile units; without AMX it is slower than fp32);
  * demo scale    - that detector on the demo's crops: 192 px at 0.08 mm/px, the same 15 mm field in 0.56x the
    pixels (its lesions drawn 0.75x as large).
For each: parameters, forward+backward+AdamW milliseconds per step (median of the timed steps after warm-up) and
images per second. Ends with a JSON line.

    python benchmarks/detector_step.py [--batch 8] [--steps 6] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from machine import cpu_name  # benchmarks/machine.py (this folder is on sys.path when run as a script)

from caries_mim.detection import CariesDetector, DetectorConfig
from caries_mim.models import ViTConfig
from pipelines.step_budget import median_seconds

#: (name, DetectorConfig overrides) in the order reported; the first is the peer.
VARIANTS = (
    ("resnet18", {"backbone": "resnet18"}, False),
    ("vit", {}, False),
    ("vit + prior", {"spatial_prior_width": 32}, False),
    ("+ strided stem", {"spatial_prior_width": 32, "spatial_prior_stem": "strided"}, False),
    ("+ 2 head convs", {"spatial_prior_width": 32, "spatial_prior_stem": "strided", "head_convs": 2}, False),
    ("+ bf16", {"spatial_prior_width": 32, "spatial_prior_stem": "strided", "head_convs": 2}, True),
    (
        "demo scale",
        {
            "spatial_prior_width": 32,
            "spatial_prior_stem": "strided",
            "head_convs": 2,
            "image_size": 192,
            "spacing_mm": 0.08,
            "sliding_window_overlap": 0.3333,  # a window step of 128 px, a multiple of the coarsest stride
        },
        True,
    ),
)
CROP = 256


def config(overrides: dict) -> DetectorConfig:
    """The recipe's detector (e_base.yaml / finetune_reference.yaml options) with ``overrides``."""
    encoder = ViTConfig.named("vit_tiny", patch_size=16, depth=6)
    values = {
        "encoder": encoder,
        "class_names": ("caries", "deep_caries"),
        "image_size": CROP,
        "spacing_mm": 0.06,
        "pyramid_channels": 64,
        "pyramid_levels": 4,
        "box_regression_loss": "giou",
        "anchor_shapes": ((12.0, 12.0), (9.0, 15.0), (15.0, 9.0)),
    }
    return DetectorConfig(**{**values, **overrides})


def batch(size: int, device: torch.device, crop: int = CROP) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``size`` random ``crop``-px crops in [0, 1], each with two lesion boxes of the recipe's sizes (8-25 px at
    256 px, scaled with the crop: the same lesions at another working spacing)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(size, 1, crop, crop, generator=generator)
    scale = crop / CROP
    corners = torch.randint(10, crop - 40, (size, 2, 2), generator=generator).float()
    sides = torch.randint(round(8 * scale), round(25 * scale) + 1, (size, 2, 2), generator=generator).float()
    labels = torch.tensor([0, 1])
    # Targets on the host, as fine-tuning hands them to the detector (which checks them there, then moves them).
    targets = [{"boxes": torch.cat([corners[i], corners[i] + sides[i]], dim=1), "labels": labels} for i in range(size)]
    return images.to(device), targets


def time_steps(name: str, overrides: dict, bf16: bool, size: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    detector_config = config(overrides)
    detector = CariesDetector(detector_config).to(device).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4)
    images, targets = batch(size, device, detector_config.image_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = detector.losses(images, targets)["total"]
        loss.backward()
        optimizer.step()

    milliseconds = 1000.0 * median_seconds(step, timed=steps, warmup=2, device=device)  # two warm-up steps
    return {
        "backbone": name,
        "precision": "bf16" if bf16 else "fp32",
        "crop_px": detector_config.image_size,
        "parameters_m": round(sum(p.numel() for p in detector.parameters()) / 1e6, 3),
        "ms_per_step": round(milliseconds, 1),
        "images_per_s": round(1000.0 * size / milliseconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="crops per step (the recipe's: 8)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per backbone, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.threads < 1:
        sys.exit("--batch, --steps and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [time_steps(name, overrides, bf16, args.batch, args.steps, device) for name, overrides, bf16 in VARIANTS]
    peer = rows[0]["ms_per_step"]
    print(f"{'backbone':<16}{'params (M)':>11}{'ms/step':>10}{'img/s':>8}{'x peer':>8}")
    for row in rows:
        row["relative_to_peer"] = round(row["ms_per_step"] / peer, 2)
        print(
            f"{row['backbone']:<16}{row['parameters_m']:>11.2f}{row['ms_per_step']:>10.1f}"
            f"{row['images_per_s']:>8.1f}{row['relative_to_peer']:>8.2f}"
        )
    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(
        json.dumps(
            {
                "benchmark": "detector_step",
                "machine": machine,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": args.threads,
                "batch": args.batch,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
