"""``python -m pipelines.visibility_figure``: the figure and the figures behind the generator's visibility floor.

Draws lesions from a deliberately hard generator setting (low exposure, faint lesions) so that many fall near the
floor, and tiles each one as the reader sees it (left) beside the identical image without that lesion (same noise,
right), sorted by conspicuity; green frames are at or above the floor, red ones under it. It also measures, on the
default generator, how many drawn lesions fall under the floor and how the visible-extent box differs from the
demineralization-field box. Prints one JSON line with those statistics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from caries_mim.atomic_files import atomic_write_bytes
from caries_mim.synth.config import SynthConfig
from caries_mim.synth.conspicuity import measure_visibility
from caries_mim.synth.dataset import image_rng
from caries_mim.synth.render import plan_scene, rasterize

#: A setting where lesions span the floor: a third of the default exposure and the faint half of the lesions.
HARD_SETTING = {"exposure_photons": (300.0, 3000.0), "lesion_mineral_loss": (0.05, 0.5), "lesion_free_fraction": 0.0}

#: Conspicuities the figure shows (two lesions each), from far below the default floor to well above it.
FIGURE_CONSPICUITIES = (1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0)

_TILE = 30  # half side (px) of a lesion tile, at the image's own resolution
_ZOOM = 3  # tiles are enlarged this much (nearest neighbour) so a 0.2 mm lesion spans a few screen pixels


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _tile(with_lesion: np.ndarray, without: np.ndarray, box, text: str, marked: bool) -> np.ndarray:
    cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
    low, high = np.percentile(with_lesion, [1, 99.5])

    def crop(image: np.ndarray) -> np.ndarray:
        padded = np.pad(image.astype(np.float32), _TILE, mode="edge")[cy : cy + 2 * _TILE, cx : cx + 2 * _TILE]
        return np.clip((padded - low) / max(high - low, 1.0) * 255.0, 0, 255).astype(np.uint8)

    gap = np.zeros((2 * _TILE, 4), dtype=np.uint8)
    pair = cv2.cvtColor(np.hstack([crop(with_lesion), gap, crop(without)]), cv2.COLOR_GRAY2BGR)
    pair = cv2.resize(pair, None, fx=_ZOOM, fy=_ZOOM, interpolation=cv2.INTER_NEAREST)
    colour = (0, 200, 0) if marked else (0, 0, 230)
    cv2.rectangle(pair, (0, 0), (pair.shape[1] - 1, pair.shape[0] - 1), colour, 3)
    cv2.putText(pair, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1, cv2.LINE_AA)
    return pair


def lesion_tiles(config: SynthConfig, seed: int, images: int):
    """(conspicuity, depth, tile-ready arrays) of every lesion in ``images`` renders."""
    for index in range(images):
        scene = rasterize(plan_scene(image_rng(seed, "labeled", index), config))
        noisy = scene.acquire()
        for annotation, visibility in measure_visibility(scene, noisy, config.visibility_floor):
            raster = next(r for r in scene.lesions if r.annotation is annotation)
            without = scene.acquire(omit_lesions=(raster.spec_index,))
            yield visibility, annotation, noisy, without


def default_statistics(seed: int, images: int) -> dict:
    """Share of lesions under the floor and visible-vs-field box agreement on the default generator."""
    config = SynthConfig()
    scores, ious, area_ratios = [], [], []
    for visibility, annotation, _, _ in lesion_tiles(config, seed, images):
        scores.append(visibility.conspicuity)
        if visibility.visible_box is not None and visibility.conspicuity >= config.visibility_floor:
            field, visible = annotation.field_box, visibility.visible_box
            ious.append(_iou(field, visible))
            area_ratios.append(
                (visible[2] - visible[0]) * (visible[3] - visible[1]) / ((field[2] - field[0]) * (field[3] - field[1]))
            )
    scores_a = np.asarray(scores)
    return {
        "lesions": int(scores_a.size),
        "under_floor": float(np.mean(scores_a < config.visibility_floor)),
        "conspicuity_percentiles_5_25_50_75_95": np.percentile(scores_a, [5, 25, 50, 75, 95]).round(2).tolist(),
        "visible_vs_field_box_iou_median": float(np.median(ious)),
        "visible_vs_field_box_iou_p10": float(np.percentile(ious, 10)),
        "visible_over_field_area_median": float(np.median(area_ratios)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/visibility_floor.jpg", help="JPEG to write")
    parser.add_argument("--images", type=int, default=60, help="renders per setting")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    hard = SynthConfig(**HARD_SETTING)
    floor = hard.visibility_floor
    lesions = [
        (visibility.conspicuity, annotation.depth, visibility.visible_box or annotation.field_box, noisy, without)
        for visibility, annotation, noisy, without in lesion_tiles(hard, args.seed, args.images)
    ]
    lesions.sort(key=lambda item: item[0])
    # Two lesions nearest each of these conspicuities: the progression from invisible to obvious, across the floor.
    chosen: list[int] = []
    for target in FIGURE_CONSPICUITIES:
        nearest = sorted((i for i in range(len(lesions)) if i not in chosen), key=lambda i: abs(lesions[i][0] - target))
        chosen.extend(nearest[:2])
    tiles = [
        _tile(noisy, without, box, f"CNR {score:.1f} {depth.replace('_', ' ')}", score >= floor)
        for score, depth, box, noisy, without in sorted((lesions[i] for i in chosen), key=lambda item: item[0])
    ]
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    figure = np.vstack([np.hstack(tiles[i : i + 4]) for i in range(0, len(tiles), 4)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", figure, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode the figure as JPEG")
    atomic_write_bytes(out, encoded.tobytes())
    summary = {
        "figure": str(out),
        "floor": floor,
        "hard_setting_lesions": len(lesions),
        "hard_setting_under_floor": float(np.mean([item[0] < floor for item in lesions])),
        "default": default_statistics(args.seed, args.images),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
