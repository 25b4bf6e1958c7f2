"""``caries-mim retune``: new inference settings on the same weights, the threshold chosen again on validation
images as fine-tuning chooses it, the change recorded, and every mistake a one-line error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Predictor
from caries_mim.io import ReadOptions
from caries_mim.metrics import select_operating_point
from caries_mim.package import read_package, save_package
from caries_mim.synth import generate_dataset
from pipelines.cli import main
from pipelines.evaluate import evaluated_image, load_evaluation_data, read_image
from pipelines.retune import INFERENCE_SETTINGS, inference_settings, retune_package
from tests.pipelines.test_evaluate import SMALL, make_package


@pytest.fixture(scope="module")
def validation(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=0, n_labeled=6, seed=3, progress=False, config=SMALL)
    return out / "labeled" / "train.json"  # any annotated split: these images trained nothing


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("package") / "model.cmpkg")


def _with_target(package: Path, target: float) -> Path:
    loaded = read_package(package)
    return save_package(dataclasses.replace(loaded, target_sensitivity=target), package.with_name(f"t{target}.cmpkg"))


def test_retuning_changes_the_settings_keeps_the_weights_and_chooses_the_threshold_as_fine_tuning_does(
    package, validation, tmp_path
):
    source = _with_target(package, 0.8)
    settings = {"box_fusion_iou": 0.5, "test_time_flip": True, "test_time_vertical_flip": True}
    out = tmp_path / "retuned.cmpkg"
    summary = retune_package(source, [validation], out, settings, progress=False, device="cpu")
    before, after = read_package(source), read_package(out)
    assert all(torch.equal(before.state_dict[name], after.state_dict[name]) for name in before.state_dict)
    assert (after.config.box_fusion_iou, after.config.test_time_flip, after.config.test_time_vertical_flip) == (
        0.5,
        True,
        True,
    )
    assert after.config.to_dict() == {**before.config.to_dict(), **settings}
    assert after.target_sensitivity == 0.8
    # The threshold a fine-tuning run would have chosen on these images with this inference.
    predictor = Predictor(after, device="cpu")
    evaluation = load_evaluation_data([validation], list(after.class_names))
    images = [
        evaluated_image(item, predictor.predict(read_image(item.image_path, ReadOptions())), after.class_names)
        for item in evaluation.items
    ]
    assert after.threshold == pytest.approx(select_operating_point(images, target_sensitivity=0.8).threshold)
    assert summary["threshold"] == after.threshold
    assert summary["previous_threshold"] == before.threshold
    record = after.provenance["retuned"][-1]
    assert record["from_checksum"] == before.checksum
    assert record["settings"]["test_time_vertical_flip"] == {"from": False, "to": True}
    assert record["validation"]["images"] == len(images) > 0
    assert set(after.provenance) - {"retuned"} == set(before.provenance)


def test_a_second_retune_adds_to_the_record_and_an_unchanged_setting_is_not_listed(package, validation, tmp_path):
    first = retune_package(package, [validation], tmp_path / "a.cmpkg", {"box_fusion_iou": 0.5},
                           target_sensitivity=0.9, progress=False, device="cpu")  # fmt: skip
    assert set(first["settings"]) == {"box_fusion_iou"}
    retune_package(tmp_path / "a.cmpkg", [validation], tmp_path / "b.cmpkg", {"box_fusion_iou": 0.5,
                   "test_time_flip": True}, progress=False, device="cpu")  # fmt: skip
    records = read_package(tmp_path / "b.cmpkg").provenance["retuned"]
    assert len(records) == 2
    assert set(records[1]["settings"]) == {"test_time_flip"}
    assert records[1]["target_sensitivity"] == 0.9  # kept from the package


def test_only_inference_settings_can_be_retuned(package, validation, tmp_path):
    with pytest.raises(InvalidArgumentError, match="not an inference setting: atss_candidates"):
        retune_package(package, [validation], tmp_path / "x.cmpkg", {"atss_candidates": 9}, target_sensitivity=0.9,
                       progress=False)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="test_time_flip fuses the passes' boxes"):
        retune_package(package, [validation], tmp_path / "x.cmpkg", {"test_time_flip": True},
                       target_sensitivity=0.9, progress=False)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="target sensitivity"):
        retune_package(package, [validation], tmp_path / "x.cmpkg", {}, progress=False)  # the package has none
    assert not (tmp_path / "x.cmpkg").exists()
    recipe = {"atss_candidates": 9, "box_fusion_iou": 0.5, "test_time_flip": True, "image_size": 512}
    resolved = inference_settings(recipe)
    assert set(resolved) == set(INFERENCE_SETTINGS)
    assert (resolved["box_fusion_iou"], resolved["test_time_flip"], resolved["test_time_vertical_flip"]) == (
        0.5,
        True,
        False,
    )
    assert set(INFERENCE_SETTINGS) <= set(read_package(package).config.to_dict())


def test_the_command_line_retunes_and_reports_mistakes_in_one_line(package, validation, tmp_path, capsys):
    out = tmp_path / "cli.cmpkg"
    args = ["retune", "--model", str(package), "--val", str(validation), "--out", str(out), "--quiet"]
    common = [*args, "--device", "cpu", "--target-sensitivity", "0.9"]
    assert main([*common, "--set", "detector.box_fusion_iou=0.5", "--set", "test_time_flip=true"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["settings"]) == {"box_fusion_iou", "test_time_flip"}
    assert read_package(out).config.test_time_flip is True
    for bad, message in (
        (["--set", "optim.lr=1"], "not optim"),
        (["--set", "image_size=256"], "not an inference setting: image_size"),
        (["--set", "box_fusion_iou=2"], "box_fusion_iou must be in"),
    ):
        assert main([*common, *bad]) == 2
        error = capsys.readouterr().err
        assert message in error
        assert "Traceback" not in error
    assert main([*args, "--target-sensitivity", "0.9", "--model", str(tmp_path / "missing.cmpkg")]) == 2
    assert "Traceback" not in capsys.readouterr().err
