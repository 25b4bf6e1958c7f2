"""`caries-mim finetune` end to end on a small synthetic labeled set: outputs, encoder loading, resume, early
stopping, label fractions, errors, DDP (gloo)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from caries_mim.data import DetectionRecord
from caries_mim.models import VisionTransformer, ViTConfig, save_encoder
from caries_mim.package import load_package, read_package
from caries_mim.synth import generate_dataset
from pipelines import engine as engine_module
from pipelines import finetune as finetune_module
from pipelines.cli import main
from pipelines.engine import RATE_MEASURED_STEPS, RATE_SKIPPED_STEPS
from pipelines.finetune import label_subset

#: A detector small enough for a step in well under a second on 2 CPU cores: 2 ViT-Tiny blocks on 64 px inputs, one
#: window per image (max_downscale 32 brings every synthetic radiograph down to 64 px), 16 pyramid channels.
FAST = [
    "--config", "tiny",
    "--set", "model.depth=2",
    "--set", "detector.image_size=64",
    "--set", "detector.roi_size=64",
    "--set", "detector.sliding_window_overlap=0.5",
    "--set", "detector.max_downscale=32",
    "--set", "detector.pyramid_channels=16",
    "--set", "optim.batch_size=2",
    "--set", "data.workers=0",
    # One thread: tiny matmuls gain nothing from two, and spinning OpenMP threads on a busy 2-core CI machine can
    # slow a step down tenfold.
    "--set", "train.threads=1",
    "--set", "log.every=1",
    "--set", "eval.overlays=2",
    "--quiet",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Labeled:
    folder: Path
    cache: Path

    @property
    def train(self) -> Path:
        return self.folder / "train.json"

    @property
    def val(self) -> Path:
        return self.folder / "val.json"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Labeled:
    """14 synthetic radiographs: 10 to train on (19 lesions), 2 to validate on (1 lesion), 2 test."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=0, n_labeled=14, seed=5, progress=False)
    data = Labeled(out / "labeled", tmp_path_factory.mktemp("decode_cache"))
    train, val = (json.loads(path.read_text()) for path in (data.train, data.val))
    assert (len(train["images"]), len(val["images"])) == (10, 2)
    assert train["annotations"]
    assert val["annotations"]
    return data


def finetune(data: Labeled, out: Path, *extra: str, train: Path | None = None, val: Path | None = None) -> int:
    """The CLI, with every run decoding through one shared cache (each image is decoded once per module)."""
    return main(
        [
            "finetune",
            "--train", str(train or data.train),
            "--val", str(val or data.val),
            "--out", str(out),
            *FAST,
            "--set", f"data.cache_dir={data.cache}",
            *extra,
        ]
    )  # fmt: skip


def resume(data: Labeled, out: Path, *extra: str) -> int:
    files = ["--train", str(data.train), "--val", str(data.val)]
    return main(["finetune", *files, "--out", str(out), "--resume", "--quiet", *extra])


def rows(run: Path, split: str) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if row["split"] == split}


def one_block_encoder(path: Path) -> VisionTransformer:
    """A seeded 1-block ViT-Tiny/16 for 64 px inputs, saved as a pretraining encoder file at ``path``."""
    torch.manual_seed(123)
    encoder = VisionTransformer(ViTConfig.named("vit_tiny", depth=1, patch_size=16, image_size=64))
    save_encoder(encoder, path)
    return encoder


def summary_line(out: str) -> dict:
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def variant(data: Labeled, name: str, edit) -> Path:
    """A copy of train.json changed by ``edit(coco)``, beside it (image paths resolve against its folder)."""
    coco = json.loads(data.train.read_text())
    edit(coco)
    path = data.folder / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


