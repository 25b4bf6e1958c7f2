"""`caries-mim analyze` end to end on tiny encoders and a small synthetic set: JSON, figures, probes, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from caries_mim.models import VisionTransformer, ViTConfig, load_encoder, save_encoder
from caries_mim.synth import generate_dataset
from pipelines.analyze import parse_encoders
from pipelines.cli import main

TINY = ViTConfig(image_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=0, n_labeled=10, seed=5, progress=False)
    return out / "labeled"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("encoders")
    paths = {}
    for seed, name in enumerate(("random_a", "random_b")):
        torch.manual_seed(seed)
        paths[name] = folder / f"{name}.pt"
        save_encoder(VisionTransformer(TINY), paths[name], {"objective": {"name": "mae"}, "steps": seed})
    return paths


def analyze(encoders: dict[str, Path], data: Path, out: Path, *extra: str) -> int:
    named = [item for name, path in encoders.items() for item in ("--encoder", f"{name}={path}")]
    return main(["analyze", *named, "--data", str(data), "--out", str(out), "--images", "4", "--quiet", *extra])


def test_several_encoders_are_measured_on_the_same_images_with_probes_and_figures(labeled, encoders, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert analyze(encoders, labeled, out, "--labels", str(labeled / "train.json"), "--crop", "96") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["analysis"]
    assert set(line) == {"random_a", "random_b"}
    summary = json.loads((out / "analysis.json").read_text())
    assert len(summary["images"]) == 4
    for name, result in summary["encoders"].items():
        layers = result["layers"]
        assert len(layers["nmi"]) == TINY.depth
        assert all(len(heads) == 2 for heads in layers["nmi"])
        for block in range(TINY.depth):
            assert all(0.0 <= value <= 1.0 for value in layers["nmi"][block])
            # mm and px differ by the working spacing (0.1 mm/px by default), head by head.
            pixels, millimetres = layers["attention_distance_px"][block], layers["attention_distance_mm"][block]
            assert millimetres == pytest.approx([0.1 * px for px in pixels], abs=1e-3)
            assert 1.0 <= layers["effective_rank"][block] <= TINY.embed_dim
        # A random encoder attends almost uniformly: its distances sit near the uniform reference (96 px crops at
        # 0.1 mm/px: a 6 x 6 grid of 1.6 mm patches).
        uniform = layers["uniform_attention_distance_mm"]
        pairs = [math.hypot(a // 6 - b // 6, a % 6 - b % 6) * 1.6 for a in range(36) for b in range(36)]
        assert uniform == pytest.approx(sum(pairs) / len(pairs), abs=1e-3)
        assert all(
            abs(value - uniform) < 0.25 * uniform for heads in layers["attention_distance_mm"] for value in heads
        )
        assert 0.0 <= result["probe"]["linear_probe"] <= 1.0
        assert result["probe"]["train_crops"] > 0
        assert result["probe"]["test_crops"] > 0
        assert result["objective"] == "mae"
        assert len(result["attention_pictures"]) == 4  # first and last block, two images
        assert all(Path(path).is_file() for path in result["attention_pictures"])
        assert line[name]["linear_probe"] == result["probe"]["linear_probe"]
    crops = summary["probe_crops"]
    assert set(crops) == {"healthy", "caries", "deep_caries"}
    assert crops["healthy"] > 0
    assert crops["caries"] > 0
    assert summary["probe_chance"] == pytest.approx(max(crops.values()) / sum(crops.values()), abs=1e-4)
    for figure in ("attention_distance", "nmi", "high_frequency", "effective_rank", "probe"):
        assert Path(summary["figures"][figure]).stat().st_size > 1000
    assert not list(out.rglob("*.tmp"))
    # Two different random encoders give different measures (the JSON is not a constant).
    assert summary["encoders"]["random_a"]["layers"] != summary["encoders"]["random_b"]["layers"]


def test_without_labels_there_is_no_probe(labeled, encoders, tmp_path):
    out = tmp_path / "analysis"
    assert analyze({"only": encoders["random_a"]}, labeled, out) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert "probe" not in summary["encoders"]["only"]
    assert "probe" not in summary["figures"]
    assert summary["probe_chance"] is None


def test_bad_input_is_named_and_nothing_is_written(labeled, encoders, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert analyze({"a": tmp_path / "missing.pt"}, labeled, out) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert analyze(encoders, labeled, out, "--crop", "100") == 2
    assert "multiples of it" in capsys.readouterr().err
    assert analyze(encoders, tmp_path, out) == 2
    assert "no radiographs found" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["analyze", "--encoder", "a=x.pt", "--data", "d", "--out", "o", "--spacing-mm", "0"])


def test_encoder_names():
    assert parse_encoders(["mae=runs/a/encoder.pt", "runs/b/encoder.pt"]) == {
        "mae": Path("runs/a/encoder.pt"),
        "b/encoder": Path("runs/b/encoder.pt"),
    }
    with pytest.raises(Exception, match="given twice"):
        parse_encoders(["a=x.pt", "a=y.pt"])


def test_the_shipped_foundation_encoder_loads_for_analysis():
    encoder = load_encoder(Path(__file__).parents[2] / "models" / "foundation_encoder.pt").encoder
    assert 160 % encoder.patch_size == 0  # the default crop fits it
