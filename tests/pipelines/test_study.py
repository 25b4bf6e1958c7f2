"""`caries-mim study label-efficiency` end to end on a tiny synthetic set: the run folders, the CSV / markdown /
plot outputs, both arms' initializations, reuse and resumption of runs, fraction parsing, the table, user errors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import pipelines.study as study_module
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import VisionTransformer, ViTConfig, save_encoder
from caries_mim.package import read_package
from caries_mim.synth import generate_dataset
from pipelines.cli import main
from pipelines.study import StudyRun, markdown_table, parse_fractions

#: Two ViT-Tiny blocks on 64 px inputs, one window per image, 2 steps, validation and package at step 2. The tiny
#: learning rate keeps every weight within ~1e-8 of its initialization, so each arm's package shows where it began.
FAST = [
    "--config", "tiny",
    "--set", "detector.image_size=64",
    "--set", "detector.roi_size=64",
    "--set", "detector.sliding_window_overlap=0.5",
    "--set", "detector.max_downscale=32",
    "--set", "detector.pyramid_channels=16",
    "--set", "optim.batch_size=2",
    "--set", "optim.lr=1.0e-9",
    "--set", "data.workers=0",
    "--set", "train.threads=1",
    "--set", "train.steps=2",
    "--set", "eval.every=2",
    "--set", "eval.overlays=1",
    "--bootstrap", "20",
    "--quiet",
]  # fmt: skip
TRAIN_IMAGES = 14
RUN_NAMES = ("scratch_50pct_seed0", "pretrained_50pct_seed0", "scratch_100pct_seed0", "pretrained_100pct_seed0")
QKV = "blocks.0.attn.qkv.weight"


@dataclasses.dataclass(frozen=True)
class Inputs:
    labeled: Path
    encoder: Path
    cache: Path

    def argv(self, out: Path, *extra: str) -> list[str]:
        return [
            "study", "label-efficiency",
            "--train", str(self.labeled / "train.json"),
            "--val", str(self.labeled / "val.json"),
            "--test", str(self.labeled / "test.json"),
            "--encoder", str(self.encoder),
            "--out", str(out),
            "--fractions", "50,100",
            *FAST,
            "--set", f"data.cache_dir={self.cache}",
            *extra,
        ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Study:
    out: Path
    argv: list[str]
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A 2-block ViT-Tiny encoder.pt, in a folder whose name is no plain YAML scalar (the study hands the path on
    as a --set value)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("encoder") / "mim #1: tiny" / "encoder.pt"
    path.parent.mkdir()
    save_encoder(VisionTransformer(ViTConfig.named("vit_tiny", depth=2, image_size=(64, 64))), path, {"steps": 2})
    return path


@pytest.fixture(scope="module")
def inputs(encoder, tmp_path_factory) -> Inputs:
    """20 synthetic radiographs: 14 train, 3 val, 3 test, lesions in each split."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=0, n_labeled=20, seed=0, progress=False)
    labeled = out / "labeled"
    counts = {split: json.loads((labeled / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    assert len(counts["train"]["images"]) == TRAIN_IMAGES
    assert all(coco["annotations"] for coco in counts.values())
    return Inputs(labeled, encoder, tmp_path_factory.mktemp("decode_cache"))


@pytest.fixture(scope="module")
def study(inputs, tmp_path_factory) -> Study:
    out = tmp_path_factory.mktemp("study") / "out"
    argv = inputs.argv(out)
    code, stdout, stderr = run_cli(argv)
    return Study(out, argv, code, stdout, stderr)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def package_qkv(run: Path) -> torch.Tensor:
    weights = read_package(run / "model.cmpkg").state_dict
    return next(value for name, value in weights.items() if name.endswith("encoder." + QKV))


@pytest.mark.slow
def test_the_study_writes_every_run_and_output(study):
    assert study.code == 0, study.stderr
    for name in ("csv", "md", "png"):
        assert (study.out / f"label_efficiency.{name}").stat().st_size > 0
    assert (study.out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in (study.out / "runs").iterdir()) == sorted(RUN_NAMES)
    for name in RUN_NAMES:
        run = study.out / "runs" / name
        assert (run / "model.cmpkg").is_file()
        assert (run / "summary.json").is_file()
        assert (run / "test" / "metrics.json").is_file()
    progress = [line for line in study.stderr.splitlines() if line.startswith("[")]
    assert progress == [f"[{number}/4] {name}" for number, name in enumerate(RUN_NAMES, start=1)]

    last = study.stdout.rstrip("\n").splitlines()[-1]
    summary = json.loads(last)
    assert summary["runs"] == 4
    assert summary["out"] == str(study.out)
    assert summary["csv"] == str(study.out / "label_efficiency.csv")
    assert summary["markdown"] == str(study.out / "label_efficiency.md")
    assert summary["plot"] == str(study.out / "label_efficiency.png")
    assert "rows" not in summary
    # The table is printed too, right above the JSON line.
    assert study.stdout.endswith((study.out / "label_efficiency.md").read_text() + last + "\n")


@pytest.mark.slow
def test_the_csv_has_one_row_per_run_with_its_images_and_test_ap50(study):
    rows = read_csv(study.out / "label_efficiency.csv")
    assert list(rows[0]) == list(study_module.CSV_COLUMNS)
    assert [(row["init"], float(row["fraction"]), int(row["seed"])) for row in rows] == [
        ("scratch", 0.5, 0),
        ("pretrained", 0.5, 0),
        ("scratch", 1.0, 0),
        ("pretrained", 1.0, 0),
    ]
    for row, name in zip(rows, RUN_NAMES, strict=True):
        run = study.out / "runs" / name
        assert int(row["train_images"]) == math.ceil(float(row["fraction"]) * TRAIN_IMAGES)
        assert int(row["train_images"]) == read_package(run / "model.cmpkg").provenance["train_images"]
        assert int(row["steps"]) == 2
        assert int(row["best_step"]) == 2
        metrics = json.loads((run / "test" / "metrics.json").read_text())
        assert float(row["test_ap50"]) == metrics["coco"]["ap50"]
        assert float(row["test_ap"]) == metrics["coco"]["ap"]
        assert float(row["test_froc"]) == metrics["froc"]["score"]
        interval = metrics["confidence_intervals"]["ap50"]
        assert (float(row["test_ap50_low"]), float(row["test_ap50_high"])) == (interval["low"], interval["high"])
        finetune = json.loads((run / "summary.json").read_text())
        assert float(row["val_ap50"]) == finetune["best_val_ap50"]


@pytest.mark.slow
def test_the_markdown_has_the_command_and_a_row_per_fraction(study):
    text = (study.out / "label_efficiency.md").read_text()
    assert study_module.command_line(study.argv) in text
    assert "caries-mim study label-efficiency" in text
    assert "--fractions 50,100" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in rows] == ["| 50%", "| 100%"]
    csv_rows = read_csv(study.out / "label_efficiency.csv")
    for line, fraction in zip(rows, (0.5, 1.0), strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:3] == ["0", str(math.ceil(fraction * TRAIN_IMAGES))]
        ap50 = {row["init"]: float(row["test_ap50"]) for row in csv_rows if float(row["fraction"]) == fraction}
        assert cells[3].startswith(f"{ap50['scratch']:.3f} (")
        assert cells[4].startswith(f"{ap50['pretrained']:.3f} (")
        assert cells[5] == f"{ap50['pretrained'] - ap50['scratch']:+.3f}"


@pytest.mark.slow
def test_both_arms_share_the_architecture_and_only_pretrained_keeps_the_weights(study, inputs):
    saved = torch.load(inputs.encoder, weights_only=True)["state_dict"][QKV]
    for fraction in (50, 100):
        scratch = study.out / "runs" / f"scratch_{fraction}pct_seed0"
        pretrained = study.out / "runs" / f"pretrained_{fraction}pct_seed0"
        for run, reinitialized in ((scratch, True), (pretrained, False)):
            config = (run / "config.yaml").read_text()
            assert f"reinitialize: {str(reinitialized).lower()}" in config
            summary = json.loads((run / "summary.json").read_text())
            assert summary["encoder"] == (None if reinitialized else str(inputs.encoder))
            assert read_package(run / "model.cmpkg").config.encoder.depth == 2  # the file's, not tiny's 6
            assert package_qkv(run).shape == saved.shape
        torch.testing.assert_close(package_qkv(pretrained), saved, atol=1e-5, rtol=0)
        assert not torch.allclose(package_qkv(scratch), saved, atol=1e-3)


@pytest.mark.slow
def test_repeating_the_command_reuses_finished_runs(study, monkeypatch):
    before = {name: (study.out / f"label_efficiency.{name}").read_bytes() for name in ("csv", "md")}
    for name in ("csv", "md", "png"):
        (study.out / f"label_efficiency.{name}").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(study_module, "run_finetune", refuse)
    monkeypatch.setattr(study_module, "run_evaluate", refuse)
    code, stdout, stderr = run_cli(study.argv)
    assert code == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["runs"] == 4
    for name, content in before.items():
        assert (study.out / f"label_efficiency.{name}").read_bytes() == content
    assert (study.out / "label_efficiency.png").is_file()


@pytest.mark.slow
def test_a_run_stopped_before_its_summary_is_resumed_and_evaluated(study, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(study.out, out)
    stopped = out / "runs" / "pretrained_100pct_seed0"
    (stopped / "summary.json").unlink()
    shutil.rmtree(stopped / "test")
    calls = []
    original_finetune, original_evaluate = study_module.run_finetune, study_module.run_evaluate

    def finetune(train, val, folder, config, **kwargs):
        calls.append(("finetune", folder.name, kwargs["resume"], config.model.reinitialize))
        return original_finetune(train, val, folder, config, **kwargs)

    def evaluate(model, data, folder, **kwargs):
        calls.append(("evaluate", folder.parent.name))
        return original_evaluate(model, data, folder, **kwargs)

    monkeypatch.setattr(study_module, "run_finetune", finetune)
    monkeypatch.setattr(study_module, "run_evaluate", evaluate)
    argv = study.argv.copy()
    argv[argv.index("--out") + 1] = str(out)
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    assert calls == [("finetune", stopped.name, True, False), ("evaluate", stopped.name)]
    assert json.loads((stopped / "summary.json").read_text())["steps_this_run"] == 0
    assert (stopped / "test" / "metrics.json").is_file()
    assert len(read_csv(out / "label_efficiency.csv")) == 4


def test_each_run_is_configured_for_its_arm_and_its_row_comes_from_its_own_files(encoder, tmp_path, monkeypatch):
    """The study's bookkeeping with fake training and evaluation: distinct numbers per run, so a key read from
    the wrong file or the wrong run shows."""
    configs = {}

    def finetune(train, val, folder, config, *, resume, progress):
        assert not resume
        assert not progress
        configs[folder.name] = config
        folder.mkdir(parents=True)
        index = len(configs)
        summary = {
            "train_images": math.ceil(config.data.label_fraction * TRAIN_IMAGES),
            "steps": 10 + index,
            "best_step": index,
            "best_val_ap50": 0.5 + index / 100,
            "seconds": 60.0 + index,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    def evaluate(model, data, folder, *, overlays, bootstrap, progress):
        assert model == folder.parent / "model.cmpkg"
        assert [str(path) for path in data] == ["test.json"]
        assert bootstrap == 5
        index = list(configs).index(folder.parent.name) + 1
        interval = {"low": index / 20 - 0.01, "high": index / 20 + 0.01}
        metrics = {
            "coco": {"ap50": index / 20, "ap": index / 40},
            "froc": {"score": index / 30},
            # The last run has no interval (e.g. --bootstrap 0).
            "confidence_intervals": {"ap50": interval} if index < 8 else None,
        }
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(study_module, "run_finetune", finetune)
    monkeypatch.setattr(study_module, "run_evaluate", evaluate)
    out = tmp_path / "out"
    summary = study_module.run_label_efficiency(
        train=[Path("train.json")],
        val=[Path("val.json")],
        test=[Path("test.json")],
        encoder=encoder,
        out=out,
        config="tiny",
        # A config that keeps the encoder frozen (as the demo's does): only the pretrained arm may.
        overrides=["optim.batch_size=2", "optim.frozen_layers=1"],
        fractions=(0.25, 1.0),
        seeds=(0, 1),
        bootstrap=5,
        progress=False,
        command="caries-mim study label-efficiency ...",
    )
    names = [
        f"{init}_{percent}pct_seed{seed}" for seed in (0, 1) for percent in (25, 100) for init in study_module.INITS
    ]
    assert list(configs) == names
    for name, config in configs.items():
        init, percent, seed = name.split("_")
        assert config.model.encoder == str(encoder)
        assert config.model.reinitialize is (init == "scratch")
        assert config.optim.frozen_layers == (0 if init == "scratch" else 1)
        assert config.data.label_fraction == int(percent.removesuffix("pct")) / 100
        assert config.train.seed == config.data.seed == int(seed.removeprefix("seed"))
        assert config.optim.batch_size == 2
        assert config.detector["image_size"] == 384

    rows = read_csv(out / "label_efficiency.csv")
    assert summary["runs"] == len(rows) == len(summary["rows"]) == 8
    for index, (row, name) in enumerate(zip(rows, names, strict=True), start=1):
        assert f"{row['init']}_{float(row['fraction']) * 100:g}pct_seed{row['seed']}" == name
        assert int(row["train_images"]) == math.ceil(float(row["fraction"]) * TRAIN_IMAGES)
        assert (int(row["steps"]), int(row["best_step"])) == (10 + index, index)
        assert float(row["val_ap50"]) == 0.5 + index / 100
        assert float(row["finetune_seconds"]) == 60.0 + index
        assert (float(row["test_ap50"]), float(row["test_ap"]), float(row["test_froc"])) == (
            index / 20,
            index / 40,
            index / 30,
        )
        if index < 8:
            assert float(row["test_ap50_low"]) == index / 20 - 0.01
            assert float(row["test_ap50_high"]) == index / 20 + 0.01
    assert (rows[-1]["test_ap50_low"], rows[-1]["test_ap50_high"]) == ("", "")

    text = (out / "label_efficiency.md").read_text()
    assert "```\ncaries-mim study label-efficiency ...\n```" in text
    assert [cells[:3] for cells in table_rows(text.split("\n\n")[-1])] == [
        ["25%", "0", "4"],
        ["25%", "1", "4"],
        ["100%", "0", "14"],
        ["100%", "1", "14"],
    ]
    assert table_rows(text.split("\n\n")[-1])[-1][3:] == ["0.350 (0.340-0.360)", "0.400", "+0.050"]
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5,10,25,50,100", (0.05, 0.1, 0.25, 0.5, 1.0)),
        ("100, 50", (0.5, 1.0)),
        ("50,50,", (0.5,)),
        ("0.5", (0.005,)),
    ],
)
def test_parse_fractions_reads_percentages(text, expected):
    assert parse_fractions(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["ten", "5,x", "0", "5,0", "-5", "100.5", "150", "", " , ", "nan", "inf"])
def test_parse_fractions_refuses_bad_input(text):
    with pytest.raises(InvalidArgumentError, match="--fractions"):
        parse_fractions(text)


def test_run_names_keep_fractional_percents_apart():
    assert StudyRun("scratch", 0.05, 0).name == "scratch_5pct_seed0"
    assert StudyRun("pretrained", 1.0, 3).name == "pretrained_100pct_seed3"
    names = {StudyRun("scratch", fraction, 0).name for fraction in parse_fractions("0.4,0.5,12.5,13")}
    assert len(names) == 4


def row(init, fraction, ap50, low=None, high=None, seed=0, images=7):
    return {
        "init": init,
        "fraction": fraction,
        "seed": seed,
        "train_images": images,
        "test_ap50": ap50,
        "test_ap50_low": low,
        "test_ap50_high": high,
    }


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_markdown_table_pairs_the_arms_and_signs_the_gain():
    rows = [
        row("pretrained", 0.1, 0.5, 0.4, 0.6, images=2),
        row("scratch", 0.1, 0.25, 0.2, 0.3, images=2),
        row("scratch", 1.0, 0.8),
        row("pretrained", 1.0, 0.7),
    ]
    text = markdown_table(rows)
    assert text.splitlines()[0].startswith("| labels | seed | train images |")
    assert table_rows(text) == [
        ["10%", "0", "2", "0.250 (0.200-0.300)", "0.500 (0.400-0.600)", "+0.250"],
        ["100%", "0", "7", "0.800", "0.700", "-0.100"],
    ]


def test_markdown_table_says_n_a_for_what_is_missing():
    rows = [
        row("scratch", 0.05, None),
        row("pretrained", 0.05, 0.3),
        row("pretrained", 0.5, 0.6, seed=1),
    ]
    assert table_rows(markdown_table(rows)) == [
        ["5%", "0", "7", "n/a", "0.300", "n/a"],
        ["5%", "1", "n/a", "n/a", "n/a", "n/a"],
        ["50%", "0", "n/a", "n/a", "n/a", "n/a"],
        ["50%", "1", "7", "n/a", "0.600", "n/a"],
    ]


def test_a_missing_encoder_is_one_line_and_exit_2(inputs, tmp_path):
    out = tmp_path / "out"
    argv = inputs.argv(out)
    argv[argv.index("--encoder") + 1] = str(tmp_path / "nope.pt")
    code, stdout, stderr = run_cli(argv)
    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "--encoder" in stderr
    assert "nope.pt" in stderr
    assert not out.exists()


def test_a_bad_set_key_fails_before_any_run(inputs, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(study_module, "run_finetune", refuse)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(inputs.argv(out, "--set", "optim.no_such_key=1"))
    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "no_such_key" in stderr
    assert not out.exists()


def test_bad_fractions_are_refused_before_any_run(inputs, tmp_path):
    out = tmp_path / "out"
    argv = inputs.argv(out)
    argv[argv.index("--fractions") + 1] = "0,50"
    code, _, stderr = run_cli(argv)
    assert code == 2
    assert "--fractions" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