def test_a_tiny_run_writes_every_output(labeled, tmp_path, capsys):
    """Here the model sees 128 px letterboxes: training on 64 px patches of them, validation sliding a 64 px window
    (the geometry of the shipped tiny recipe, scaled down)."""
    run = tmp_path / "run"
    extra = ("--set", "detector.image_size=128", "--set", "train.steps=4", "--set", "eval.every=2")
    assert finetune(labeled, run, *extra) == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["train_images"] == 10
    assert summary["val_images"] == 2
    assert summary["encoder"] is None
    assert summary["stopped_early"] is False
    assert summary["processes"] == 1
    assert math.isfinite(summary["first_loss"])
    assert math.isfinite(summary["last_loss"])

    train, val = rows(run, "train"), rows(run, "val")
    assert sorted(train) == [1, 2, 3, 4]
    assert {"loss_total", "loss_classification", "loss_box_regression", "lr", "img_s"} <= set(train[1])
    assert sorted(val) == [2, 4]
    assert {"ap50", "ap", "froc", "threshold", "sensitivity_at_threshold", "ap50_per_class"} <= set(val[2])
    assert set(val[2]["ap50_per_class"]) == {"caries", "deep_caries"}
    assert summary["last_validation"]["step"] == 4
    assert summary["best_step"] in (2, 4)

    assert sorted(path.name for path in (run / "overlays").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 4
    assert not list(run.glob(".*.tmp")), "temporary files left behind"

    # The package: the best validation's weights and threshold, predicting on a radiograph by itself.
    package = read_package(run / "model.cmpkg")
    best = val[summary["best_step"]]
    assert package.provenance["step"] == summary["best_step"]
    assert package.threshold == best["threshold"]
    assert package.provenance["validation"]["ap50"] == best["ap50"]
    assert package.provenance["train_images"] == 10
    assert package.class_names == ("caries", "deep_caries")
    assert package.target_sensitivity == 0.9
    assert (package.config.image_size, package.config.roi_size) == (128, 64)
    predictor = load_package(run / "model.cmpkg", device="cpu")
    image = next((labeled.folder / "images").iterdir())
    findings = predictor.predict_file(image)
    assert findings.threshold == package.threshold
    assert all(finding.label in ("caries", "deep_caries") for finding in findings.findings)


def test_a_patch_size_other_than_16_sets_the_detector_geometry(labeled, tmp_path):
    """An 8 px patch makes the coarsest stride 16: an 80 px input and a 32 px window are valid, although neither is
    a multiple of 32."""
    extra = ("--set", "model.patch_size=8", "--set", "detector.image_size=80", "--set", "detector.roi_size=32")
    assert finetune(labeled, tmp_path / "run", *extra, "--set", "train.steps=1") == 0
    config = read_package(tmp_path / "run" / "model.cmpkg").config
    assert (config.encoder.patch_size, config.image_size, config.roi_size) == (8, 80, 32)


def test_the_shipped_tiny_recipe_resolves(tmp_path, capsys):
    assert main(["finetune", "--out", str(tmp_path / "run"), "--config", "tiny", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["detector"] == {"image_size": 384, "roi_size": 128, "pyramid_channels": 64}
    assert printed["model"]["size"] == "vit_tiny"
    assert printed["data"]["positive_fraction"] == 1.0
    assert not (tmp_path / "run").exists()


def test_an_encoder_from_pretraining_is_loaded_and_decides_the_architecture(labeled, tmp_path, capsys, caplog):
    """The encoder file's architecture wins over model.size/depth (here 1 block, not FAST's 2), its weights are
    loaded (an lr of 1e-9 leaves them where they were), and its position embedding is resampled to the input."""
    torch.manual_seed(123)
    encoder = VisionTransformer(ViTConfig.named("vit_tiny", depth=1, patch_size=16, image_size=32))
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, {"steps": 7})
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="caries_mim.finetune")
    code = finetune(labeled, run, "--encoder", str(path), "--set", "train.steps=1", "--set", "optim.lr=1.0e-9")
    assert code == 0
    assert summary_line(capsys.readouterr().out)["encoder"] == str(path)
    assert f"encoder from {path}" in caplog.text
    assert "17 mapped, 1 adapted" in caplog.text  # pos_embed resampled from the 2 x 2 grid to 4 x 4

    weights = torch.load(run / "checkpoint.pt", weights_only=True)["detector"]
    qkv = next(name for name in weights if name.endswith("encoder.blocks.0.attn.qkv.weight"))
    prefix = qkv.removesuffix("blocks.0.attn.qkv.weight")
    assert not any(name.startswith(prefix + "blocks.1.") for name in weights)
    for name, value in encoder.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(weights[prefix + name], value, atol=1e-6, rtol=0)
    assert read_package(run / "model.cmpkg").config.encoder.depth == 1


def test_reinitialize_keeps_the_encoder_s_shape_but_not_its_weights(labeled, tmp_path, capsys):
    path = tmp_path / "encoder.pt"
    encoder = one_block_encoder(path)
    run = tmp_path / "run"
    extra = ("--encoder", str(path), "--set", "model.reinitialize=true", "--set", "train.steps=1")
    assert finetune(labeled, run, *extra, "--set", "optim.lr=1.0e-9") == 0
    assert summary_line(capsys.readouterr().out)["encoder"] is None
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["detector"]
    name = next(name for name in weights if name.endswith("encoder.blocks.0.attn.qkv.weight"))
    assert weights[name].shape == encoder.state_dict()["blocks.0.attn.qkv.weight"].shape
    assert not torch.allclose(weights[name], encoder.state_dict()["blocks.0.attn.qkv.weight"], atol=1e-3)
    assert not any(".blocks.1." in name for name in weights)


def test_frozen_encoder_layers_keep_their_pretrained_weights(labeled, tmp_path, capsys, caplog):
    """optim.frozen_layers=2 on a 1-block encoder: the patch embedding and the block stay as pretrained while the
    encoder's final norm, the pyramid and the heads learn."""
    path = tmp_path / "encoder.pt"
    encoder = one_block_encoder(path)
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="caries_mim.finetune")
    extra = ("--encoder", str(path), "--set", "optim.frozen_layers=2", "--set", "train.steps=2")
    assert finetune(labeled, run, *extra, "--set", "optim.lr=1.0e-2") == 0
    assert "its first 2 layer(s) frozen" in caplog.text
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["detector"]
    qkv = next(name for name in weights if name.endswith("encoder.blocks.0.attn.qkv.weight"))
    prefix = qkv.removesuffix("blocks.0.attn.qkv.weight")
    pretrained = encoder.state_dict()
    for name in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        torch.testing.assert_close(weights[prefix + name], pretrained[name], atol=0, rtol=0)
    assert not torch.equal(weights[prefix + "norm.weight"], pretrained["norm.weight"])


