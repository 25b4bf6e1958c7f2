"""`caries-mim study objectives` end to end on a tiny synthetic set: every objective pretrained on one budget,
analyzed together, fine-tuned beside a random encoder; the table, CSV and plot; reuse of finished runs; errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.synth import generate_dataset
from pipelines.cli import main
from pipelines.study_objectives import OBJECTIVE_SETTINGS, parse_objectives
from tests.pipelines.test_study import FAST

#: Tiny pretraining: a 2-block ViT on 64 px crops, 3 steps.
PRETRAIN = [
    "--pretrain-config", "tiny",
    "--pretrain-set", "model.depth=2",
    "--pretrain-set", "data.image_size=64",
    "--pretrain-set", "data.workers=0",
    "--pretrain-set", "optim.batch_size=4",
    "--pretrain-set", "train.steps=3",
    "--pretrain-set", "train.threads=1",
    "--pretrain-set", "log.images=2",
]  # fmt: skip
#: Fine-tuning as in the label-efficiency test (2 steps, validation and package at step 2, 20 bootstrap resamples).
FINETUNE = FAST


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=8, n_labeled=16, seed=11, progress=False)
    return out


def argv(synthetic: Path, out: Path, objectives: str) -> list[str]:
    labeled = synthetic / "labeled"
    return [
        "study", "objectives",
        "--data", str(synthetic / "unlabeled"),
        "--train", str(labeled / "train.json"),
        "--val", str(labeled / "val.json"),
        "--test", str(labeled / "test.json"),
        "--out", str(out),
        "--objectives", objectives,
        "--fractions", "50,100",
        *PRETRAIN,
        *FINETUNE,
    ]  # fmt: skip


@pytest.mark.slow
def test_two_objectives_are_pretrained_analyzed_fine_tuned_and_tabulated(synthetic, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(argv(synthetic, out, "mae,semantic_mim")) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["objectives"] == ["mae", "semantic_mim"]
    for name in ("mae", "semantic_mim"):
        pretrain = json.loads((out / "pretrain" / name / "summary.json").read_text())
        assert pretrain["steps"] == 3
        for fraction in ("50", "100"):
            assert (
                out / "finetune" / name / "runs" / f"pretrained_{fraction}pct_seed0" / "test" / "metrics.json"
            ).is_file()
    assert (out / "finetune" / "scratch" / "runs" / "scratch_100pct_seed0" / "model.cmpkg").is_file()
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(analysis["encoders"]) == {"mae", "semantic_mim"}
    assert analysis["encoders"]["semantic_mim"]["objective"] == "semantic_mim"

    rows = list(csv.DictReader((out / "objectives.csv").open()))
    assert [(row["objective"], row["fraction"]) for row in rows] == [
        ("scratch", "0.5"), ("scratch", "1.0"), ("mae", "0.5"), ("mae", "1.0"),
        ("semantic_mim", "0.5"), ("semantic_mim", "1.0"),
    ]  # fmt: skip
    mae = rows[2]
    probe = analysis["encoders"]["mae"]["probe"]
    assert float(mae["linear_probe"]) == pytest.approx(probe["linear_probe"])
    assert mae["pretrain_steps"] == "3"
    assert rows[0]["linear_probe"] == ""  # the random encoder is not analyzed
    table = (out / "objectives.md").read_text()
    assert "caries-mim study objectives" in table  # the command that made it
    assert "| random encoder (floor) |" in table
    assert "| semantic_mim |" in table
    assert "AP50 at 50% (95% CI)" in table
    assert (out / "objectives.png").stat().st_size > 1000

    # A repeated command reuses every finished run: nothing trains again.
    before = (out / "pretrain" / "mae" / "encoder.pt").stat().st_mtime_ns
    assert main(argv(synthetic, out, "mae,semantic_mim")) == 0
    assert (out / "pretrain" / "mae" / "encoder.pt").stat().st_mtime_ns == before


def test_objective_names_and_config_errors_come_before_any_run(synthetic, tmp_path, capsys):
    assert parse_objectives("moco, hybrid") == ("moco", "hybrid")
    assert set(OBJECTIVE_SETTINGS) == {"mae", "simmim", "moco", "hybrid", "semantic_mim"}
    for bad in ("", "mae,mae", "byol"):
        with pytest.raises(InvalidArgumentError, match="--objectives"):
            parse_objectives(bad)
    out = tmp_path / "study"
    assert main([*argv(synthetic, out, "mae"), "--pretrain-set", "objective.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not out.exists()
