"""Evaluation plots as PNG files: precision-recall per class, FROC, and AP50 against the fraction of labels used.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never through ``pyplot``: no
global figure registry fills up in a long run, no GUI backend is ever chosen, and plotting from several threads
(a service, a test runner) does not share state. Every file is written atomically.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import DEFAULT_FP_RATES, FrocResult, PrecisionRecallCurve

#: Size in inches and resolution of every figure: 1200 x 900 pixels.
FIGURE_SIZE = (6.0, 4.5)
DPI = 200

#: A curve given as arrays: (recall, precision) or (recall, precision, ap).
PrecisionRecallArrays = tuple[Any, ...]


def new_figure() -> tuple[Figure, Any]:
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_figure(figure: Figure, path: str | os.PathLike, *, tight: bool = False) -> Path:
    """``tight``: grow the canvas to hold what lies outside the axes (a legend below them)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        # The temporary name ends in ".tmp": the format must be named, not guessed from the suffix.
        figure.savefig(temporary, format="png", bbox_inches="tight" if tight else None)
    return path


def _note(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="gray")


def _pr_arrays(name: str, curve: PrecisionRecallCurve | PrecisionRecallArrays) -> tuple[np.ndarray, np.ndarray, Any]:
    """(recall, precision to draw, ap or None) of one class; a :class:`PrecisionRecallCurve` draws its envelope."""
    if isinstance(curve, PrecisionRecallCurve):
        return curve.recall, curve.interpolated_precision, curve.ap
    if not isinstance(curve, (tuple, list)) or len(curve) not in (2, 3):
        raise InvalidArgumentError(f"curve {name!r} must be (recall, precision) or (recall, precision, ap)")
    recall = np.asarray(curve[0], dtype=np.float64).reshape(-1)
    precision = np.asarray(curve[1], dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise InvalidArgumentError(
            f"curve {name!r}: {recall.size} recall but {precision.size} precision values; they must pair up"
        )
    return recall, precision, curve[2] if len(curve) == 3 else None


def plot_precision_recall(
    curves: Mapping[str, PrecisionRecallCurve | PrecisionRecallArrays],
    path: str | os.PathLike,
    title: str = "Precision-recall at IoU 0.5",
) -> Path:
    """One precision-recall line per class, AP in the legend.

    Args:
        curves: class name -> :class:`~caries_mim.metrics.PrecisionRecallCurve` (its interpolated precision is
            drawn, the envelope its AP integrates), or -> (recall, precision[, ap]) arrays of equal length D, recall
            non-decreasing in [0, 1], precision in [0, 1]. Empty: the figure says there was no ground truth.
        path: the PNG to write.
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        InvalidArgumentError: a curve that is not in one of those forms.
    """
    figure, axes = new_figure()
    for name, curve in curves.items():
        recall, precision, ap = _pr_arrays(name, curve)
        label = name if ap is None else f"{name} (AP {ap:.3f})"
        # Precision before the first detection's recall is the first point's: start the step at recall 0. A class
        # with ground truth but no detection (an undertrained model) is the single point recall 0, precision 0.
        first = precision[:1] if precision.size else [0.0]
        xs, ys = np.concatenate([[0.0], recall]), np.concatenate([first, precision])
        axes.plot(xs, ys, drawstyle="steps-pre", label=label)
    if curves:
        axes.legend(loc="lower left")
    else:
        _note(axes, "no class has ground truth")
    axes.set(xlim=(0.0, 1.0), ylim=(0.0, 1.02), xlabel="recall", ylabel="precision", title=title)
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_froc(
    froc: FrocResult | tuple[Any, Any],
    path: str | os.PathLike,
    title: str = "FROC",
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
) -> Path:
    """Lesion-level sensitivity against false positives per image, on a log axis, with marks at ``fp_rates``.

    Args:
        froc: a :class:`~caries_mim.metrics.FrocResult` (its curve and its own rates and sensitivities), or
            (fps_per_image, sensitivity) arrays of equal length: false positives per image >= 0 and sensitivity in
            [0, 1] at each operating point, in any order.
        path: the PNG to write.
        title: the figure title.
        fp_rates: where to mark the sensitivity when arrays are given (a FrocResult brings its own); the marks read
            the curve as :func:`~caries_mim.metrics.froc` does, by linear interpolation.

    Returns:
        ``path``.

    Raises:
        InvalidArgumentError: arrays of different lengths, or negative false-positive rates.
    """
    if isinstance(froc, FrocResult):
        fps, sensitivity = froc.curve_fps_per_image, froc.curve_sensitivity
        rates = froc.fp_rates
        marks = froc.sensitivities
    else:
        fps = np.asarray(froc[0], dtype=np.float64).reshape(-1)
        sensitivity = np.asarray(froc[1], dtype=np.float64).reshape(-1)
        if fps.shape != sensitivity.shape:
            raise InvalidArgumentError(f"FROC: {fps.size} false-positive rates but {sensitivity.size} sensitivities")
        if (fps < 0).any():
            raise InvalidArgumentError("FROC: false positives per image must be >= 0")
        rates = tuple(float(rate) for rate in fp_rates)
        order = np.argsort(fps, kind="mergesort")
        marks = tuple(float(np.interp(rate, fps[order], sensitivity[order])) for rate in rates) if fps.size else None

    figure, axes = new_figure()
    # A log axis cannot show 0 false positives; those points hold at the left edge of the curve anyway.
    shown = fps > 0
    if shown.any():
        order = np.argsort(fps[shown], kind="mergesort")
        axes.plot(fps[shown][order], sensitivity[shown][order], drawstyle="steps-post", label="sensitivity")
    if marks is not None:
        axes.plot(rates, marks, "o", label="at " + ", ".join(f"{rate:g}" for rate in rates) + " FP/image")
        for rate, value in zip(rates, marks, strict=True):
            axes.annotate(f"{value:.2f}", (rate, value), textcoords="offset points", xytext=(0, 6), ha="center")
        axes.legend(loc="lower right")
    else:
        _note(axes, "no lesion to find")
    positive = fps[shown]
    low = min([*rates, *(positive.tolist() if positive.size else [])]) / 2.0
    high = max([*rates, *(positive.tolist() if positive.size else [])]) * 2.0
    axes.set_xscale("log")
    axes.set(xlim=(low, high), ylim=(0.0, 1.02), xlabel="false positives per image", ylabel="lesion sensitivity")
    axes.set(title=title)
    axes.grid(alpha=0.3, which="both")
    return save_figure(figure, path)


def _efficiency_row(index: int, row: Mapping[str, Any]) -> tuple[str, float, float, float | None, float | None]:
    """(init, fraction, ap50, low, high) of one row; checks the values the plot needs."""
    if not isinstance(row, Mapping):
        raise InvalidArgumentError(f"label-efficiency row {index} must be a mapping, got {type(row).__name__}")
    missing = [key for key in ("fraction", "init", "ap50") if key not in row]
    if missing:
        raise InvalidArgumentError(f"label-efficiency row {index} lacks {', '.join(missing)}")
    fraction, init = row["fraction"], row["init"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise InvalidArgumentError(f"label-efficiency row {index}: fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(init, str) or not init:
        raise InvalidArgumentError(f"label-efficiency row {index}: init must be a non-empty name, got {init!r}")
    values = []
    for key in ("ap50", "ap50_low", "ap50_high"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidArgumentError(f"label-efficiency row {index}: {key} must be a number, got {value!r}")
        values.append(None if value is None or math.isnan(value) else float(value))
    return init, float(fraction), *values


def plot_label_efficiency(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "Label efficiency"
) -> Path:
    """AP50 against the fraction of training labels used, one line per initialization.

    Rows with the same ``init`` and ``fraction`` are runs with different seeds: the point is their mean and the
    error bar spans their lowest to highest AP50 (with a handful of seeds the range says more than a standard
    deviation). A single row is drawn at its ``ap50``, with an error bar from ``ap50_low`` to ``ap50_high`` when
    both are given (a bootstrap interval). Rows whose ``ap50`` is None (undefined on the test set) are left out.

    Args:
        rows: dicts with ``fraction`` in (0, 1] (drawn as percent, log axis), ``init`` (e.g. "scratch",
            "pretrained"), ``ap50`` in [0, 1] or None, and optionally ``ap50_low`` and ``ap50_high``.
        path: the PNG to write.
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        InvalidArgumentError: a row without those keys or with values out of range.
    """
    groups: dict[str, dict[float, list[tuple[float, float | None, float | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for index, row in enumerate(rows):
        init, fraction, ap50, low, high = _efficiency_row(index, row)
        if ap50 is not None:
            groups[init][fraction].append((ap50, low, high))

    figure, axes = new_figure()
    fractions: set[float] = set()
    for init, by_fraction in groups.items():
        xs = sorted(by_fraction)
        fractions.update(xs)
        points, below, above = [], [], []
        for fraction in xs:
            runs = by_fraction[fraction]
            values = np.array([ap50 for ap50, _, _ in runs])
            point = float(values.mean())
            if len(runs) > 1:
                low, high = float(values.min()), float(values.max())
            else:
                _, low, high = runs[0]
                low, high = (point, point) if low is None or high is None else (low, high)
            points.append(point)
            below.append(max(0.0, point - low))
            above.append(max(0.0, high - point))
        axes.errorbar(
            [100.0 * x for x in xs], points, yerr=[below, above], marker="o", capsize=3, label=init, linewidth=1.5
        )
    if groups:
        axes.legend(loc="upper left")  # AP50 rises to the right: the top left stays empty
        ticks = sorted(100.0 * x for x in fractions)
        axes.set_xscale("log")
        axes.set_xticks(ticks, [f"{tick:g}%" for tick in ticks])
        axes.minorticks_off()
    else:
        _note(axes, "no AP50 to show")
    axes.set(ylim=(0.0, 1.02), xlabel="labeled training images used", ylabel="AP50", title=title)
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


__all__ = ["plot_froc", "plot_label_efficiency", "plot_precision_recall"]


def plot_learning_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    metric: str = "validation AP50",
) -> Path:
    """One line per run of ``metric`` against optimizer steps (how a recipe is chosen: which learns, how fast).

    Args:
        curves: run label -> (steps, values), same length each; values in [0, 1].
        path: the PNG to write.
    Raises:
        InvalidArgumentError: a curve whose steps and values differ in length.
    """
    figure, axes = new_figure()
    # Matplotlib's default cycle has 10 colours: past them, lines repeat colours with another dash and marker so
    # that every run stays distinguishable.
    styles = (("-", "o"), ("--", "s"), (":", "^"))
    for index, (label, (steps, values)) in enumerate(curves.items()):
        if len(steps) != len(values):
            raise InvalidArgumentError(f"curve {label!r}: {len(steps)} steps but {len(values)} values")
        line, marker = styles[(index // 10) % len(styles)]
        axes.plot(list(steps), list(values), linestyle=line, marker=marker, markersize=2.5, linewidth=1.2, label=label)
    if not curves:
        _note(axes, "no runs")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel(metric)
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, alpha=0.3)
    if curves:
        # Below the axes: a dozen runs' labels would hide the curves' starts.
        axes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return save_figure(figure, path, tight=bool(curves))
