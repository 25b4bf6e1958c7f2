"""Pictures of the representation measures: one figure per measure with every encoder overlaid, and attention maps
over a radiograph. Drawn like :mod:`caries_mim.curves` (Agg canvas, never pyplot; files written atomically)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from caries_mim.curves import new_figure, save_figure
from caries_mim.visualization import tile, to_uint8


def layer_figure(
    path: str | os.PathLike,
    title: str,
    ylabel: str,
    per_layer: Mapping[str, Sequence[float]],
    per_head: Mapping[str, Sequence[Sequence[float]]] | None = None,
    reference: tuple[float, str] | None = None,
) -> Path:
    """A measure against block index (1 = first block), one line per encoder; ``per_head`` adds each head as a dot
    of the encoder's colour (attention distance and NMI vary more between heads than between layers);
    ``reference`` (value, label) a dashed grey line, e.g. what uniform attention would give."""
    figure, axes = new_figure()
    if reference is not None:
        axes.axhline(reference[0], color="gray", linestyle="--", label=reference[1])
    for index, (name, values) in enumerate(per_layer.items()):
        colour = f"C{index}"
        layers = np.arange(1, len(values) + 1)
        axes.plot(layers, values, marker="o", color=colour, label=name)
        for layer, heads in zip(layers, (per_head or {}).get(name, ()), strict=False):
            axes.scatter(np.full(len(heads), layer), heads, s=8, color=colour, alpha=0.4)
    axes.set_xlabel("block")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def probe_figure(path: str | os.PathLike, results: Mapping[str, Mapping[str, float]], chance: float) -> Path:
    """Grouped bars of linear-probe and k-NN accuracy per encoder, with the majority-class line."""
    figure, axes = new_figure()
    names = list(results)
    positions = np.arange(len(names))
    for offset, (key, label) in zip((-0.2, 0.2), (("linear_probe", "linear probe"), ("knn", "k-NN")), strict=True):
        axes.bar(positions + offset, [results[name][key] for name in names], width=0.4, label=label)
    axes.axhline(chance, color="gray", linestyle="--", label=f"majority class ({chance:.2f})")
    axes.set_xticks(positions, names, rotation=20, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("held-out accuracy")
    axes.set_title("frozen features: healthy / caries / deep caries surfaces")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def attention_picture(image: np.ndarray, cls_attention: torch.Tensor, heads: Sequence[int]) -> Image.Image:
    """The radiograph ``image`` (S, S) in [0, 1] beside the CLS token's attention of each of ``heads``, from
    ``cls_attention`` (heads, rows, columns) over the patches, upsampled to the image and laid over it in colour."""
    base = to_uint8(image)
    pictures = [Image.fromarray(base).convert("RGB")]
    for head in heads:
        weights = cls_attention[head].float().cpu().numpy()
        weights = (weights - weights.min()) / max(float(weights.max() - weights.min()), 1e-12)
        heat = cv2.resize(weights, base.shape[::-1], interpolation=cv2.INTER_NEAREST)
        coloured = cv2.applyColorMap(to_uint8(heat), cv2.COLORMAP_INFERNO)[..., ::-1]
        grey = np.repeat(base[..., None], 3, axis=2)
        pictures.append(Image.fromarray((0.5 * grey + 0.5 * coloured).astype(np.uint8)))
    # At least 320 px a cell: a 160 px field's 10 x 10 patches stay readable.
    return tile(pictures, columns=len(pictures), cell_width=max(base.shape[1], 320))
