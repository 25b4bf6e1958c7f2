"""Evaluation plots: each writes a readable PNG atomically, accepts its documented inputs, refuses others."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from caries_mim.curves import DPI, FIGURE_SIZE, plot_froc, plot_label_efficiency, plot_precision_recall
from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import froc, precision_recall_curve
from tests.metrics.factory import make_image
from tests.metrics.test_coco import CLASSES, _random_fixture

EXPECTED_SIZE = (round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI))


def _assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == EXPECTED_SIZE
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # Never through pyplot: nothing registered in its global figure manager, if anyone imported it at all.
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_precision_recall_from_curves_and_from_arrays(tmp_path):
    curves = precision_recall_curve(_random_fixture(1), CLASSES)
    _assert_png(plot_precision_recall(curves, tmp_path / "pr.png"))
    arrays = {name: (curve.recall, curve.precision) for name, curve in curves.items()}
    arrays["with_ap"] = ([0.0, 0.5, 1.0], [1.0, 0.8, 0.5], 0.7)
    _assert_png(plot_precision_recall(arrays, tmp_path / "pr_arrays.png", title="arrays"))
    _assert_png(plot_precision_recall({}, tmp_path / "pr_empty.png"))


def test_precision_recall_draws_a_class_without_detections(tmp_path):
    # An undertrained model may find nothing of a class the data has: one point at recall 0, not a crash.
    images = [make_image("a", [((0, 0, 10, 10), 0), ((20, 20, 30, 30), 1)], [((0, 0, 10, 10), 0, 0.9)])]
    curves = precision_recall_curve(images, CLASSES[:2])
    assert curves[CLASSES[1]].recall.size == 0
    _assert_png(plot_precision_recall(curves, tmp_path / "pr.png"))
    _assert_png(plot_precision_recall({"caries": ([], [])}, tmp_path / "pr_arrays.png"))


def test_precision_recall_refuses_mismatched_arrays(tmp_path):
    with pytest.raises(InvalidArgumentError, match="must pair up"):
        plot_precision_recall({"caries": ([0.1, 0.2], [1.0])}, tmp_path / "pr.png")
    with pytest.raises(InvalidArgumentError, match="recall, precision"):
        plot_precision_recall({"caries": [0.1]}, tmp_path / "pr.png")
    assert not list(tmp_path.iterdir())


def test_froc_from_result_arrays_and_without_lesions(tmp_path):
    result = froc(_random_fixture(2))
    _assert_png(plot_froc(result, tmp_path / "froc.png"))
    _assert_png(plot_froc((result.curve_fps_per_image, result.curve_sensitivity), tmp_path / "froc_arrays.png"))
    no_lesions = froc([make_image("negative", predictions=[([0.0, 0.0, 5.0, 5.0], 0, 0.5)])])
    assert no_lesions.score is None
    _assert_png(plot_froc(no_lesions, tmp_path / "froc_empty.png"))


def test_froc_refuses_bad_arrays(tmp_path):
    with pytest.raises(InvalidArgumentError, match="sensitivities"):
        plot_froc(([0.5, 1.0], [0.2]), tmp_path / "froc.png")
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        plot_froc(([-1.0], [0.2]), tmp_path / "froc.png")


def test_label_efficiency_with_seeds_intervals_and_undefined_points(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"fraction": fraction, "init": init, "ap50": float(base + 0.05 * rng.random()), "seed": seed}
        for fraction in (0.1, 0.25, 1.0)
        for init, base in (("scratch", 0.2), ("pretrained", 0.4))
        for seed in range(3)
    ]
    rows.append({"fraction": 0.05, "init": "pretrained", "ap50": 0.3, "ap50_low": 0.2, "ap50_high": 0.4})
    rows.append({"fraction": 0.05, "init": "scratch", "ap50": None})
    _assert_png(plot_label_efficiency(rows, tmp_path / "efficiency.png"))
    _assert_png(plot_label_efficiency([], tmp_path / "efficiency_empty.png"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"init": "scratch", "ap50": 0.3}, "lacks fraction"),
        ({"fraction": 0.0, "init": "scratch", "ap50": 0.3}, "fraction must be in"),
        ({"fraction": 50, "init": "scratch", "ap50": 0.3}, "fraction must be in"),
        ({"fraction": 0.5, "init": "", "ap50": 0.3}, "init must be"),
        ({"fraction": 0.5, "init": "scratch", "ap50": "high"}, "ap50 must be a number"),
        ("not a row", "must be a mapping"),
    ],
)
def test_label_efficiency_refuses_bad_rows(tmp_path, row, message):
    with pytest.raises(InvalidArgumentError, match=message):
        plot_label_efficiency([row], tmp_path / "efficiency.png")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = plot_froc(froc(_random_fixture(1)), tmp_path / "froc.png")
    before = path.read_bytes()

    def failing_savefig(self, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_froc(froc(_random_fixture(2)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["froc.png"]


def test_learning_curves_are_one_png_and_refuse_ragged_curves(tmp_path):
    from caries_mim.curves import plot_learning_curves

    path = plot_learning_curves({"a": ([100, 200], [0.1, 0.3]), "b": ([100], [0.2])}, tmp_path / "curves.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(InvalidArgumentError, match="2 steps but 1 values"):
        plot_learning_curves({"a": ([1, 2], [0.1])}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_recipe_curves_reads_run_folders_and_prints_the_table(tmp_path, capsys):
    from pipelines.recipe_curves import main

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"split": "train", "step": 10, "loss_total": 1.0},
        {"split": "val", "step": 200, "ap50": 0.5, "froc": 0.6},
        {"split": "val", "step": 100, "ap50": 0.25, "froc": 0.4},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert main([f"phys={run}", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| phys | 200 | 0.500 | 0.500 (200) | 0.600 |" in out
    assert (tmp_path / "c.png").is_file()
    # --rows keeps the validation rows as a CSV that reads back as the same curve.
    assert main([f"phys={run}", "--out", str(tmp_path / "c.png"), "--rows", str(tmp_path / "rows")]) == 0
    kept = tmp_path / "rows" / "run.csv"
    assert kept.read_text() == "step,ap50,froc\n100,0.2500,0.4000\n200,0.5000,0.6000\n"
    capsys.readouterr()
    assert main([f"phys={kept}", "--out", str(tmp_path / "e.png")]) == 0
    assert "| phys | 200 | 0.500 | 0.500 (200) | 0.600 |" in capsys.readouterr().out
    assert main([str(run), "--out", str(tmp_path / "d.png")]) == 2
    assert main([f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "d.png")]) == 2


def test_recipe_curves_reads_a_csv_of_a_run_whose_folder_was_not_kept(tmp_path, capsys):
    from pipelines.recipe_curves import main

    table = tmp_path / "earlier.csv"
    table.write_text("step,ap50,froc\n500,0.3,\n250,0.1,0.2\n")
    assert main([f"earlier={table}", "--out", str(tmp_path / "c.png")]) == 0
    assert "| earlier | 500 | 0.300 | 0.300 (500) |  |" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("step,loss\n1,2\n")
    assert main([f"bad={tmp_path / 'bad.csv'}", "--out", str(tmp_path / "d.png")]) == 2
    assert "is not a step,ap50[,froc] CSV" in capsys.readouterr().err