@pytest.mark.parametrize("encoder", [False, True])
def test_frozen_layers_without_a_pretrained_encoder_is_a_config_error(labeled, tmp_path, capsys, encoder):
    extra = ["--set", "optim.frozen_layers=1"]
    if encoder:  # given, but reinitialized
        path = tmp_path / "encoder.pt"
        one_block_encoder(path)
        extra += ["--encoder", str(path), "--set", "model.reinitialize=true"]
    assert finetune(labeled, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.frozen_layers: a randomly initialized encoder would stay random" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_resume_must_keep_the_frozen_layers(labeled, tmp_path, capsys):
    """Freezing other layers changes the optimizer's groups: a one-line config error, not a failed state load."""
    path = tmp_path / "encoder.pt"
    one_block_encoder(path)
    run = tmp_path / "run"
    assert finetune(labeled, run, "--encoder", str(path), "--set", "train.steps=1") == 0
    capsys.readouterr()
    assert resume(labeled, run, "--set", "optim.frozen_layers=1") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume with a changed optim.frozen_layers" in err
    assert len(err.splitlines()) == 1


def test_frozen_layers_with_a_cnn_backbone_is_a_config_error(labeled, tmp_path, capsys):
    extra = ("--set", "detector.backbone=resnet10", "--set", "optim.frozen_layers=1")
    assert finetune(labeled, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.frozen_layers: the resnet10 backbone has no ViT encoder to freeze" in err
    assert len(err.splitlines()) == 1


def _other_patch_size(path: Path) -> None:
    save_encoder(VisionTransformer(ViTConfig.named("vit_tiny", depth=1, patch_size=12, image_size=96)), path)


def _three_channels(path: Path) -> None:
    save_encoder(VisionTransformer(ViTConfig.named("vit_tiny", depth=1, image_size=64, in_channels=3)), path)


def _not_an_encoder(path: Path) -> None:
    torch.save({"model": {"weight": torch.zeros(2)}}, path)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_other_patch_size, "image_size 64 must be a positive multiple of 24"),
        (_three_channels, "takes 3-channel images; radiographs have one channel"),
        (_not_an_encoder, "is not a caries-mim encoder file"),
    ],
    ids=["patch-size-12", "rgb", "not-an-encoder"],
)
def test_an_encoder_of_the_wrong_architecture_is_a_one_line_error(labeled, tmp_path, capsys, write, message):
    path = tmp_path / "encoder.pt"
    write(path)
    assert finetune(labeled, tmp_path / "run", "--encoder", str(path), "--set", "train.steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("ema_decay", ["null", "0.9"])
def test_resumed_run_reproduces_the_uninterrupted_losses_and_validations(labeled, tmp_path, monkeypatch, ema_decay):
    """6 steps, a SIGINT (what a scheduler's SIGTERM also does) between validations, then --resume for the rest ==
    8 straight steps: weights, optimizer, schedule, RNG, data position and each patch's augmentation continue, and
    so does the weight average that validates (``optim.ema_decay``)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = (
        *("--set", "train.steps=8", "--set", "eval.every=4", "--set", "data.workers=1"),
        *("--set", f"optim.ema_decay={ema_decay}"),
    )
    assert finetune(labeled, straight, *common) == 0

    real_step = engine_module.TrainingEngine._optimizer_step

    def interrupted_after_six(engine, *args):
        result = real_step(engine, *args)
        if engine.position.step == 5:  # the step being finished is the 6th
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(engine_module.TrainingEngine, "_optimizer_step", interrupted_after_six)
    assert finetune(labeled, resumed, *common) == 130
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["state"]["step"] == 6
    monkeypatch.undo()
    assert resume(labeled, resumed) == 0

    expected, got = rows(straight, "train"), rows(resumed, "train")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss_total", "loss_classification", "loss_box_regression", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), f"step {step} {key}"
    expected_val, got_val = rows(straight, "val"), rows(resumed, "val")
    assert sorted(got_val) == [4, 8]
    for step in (4, 8):
        assert got_val[step]["ap50"] == pytest.approx(expected_val[step]["ap50"])
        assert got_val[step]["threshold"] == pytest.approx(expected_val[step]["threshold"])


def test_a_time_limit_shortens_the_schedule_and_still_validates_and_packages_the_last_step(labeled, tmp_path):
    """``train.time_limit_s``: the loop measures its own rate and ends the schedule within the limit; the last step
    validates and writes the package as in any run (the decay of a shortened cosine: tests/pipelines/test_engine.py,
    on a fake clock)."""
    run = tmp_path / "run"
    # Half a second is gone before the first step; the first plan waits for a measured rate, then ends the run.
    settings = ("--set", "train.steps=100000", "--set", "eval.every=100000", "--set", "train.time_limit_s=0.5")
    assert finetune(labeled, run, *settings) == 0
    summary = json.loads((run / "summary.json").read_text())
    first_plan = RATE_SKIPPED_STEPS + RATE_MEASURED_STEPS
    assert summary["steps"] == first_plan
    assert sorted(rows(run, "val")) == [first_plan]
    assert read_package(run / "model.cmpkg").provenance["step"] == first_plan
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["time_limit_s"] == 0.5
    state = torch.load(run / "checkpoint.pt", weights_only=True)["state"]
    assert state["planned_steps"] == first_plan
    assert state["train_seconds"] > 0.5


def test_with_a_weight_average_the_package_holds_the_average_and_a_resume_must_keep_it(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    settings = ("--set", "train.steps=3", "--set", "eval.every=3", "--set", "optim.ema_decay=0.5")
    assert finetune(labeled, run, *settings) == 0
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    averaged = {key.removeprefix("module."): value for key, value in checkpoint["weight_average"].items()}
    packaged = read_package(run / "model.cmpkg").state_dict
    assert packaged.keys() == checkpoint["detector"].keys()
    moved = 0
    for name, tensor in packaged.items():
        torch.testing.assert_close(tensor.float(), averaged[name].float(), rtol=1e-3, atol=1e-3)
        moved += not torch.equal(tensor.float(), checkpoint["detector"][name].float())
    assert moved > 0, "the package holds the last weights, not their average"
    capsys.readouterr()
    assert resume(labeled, run, "--set", "train.steps=5", "--set", "optim.ema_decay=null") == 2
    err = capsys.readouterr().err
    assert "optim.ema_decay is null but" in err
    assert "was trained with a weight average: resume with the setting it was trained with" in err


def test_early_stopping_keeps_the_best_validation_in_the_package(labeled, tmp_path, monkeypatch, capsys):
    """Scripted AP50s 0.2, 0.5, 0.4, 0.5 with patience 2: the best is step 2 (an equal AP50 is no improvement), so
    training stops after step 4 and model.cmpkg holds step 2's weights and threshold."""
    ap50s = iter([0.2, 0.5, 0.4, 0.5])
    thresholds = itertools.count(1)
    real_metrics, real_point = finetune_module.coco_metrics, finetune_module.select_operating_point

    def scripted_metrics(*args, **kwargs):
        return dataclasses.replace(real_metrics(*args, **kwargs), ap50=next(ap50s))

    def distinct_threshold(*args, **kwargs):
        return dataclasses.replace(real_point(*args, **kwargs), threshold=next(thresholds) / 10)

    monkeypatch.setattr(finetune_module, "coco_metrics", scripted_metrics)
    monkeypatch.setattr(finetune_module, "select_operating_point", distinct_threshold)
    run = tmp_path / "run"
    extra = ("--set", "train.steps=20", "--set", "eval.every=1", "--set", "eval.patience=2")
    assert finetune(labeled, run, *extra) == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary["stopped_early"] is True
    assert summary["steps"] == 4
    assert (summary["best_step"], summary["best_val_ap50"]) == (2, 0.5)

    val = rows(run, "val")
    assert {step: row["ap50"] for step, row in val.items()} == {1: 0.2, 2: 0.5, 3: 0.4, 4: 0.5}
    package = read_package(run / "model.cmpkg")
    assert package.provenance["step"] == 2
    assert package.threshold == val[2]["threshold"] == 0.2
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 4
    assert checkpoint["state"]["best_step"] == 2
    # Two more steps trained after the best one: the package is not the last weights.
    assert any(not torch.equal(value, checkpoint["detector"][name]) for name, value in package.state_dict.items())


def _records(count: int) -> list[DetectionRecord]:
    return [
        DetectionRecord(Path(f"{index}.png"), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), index)
        for index in range(count)
    ]


