"""`caries-mim reference`: the whole rebuild of the shipped models at smoke size, its outputs and provenance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Predictor
from caries_mim.models import load_encoder
from caries_mim.package import load_package, read_package
from pipelines import reference
from pipelines.cli import main
from pipelines.finetune import load_finetune_config
from pipelines.pretrain import load_pretrain_config
from pipelines.reference import DETECTOR_FILE, FOUNDATION_FILE, PROVENANCE_FILE, load_reference_config
from pipelines.retune import INFERENCE_SETTINGS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    out, work = root / "models", root / "work"
    code = main(["reference", "--config", "smoke", "--out", str(out), "--work", str(work), "--quiet"])
    assert code == 0
    return out, work


def test_the_build_writes_fp16_models_that_load_and_a_complete_provenance(built, capsys):
    out, _ = built
    encoder_payload = torch.load(out / FOUNDATION_FILE, weights_only=True)
    assert {tensor.dtype for tensor in encoder_payload["state_dict"].values()} == {torch.float16}
    assert load_encoder(out / FOUNDATION_FILE).encoder.patch_embed.proj.weight.dtype == torch.float32
    package = read_package(out / DETECTOR_FILE)
    floats = {tensor.dtype for tensor in package.state_dict.values() if tensor.is_floating_point()}
    assert floats == {torch.float16}
    assert isinstance(load_package(out / DETECTOR_FILE, device="cpu"), Predictor)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert package.provenance["reference"]["data"] == provenance["data"]
    for key in ("command", "code_commit", "machine", "pretrain_config", "finetune_config", "stage_seconds"):
        assert key in provenance
    assert provenance["command"][:2] == ["caries-mim", "reference"]
    assert provenance["pretrain"]["steps"] == 3
    assert provenance["finetune"]["steps"] == 2
    seeds = {name: data["seed"] for name, data in provenance["data"].items()}
    assert len(set(seeds.values())) == 4  # the test sets come from seeds used for nothing else
    assert provenance["data"]["shifted_test"]["generator"] != provenance["data"]["fresh_test"]["generator"]
    for name in ("fresh_seed", "shifted_generator"):
        metrics = provenance["test_metrics"][name]
        assert metrics["images"] == 3
        assert 0.0 <= metrics["ap50"] <= 1.0
        assert set(metrics["sensitivity_by_depth"]) <= {"enamel", "outer_dentin", "inner_dentin"}
    for name, file in provenance["files"].items():
        assert file["bytes"] == (out / name).stat().st_size


def test_a_second_run_keeps_every_finished_stage(built, capsys):
    out, work = built
    weights = torch.load(out / FOUNDATION_FILE, weights_only=True)["state_dict"]
    code = main(["reference", "--config", "smoke", "--out", str(out), "--work", str(work), "--quiet"])
    assert code == 0
    after = json.loads((out / PROVENANCE_FILE).read_text())
    assert "pretrain" not in after["stage_seconds"]
    assert "finetune" not in after["stage_seconds"]
    again = torch.load(out / FOUNDATION_FILE, weights_only=True)["state_dict"]
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_keep_foundation_fine_tunes_again_from_the_shipped_encoder_and_carries_its_provenance(built, tmp_path):
    out, _ = built
    kept = tmp_path / "models"
    shutil.copytree(out, kept)
    earlier = json.loads((kept / PROVENANCE_FILE).read_text())
    args = ["reference", "--config", "smoke", "--out", str(kept), "--work", str(tmp_path / "work"), "--quiet"]
    longer = [*load_reference_config("smoke", None).finetune_set, "train.steps=3", "eval.every=3"]
    assert main([*args, "--keep-foundation", "--set", f"finetune_set=[{', '.join(longer)}]"]) == 0
    after = json.loads((kept / PROVENANCE_FILE).read_text())
    assert (kept / FOUNDATION_FILE).read_bytes() == (out / FOUNDATION_FILE).read_bytes()
    assert after["files"][FOUNDATION_FILE] == earlier["files"][FOUNDATION_FILE]
    assert after["files"][DETECTOR_FILE]["sha256"] != earlier["files"][DETECTOR_FILE]["sha256"]
    assert after["finetune"]["steps"] == 3
    assert after["pretrain"] == earlier["pretrain"]
    assert after["pretrain_config"] == earlier["pretrain_config"]
    assert after["data"]["unlabeled"] == earlier["data"]["unlabeled"]
    assert after["foundation_kept_from"]["sha256"] == earlier["files"][FOUNDATION_FILE]["sha256"]
    pretraining = {
        stage: earlier["stage_seconds"][stage]
        for stage in ("synth_unlabeled", "pretrain")
        if stage in earlier["stage_seconds"]
    }
    assert after["foundation_kept_from"]["stage_seconds"] == pretraining
    assert not {"synth_unlabeled", "pretrain"} & after["stage_seconds"].keys()
    assert not (tmp_path / "work" / "unlabeled").exists()
    assert read_package(kept / DETECTOR_FILE).provenance["reference"]["foundation_kept_from"]


def test_keep_foundation_refuses_an_encoder_its_provenance_does_not_describe(built, tmp_path, capsys):
    out, _ = built
    kept = tmp_path / "models"
    shutil.copytree(out, kept)
    with (kept / FOUNDATION_FILE).open("ab") as encoder:
        encoder.write(b"\0")
    args = ["reference", "--config", "smoke", "--out", str(kept), "--work", str(tmp_path / "work"), "--quiet"]
    assert main([*args, "--keep-foundation"]) == 2
    error = capsys.readouterr().err
    assert "SHA-256 differs" in error
    assert "Traceback" not in error
    shutil.rmtree(kept)
    kept.mkdir()
    assert main([*args, "--keep-foundation"]) == 2
    assert "needs" in capsys.readouterr().err


def test_keep_detector_retunes_the_kept_weights_and_records_where_they_came_from(built, tmp_path, capsys):
    out, _ = built
    kept = tmp_path / "models"
    shutil.copytree(out, kept)
    earlier = json.loads((kept / PROVENANCE_FILE).read_text())
    work = tmp_path / "work"
    args = ["reference", "--config", "smoke", "--out", str(kept), "--work", str(work), "--quiet"]
    fused = [*load_reference_config("smoke", None).finetune_set, "detector.box_fusion_iou=0.5"]
    assert main([*args, "--keep-detector", "--set", f"finetune_set=[{', '.join([*fused, 'train.steps=99'])}]"]) == 0
    after = json.loads((kept / PROVENANCE_FILE).read_text())
    before_package, after_package = read_package(out / DETECTOR_FILE), read_package(kept / DETECTOR_FILE)
    weights = before_package.state_dict
    assert all(torch.equal(weights[name], after_package.state_dict[name]) for name in weights)
    assert (before_package.config.box_fusion_iou, after_package.config.box_fusion_iou) == (None, 0.5)
    assert after_package.threshold == after["retune"]["threshold"]
    assert after["retune"]["settings"] == {"box_fusion_iou": {"from": None, "to": 0.5}}
    # The training record is the one of the build that trained the weights (its 2 steps, not the recipe's 99),
    # with the inference settings now used.
    assert after["finetune"] == earlier["finetune"]
    recorded, trained = after["finetune_config"], earlier["finetune_config"]
    assert {key: value for key, value in recorded.items() if key != "detector"} == {
        key: value for key, value in trained.items() if key != "detector"
    }
    assert set(INFERENCE_SETTINGS) <= set(recorded["detector"])
    assert recorded["detector"]["box_fusion_iou"] == 0.5
    training_only = {key: value for key, value in trained["detector"].items() if key not in INFERENCE_SETTINGS}
    assert training_only.items() <= recorded["detector"].items()
    assert after["detector_kept_from"] == {
        "command": earlier["command"],
        "code_commit": earlier["code_commit"],
        "machine": earlier["machine"],
        # The fixture's build was re-run once, which timed no fine-tuning: then there is none to carry.
        "stage_seconds": {stage: time for stage, time in earlier["stage_seconds"].items() if stage == "finetune"},
        "sha256": earlier["files"][DETECTOR_FILE]["sha256"],
    }
    assert "retune" in after["stage_seconds"]
    assert "finetune" not in after["stage_seconds"]
    assert not (work / "finetune").exists()
    assert not (work / "unlabeled").exists()
    assert after["files"][FOUNDATION_FILE] == earlier["files"][FOUNDATION_FILE]
    # Retuned again, it still points at the build that fine-tuned the weights.
    assert main([*args, "--keep-detector"]) == 0
    again = json.loads((kept / PROVENANCE_FILE).read_text())
    assert again["detector_kept_from"] == after["detector_kept_from"]
    assert again["retune"]["settings"] == {"box_fusion_iou": {"from": 0.5, "to": None}}


def test_keep_detector_refuses_a_detector_or_labeled_set_its_provenance_does_not_describe(built, tmp_path, capsys):
    out, _ = built
    kept = tmp_path / "models"
    shutil.copytree(out, kept)
    args = ["reference", "--config", "smoke", "--out", str(kept), "--work", str(tmp_path / "work"), "--quiet"]
    assert main([*args, "--keep-detector", "--set", "labeled_images=15"]) == 2
    error = capsys.readouterr().err
    assert "another labeled set" in error
    assert "Traceback" not in error
    with (kept / DETECTOR_FILE).open("ab") as detector:
        detector.write(b"\0")
    assert main([*args, "--keep-detector"]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err
    assert not (tmp_path / "work" / "retune").exists()


def test_bad_reference_settings_are_one_line_errors(tmp_path, capsys):
    args = ["reference", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--config", "smoke"]
    assert main([*args, "--set", "shifted_generator={exposure_photons: fast}"]) == 2
    assert "shifted_generator" in capsys.readouterr().err
    assert main([*args, "--set", "labeled_images=0"]) == 2
    assert "labeled_images must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_default_build_is_the_documented_one():
    config = load_reference_config("default", None)
    assert config.unlabeled_images >= 10000
    assert config.labeled_images >= 1000
    assert (config.pretrain_config, config.finetune_config) == ("reference", "reference")


def test_the_cpu_build_draws_the_same_data_and_trains_what_the_detector_and_the_demo_share():
    config = load_reference_config("cpu", None)
    default = load_reference_config("default", None)
    assert (config.unlabeled_images, config.labeled_images, config.test_images, config.seed) == (
        default.unlabeled_images,
        default.labeled_images,
        default.test_images,
        default.seed,
    )
    pretrain = load_pretrain_config(config.pretrain_config, None)
    finetune = load_finetune_config(config.finetune_config, None)
    demo = load_finetune_config("demo", None)
    # The reference detector is fine-tuned at the working scale its encoder was pretrained at.
    assert finetune.detector["spacing_mm"] == pretrain.data.spacing_mm
    assert (pretrain.model.size, pretrain.model.depth, pretrain.model.patch_size) == (
        finetune.model.size,
        finetune.model.depth,
        finetune.model.patch_size,
    )
    # The demo fine-tunes the same detector on that encoder, at a coarser scale with about the same physical field of
    # view per crop (two neighbouring teeth), and more positive anchors per lesion, for its 15 minutes
    # (docs/detection_recipe.md, "A frozen foundation encoder for the demo"); its lower score floor and narrower
    # pyramid were measured on its own model only ("Box fusion and test-time flips", "Repeat factor sampling, and the
    # demo on fresh seeds").
    demo_only = {
        "image_size",
        "roi_size",
        "spacing_mm",
        "sliding_window_overlap",
        "atss_candidates",
        "score_threshold",
        "pyramid_channels",
    }
    assert {key: value for key, value in demo.detector.items() if key not in demo_only} == {
        key: value for key, value in finetune.detector.items() if key not in demo_only
    }
    field_mm = {
        name: d["image_size"] * d["spacing_mm"]
        for name, d in (("demo", demo.detector), ("reference", finetune.detector))
    }
    assert abs(field_mm["demo"] - field_mm["reference"]) < 1.0
    assert demo.model == finetune.model
    assert demo.data.positive_fraction == finetune.data.positive_fraction
    continued = load_pretrain_config("demo", None)
    assert (continued.model, continued.data.spacing_mm) == (pretrain.model, pretrain.data.spacing_mm)


def test_the_gpu_build_fine_tunes_the_cpu_recipe_longer_on_the_same_data():
    gpu, cpu = load_reference_config("gpu", None), load_reference_config("cpu", None)
    assert (gpu.unlabeled_images, gpu.labeled_images, gpu.test_images, gpu.seed, gpu.pretrain_config) == (
        cpu.unlabeled_images,
        cpu.labeled_images,
        cpu.test_images,
        cpu.seed,
        cpu.pretrain_config,
    )
    on_gpu = load_finetune_config(gpu.finetune_config, None)
    on_cpu = load_finetune_config(cpu.finetune_config, None)
    # The same detector and sampling: only the schedule (batch, steps, warmup) and the workers differ.
    assert (on_gpu.model, on_gpu.detector, on_gpu.data.positive_fraction) == (
        on_cpu.model,
        on_cpu.detector,
        on_cpu.data.positive_fraction,
    )
    assert on_gpu.optim.batch_size * on_gpu.train.steps > on_cpu.optim.batch_size * on_cpu.train.steps


def _without_git(*args, **kwargs):
    raise FileNotFoundError("git")


def test_a_tree_without_git_records_the_commit_it_declares(monkeypatch):
    monkeypatch.setattr(reference.subprocess, "run", _without_git)
    monkeypatch.delenv(reference.SOURCE_COMMIT_VARIABLE, raising=False)
    assert reference.code_commit() is None
    monkeypatch.setenv(reference.SOURCE_COMMIT_VARIABLE, "7d03633" + "0" * 33)
    assert reference.code_commit() == "7d03633" + "0" * 33
    monkeypatch.setenv(reference.SOURCE_COMMIT_VARIABLE, "main")
    with pytest.raises(InvalidArgumentError, match="CARIES_MIM_SOURCE_COMMIT must be a 40-digit"):
        reference.code_commit()


def test_a_git_checkout_ignores_a_declared_commit(monkeypatch):
    monkeypatch.setenv(reference.SOURCE_COMMIT_VARIABLE, "0" * 40)
    recorded = reference.code_commit()
    if recorded is None:
        pytest.skip("this copy of the code is not a git checkout")
    assert not recorded.startswith("0" * 40)
