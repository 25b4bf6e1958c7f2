"""Pictures people look at: radiographs with boxes drawn on them, and grids of such pictures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from caries_mim.metrics import EvaluatedImage

#: Colour per label: warm for findings, so they stand out on a gray radiograph; unknown labels get white.
LABEL_COLOURS = {
    "caries": (255, 196, 0),
    "deep_caries": (255, 64, 64),
}
DEFAULT_COLOUR = (255, 255, 255)
#: Colour of ground-truth boxes: green, apart from the warm colours of findings.
TRUTH_COLOUR = (64, 220, 96)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) uint8 in [0, 255], rounded, values outside [0, 1] clipped."""
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def draw_findings(
    pixels: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    *,
    line_width: int | None = None,
) -> Image.Image:
    """Draw boxes on a radiograph.

    Args:
        pixels: (H, W) float array in [0, 1], bright = more attenuating (a ``Radiograph.pixels``).
        boxes: (N, 4) [x0, y0, x1, y1] in pixels of ``pixels``.
        labels: N label names, used for colour and caption.
        scores: optional N scores in [0, 1], shown after the label.
        line_width: box outline in pixels; default scales with the image (about 0.3% of the longer side).
    Returns:
        An RGB image of size (W, H).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels / {len(scores or [])} scores")
    image = Image.fromarray(to_uint8(pixels), mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    width = line_width or max(2, round(max(image.size) * 0.003))
    for index, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        colour = LABEL_COLOURS.get(label, DEFAULT_COLOUR)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        caption = label if scores is None else f"{label} {scores[index]:.2f}"
        draw.text((x0 + width, max(0.0, y0 - 12 - width)), caption, fill=colour)
    return image


def tile(images: Sequence[Image.Image], *, columns: int = 4, cell_width: int = 480) -> Image.Image:
    """Lay images out in a grid, each scaled (aspect kept) to ``cell_width`` wide, on a black background."""
    if not images:
        raise ValueError("nothing to tile")
    scaled = [image.resize((cell_width, max(1, round(image.height * cell_width / image.width)))) for image in images]
    cell_height = max(image.height for image in scaled)
    rows = (len(scaled) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height))
    for index, image in enumerate(scaled):
        sheet.paste(image.convert("RGB"), ((index % columns) * cell_width, (index // columns) * cell_height))
    return sheet


def draw_predictions_and_truth(
    pixels: np.ndarray, image: EvaluatedImage, class_names: Sequence[str], threshold: float
) -> Image.Image:
    """Findings at the operating point (warm colours, with scores) and ground truth (green, "truth" captions).

    Args:
        pixels: (H, W) float in [0, 1], the image ``image``'s boxes refer to.
    """
    kept = image.pred_scores >= threshold
    picture = draw_findings(
        pixels,
        image.pred_boxes[kept],
        [class_names[label] for label in image.pred_labels[kept]],
        image.pred_scores[kept].tolist(),
    )
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) * 0.003))
    for box, label in zip(image.gt_boxes, image.gt_labels, strict=True):
        x0, y0, x1, y1 = (float(value) for value in box)
        draw.rectangle((x0, y0, x1, y1), outline=TRUTH_COLOUR, width=width)
        # Below the box: the findings' captions sit above theirs.
        draw.text((x0 + width, y1 + width), f"truth {class_names[label]}", fill=TRUTH_COLOUR)
    return picture