def test_label_subsets_are_nested_seeded_and_ceil_sized():
    records = _records(10)
    subsets = {fraction: label_subset(records, fraction, seed=0) for fraction in (0.05, 0.1, 0.3, 0.5, 0.7, 1.0)}
    assert {fraction: len(subset) for fraction, subset in subsets.items()} == {
        0.05: 1, 0.1: 1, 0.3: 3, 0.5: 5, 0.7: 7, 1.0: 10
    }  # fmt: skip
    # 0.07 * 100 and 0.28 * 25 are 7.000000000000001 in floating point: still 7 images, not 8.
    assert len(label_subset(_records(100), 0.07, seed=0)) == 7
    assert len(label_subset(_records(25), 0.28, seed=0)) == 7
    ordered = [subsets[fraction] for fraction in sorted(subsets)]
    for smaller, larger in itertools.pairwise(ordered):
        assert {r.image_id for r in smaller} <= {r.image_id for r in larger}
    assert subsets[1.0] == records
    for subset in ordered:
        ids = [r.image_id for r in subset]
        assert ids == sorted(ids), "file order is kept"
    assert label_subset(records, 0.3, seed=0) == subsets[0.3]
    assert {r.image_id for r in label_subset(records, 0.5, seed=1)} != {r.image_id for r in subsets[0.5]}
    assert len(label_subset(_records(7), 0.25, seed=0)) == 2  # ceil(1.75)


def test_a_label_fraction_trains_on_that_share_of_the_images(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "data.label_fraction=0.3", "--set", "train.steps=1") == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary["train_images"] == 3
    assert summary["label_fraction"] == 0.3
    assert read_package(run / "model.cmpkg").provenance["train_images"] == 3


def test_an_existing_run_is_not_overwritten_without_resume(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "train.steps=1") == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert finetune(labeled, run, "--set", "train.steps=1") == 2
    err = capsys.readouterr().err
    assert "--resume" in err
    assert len(err.strip().splitlines()) == 1
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_package_alone_also_marks_an_existing_run(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.cmpkg").write_bytes(b"a package")
    assert finetune(labeled, run, "--set", "train.steps=1") == 2
    assert "model.cmpkg" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_a_clear_error(labeled, tmp_path, capsys):
    assert resume(labeled, tmp_path / "none") == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_a_checkpoint_of_another_format_version_is_refused_by_name(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "train.steps=1") == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["version"] = 99
    torch.save(payload, run / "checkpoint.pt")
    capsys.readouterr()
    assert resume(labeled, run, "--set", "train.steps=2") == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint version 99 cannot be resumed" in err
    assert len(err.splitlines()) == 1


def test_resuming_refuses_changed_frozen_keys_but_not_others(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "train.steps=1") == 0
    capsys.readouterr()
    for override, named in (
        ("detector.pyramid_channels=24", "detector"),
        ("data.label_fraction=0.5", "data.label_fraction"),
        ("model.depth=3", "model"),
    ):
        assert resume(labeled, run, "--set", override) == 2
        err = capsys.readouterr().err.strip()
        assert "invalid_config" in err
        assert f"cannot resume with a changed {named}" in err
        assert len(err.splitlines()) == 1
    assert resume(labeled, run, "--set", "train.steps=2", "--set", "optim.lr=1.0e-4") == 0
    assert summary_line(capsys.readouterr().out)["steps"] == 2


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.batch_sise=8", "optim.batch_sise: unknown key"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("detector.image_size=100", "image_size 100 must be a positive multiple of 32"),
        ("detector.roi_sise=64", "unknown detector config key(s): roi_sise"),
        ("detector.classification_loss=hinge", "classification_loss must be one of focal, bce"),
        ("detector.class_names=[a]", "detector.class_names: set from the model section and the training data"),
        ("detector.encoder=x", "detector.encoder: set from the model section"),
        ("data.label_fraction=0", "label_fraction must be in (0, 1]"),
        ("data.augmentation=heavy", "augmentation must be one of standard, sensor, got 'heavy'"),
        ("data.repeat_threshold=1.5", "repeat_threshold must be in (0, 1] or null, got 1.5"),
        ("data.repeat_attribute=colour", "repeat_attribute must be one of depth, surface or null, got 'colour'"),
        ("data.repeat_attribute=surface", "repeat_attribute needs repeat_threshold"),
        ("eval.patience=0", "patience must be >= 1"),
        ("model.size=vit_huge", "unknown ViT size 'vit_huge'"),
        ("model.encoder=/no/such/encoder.pt", "/no/such/encoder.pt: no such file"),
        ("optim.frozen_layers=-1", "frozen_layers must be >= 0, got -1"),
        ("optim.frozen_layers=9", "optim.frozen_layers must be at most 3"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_the_key(labeled, tmp_path, capsys, override, named):
    assert finetune(labeled, tmp_path / "run", "--set", override) == 2
    err = capsys.readouterr().err.strip()
    assert named in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_validation_classes_must_be_training_classes(labeled, tmp_path, capsys):
    def add_a_class(coco):
        coco["categories"].append({"id": 9, "name": "fracture", "supercategory": "lesion"})
        coco["annotations"][0]["category_id"] = 9

    val = variant(labeled, "val_with_fracture", add_a_class)
    assert finetune(labeled, tmp_path / "run", "--set", "train.steps=1", val=val) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid_dataset" in err
    assert "--val: class(es) fracture are not in the training classes caries, deep_caries" in err
    assert len(err.splitlines()) == 1


def test_a_lesion_times_class_run_packages_a_detector_that_predicts_both_classes(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    setting = ("--set", "detector.class_scores=lesion_times_class", "--set", "detector.score_threshold=0.0")
    assert finetune(labeled, run, "--set", "train.steps=2", *setting) == 0
    package = read_package(run / "model.cmpkg")
    assert package.config.class_scores == "lesion_times_class"
    assert package.config.head_outputs == 3
    predictor = load_package(run / "model.cmpkg", device="cpu")
    findings = predictor.predict_file(next((labeled.folder / "images").iterdir()))
    assert findings.findings, "with score threshold 0 every anchor's score is a candidate"
    assert all(0.0 <= finding.score <= 1.0 for finding in findings.findings)
    assert {finding.label for finding in findings.findings} <= {"caries", "deep_caries"}


def test_lesion_times_class_on_one_class_data_is_a_config_error_before_decoding(labeled, tmp_path, capsys):
    def one_class(coco):
        coco["categories"] = [{"id": 1, "name": "caries", "supercategory": "lesion"}]
        for annotation in coco["annotations"]:
            annotation["category_id"] = 1

    train = variant(labeled, "train_one_class", one_class)
    setting = ("--set", "detector.class_scores=lesion_times_class", "--set", "train.steps=1")
    assert finetune(labeled, tmp_path / "run", *setting, train=train, val=train) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid_config" in err
    assert "lesion_times_class needs two or more classes" in err
    assert "(training classes: caries)" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_training_set_without_any_box_is_refused(labeled, tmp_path, capsys):
    def no_boxes(coco):
        coco["annotations"] = []

    train = variant(labeled, "train_without_boxes", no_boxes)
    assert finetune(labeled, tmp_path / "run", "--set", "train.steps=1", train=train) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid_dataset" in err
    assert "none of the 10 training image(s) has a lesion box" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_set_smaller_than_a_batch_is_repeated_with_other_patches(labeled, tmp_path, capsys):
    """A 5% label fraction can hold fewer images than one batch: the images repeat (with other patches) instead
    of the run refusing, and the summary still counts distinct images."""
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "optim.batch_size=16", "--set", "train.steps=1") == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary["train_images"] == 10
    assert summary["steps"] == 1


def test_repeat_factor_sampling_says_what_it_over_samples_and_trains(labeled, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "data.repeat_threshold=1.0", "--set", "train.steps=2") == 0
    assert summary_line(capsys.readouterr().out)["steps"] == 2
    assert "repeat factor sampling (threshold 1, categories: class): " in caplog.text
    assert "; factors caries " in caplog.text


def test_repeat_factors_over_class_and_surface_and_ignore_regions_train_and_say_so(labeled, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    train = json.loads(labeled.train.read_text())
    assert {annotation["surface"] for annotation in train["annotations"]} >= {"mesial", "distal"}
    # The regions of the training set: the generator's lesions under its visibility floor.
    regions = [len(image["subthreshold_lesions"]) for image in train["images"]]
    run = tmp_path / "run"
    overrides = ("data.repeat_threshold=1.0", "data.repeat_attribute=surface", "data.ignore_regions=true")
    overrides += ("train.steps=2",)
    assert finetune(labeled, run, *(arg for value in overrides for arg in ("--set", value))) == 0
    assert summary_line(capsys.readouterr().out)["steps"] == 2
    assert "repeat factor sampling (threshold 1, categories: class x surface): " in caplog.text
    assert "caries/mesial " in caplog.text
    assert f"ignore regions: {sum(regions)} in {sum(count > 0 for count in regions)} training image(s)" in caplog.text


def test_repeated_dataset_maps_keys_onto_the_images_and_keeps_the_seed():
    class Keys(list):
        def __init__(self) -> None:
            super().__init__([0, 1, 2])
            self.records = ["a", "b", "c"]

        def __getitem__(self, key):
            return key

    repeated = finetune_module.RepeatedDataset(Keys(), 2)
    assert len(repeated) == 6
    assert repeated[(4, 7)] == (1, 7)
    assert repeated[5] == 2


def test_a_checkpoint_write_that_dies_leaves_the_previous_one_intact(labeled, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert finetune(labeled, run, "--set", "train.steps=2") == 0
    good = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, target, *args, **kwargs):
        if Path(target).name.startswith(".checkpoint.pt"):
            Path(target).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    assert resume(labeled, run, "--set", "train.steps=4") == 1
    assert (run / "checkpoint.pt").read_bytes() == good
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_two_process_gloo_ddp_run(labeled, tmp_path):
    """The torchrun path on CPU: two ranks of 2 patches, rank 0 validating and writing one checkpoint, package and
    summary line."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pipelines.cli", "finetune", "--train", str(labeled.train), "--val", str(labeled.val),
        "--out", str(run), *FAST, "--set", f"data.cache_dir={labeled.cache}",
        "--set", "train.steps=4", "--set", "eval.every=2",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_line(done.stdout)
    assert summary["processes"] == 2
    assert summary["steps"] == 4
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(payload["rng"]) == 2, "every rank's RNG state is saved"
    assert payload["global_batch"] == 4
    assert sorted(rows(run, "val")) == [2, 4]
    assert sorted(rows(run, "train")) == [1, 2, 3, 4]
    assert read_package(run / "model.cmpkg").provenance["step"] in (2, 4)


def test_the_working_spacing_and_anchors_come_from_the_training_data():
    """``median`` is nnDetection's rule (the median spacing, and the median long side in mm for files without one);
    ``auto`` anchors are fitted to the boxes at that spacing."""
    config = finetune_module.load_finetune_config(
        "tiny", ["detector.spacing_mm=median", "detector.anchor_shapes=auto", "model.depth=2"]
    )
    encoder = finetune_module.encoder_architecture(config)
    boxes = np.array([[100.0, 100.0, 140.0, 130.0]] * 4, dtype=np.float32)
    statistics = finetune_module.DataStatistics(
        spacings_mm=[0.02, 0.03, 0.04],
        long_sides_mm=[30.0, 36.0, 40.0],
        boxes=[((0.02, 0.02), (900, 1200), boxes), ((0.04, 0.04), (700, 1000), boxes), (None, (800, 1000), boxes)],
    )
    built = finetune_module.detector_config(config, ("caries",), encoder, statistics)
    assert built.spacing_mm == pytest.approx(0.03)
    assert built.assumed_long_side_mm == pytest.approx(36.0)
    # Boxes of 40 x 30 px at 0.02, 0.04 and (no spacing: 36 mm over 1000 px) 0.036 mm/px, seen at 0.03 mm/px.
    sides = np.sqrt(40 * 30) * np.array([0.02, 0.04, 0.036]) / 0.03
    middle = np.sqrt(np.percentile(np.repeat(sides, 4), 5) * np.percentile(np.repeat(sides, 4), 95))
    assert np.sqrt(np.prod(built.anchor_shapes[1])) == pytest.approx(middle / 2, abs=0.1)
    assert built.anchor_shapes[1][0] > built.anchor_shapes[1][1]  # wider than tall, as the boxes
    no_spacing = dataclasses.replace(statistics, spacings_mm=[], long_sides_mm=[])
    with pytest.raises(finetune_module.InvalidDatasetError, match="none has one"):
        finetune_module.detector_config(config, ("caries",), encoder, no_spacing)


def test_a_run_at_a_working_spacing_stores_it_in_the_package(labeled, tmp_path, capsys):
    """0.25 mm per pixel shrinks the synthetic radiographs (0.02-0.04 mm) to a few 64 px windows each."""
    out = tmp_path / "run"
    extra = ["--set", "detector.spacing_mm=0.25", "--set", "detector.anchor_shapes=auto"]
    assert finetune(labeled, out, *extra, "--set", "train.steps=2", "--set", "eval.every=2") == 0
    package = read_package(out / "model.cmpkg")
    assert package.config.spacing_mm == 0.25
    assert package.config.anchor_shapes != finetune_module.DetectorConfig().anchor_shapes
    assert package.preprocessing["method"] == "physical-spacing-v1"
    assert summary_line(capsys.readouterr().out)["steps"] == 2


def test_data_statistics_read_spacing_and_size_with_or_without_validation(labeled):
    from caries_mim.data import DecodeCache, DetectionDataset, load_annotations

    records = load_annotations(labeled.train).records
    cache = DecodeCache(labeled.cache)
    validated = finetune_module.data_statistics(DetectionDataset(records, cache=cache, progress=False))
    unvalidated = finetune_module.data_statistics(
        DetectionDataset(records, cache=cache, validate=False, progress=False)
    )
    assert validated.spacings_mm == unvalidated.spacings_mm
    assert validated.long_sides_mm == unvalidated.long_sides_mm
    assert [size for _, size, _ in validated.boxes] == [size for _, size, _ in unvalidated.boxes]
    assert len(validated.spacings_mm) == len(records)
    assert all(0.02 <= spacing <= 0.04 for spacing in validated.spacings_mm)
    assert all(20.0 <= side <= 60.0 for side in validated.long_sides_mm)
