"""The models shipped in ``models/``: intact, traceable to the command that built them, loadable, and predicting what
they predicted when they were committed."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from caries_mim.metrics import box_iou
from caries_mim.models import load_encoder
from caries_mim.package import (
    REFERENCE_DETECTOR,
    SHIPPED_MODELS,
    ModelPackage,
    read_package,
    shipped_reference_detector,
)
from pipelines.cli import main
from pipelines.reference import DETECTOR_FILE, FOUNDATION_FILE, PROVENANCE_FILE, RECONSTRUCTIONS_FILE
from tests.reference_pins import FIXTURE, PINS, package_sha256, predict_fixture

#: The issue's budget for the folder (every rebuild adds its size to the repository's history).
MAX_FOLDER_BYTES = 30 * 1024 * 1024
#: Findings compared with the pins: every one at or above this on either side must have its twin on the other.
COMPARED_FLOOR = 0.1


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads((SHIPPED_MODELS / PROVENANCE_FILE).read_text())


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return read_package(REFERENCE_DETECTOR)  # verifies format, checksum and config


@pytest.fixture(scope="module")
def fixture_findings() -> list[dict]:
    """Every finding of the shipped detector on the fixture radiograph (one prediction for all the tests)."""
    return predict_fixture()["findings"]


def test_the_shipped_files_match_the_checksums_their_provenance_records(provenance):
    assert set(provenance["files"]) == {FOUNDATION_FILE, DETECTOR_FILE, RECONSTRUCTIONS_FILE}
    for name, recorded in provenance["files"].items():
        content = (SHIPPED_MODELS / name).read_bytes()
        assert len(content) == recorded["bytes"], name
        assert hashlib.sha256(content).hexdigest() == recorded["sha256"], name
    assert (SHIPPED_MODELS / RECONSTRUCTIONS_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_models_stay_small(provenance):
    # What the repository commits (a package copied into models/ for a local deployment is not counted).
    total = sum(recorded["bytes"] for recorded in provenance["files"].values())
    assert total + (SHIPPED_MODELS / PROVENANCE_FILE).stat().st_size < MAX_FOLDER_BYTES


def test_the_provenance_says_how_where_and_from_what_the_models_were_built(provenance):
    assert provenance["command"][:2] == ["caries-mim", "reference"]
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["code_commit"]), "built from a clean, committed checkout"
    assert provenance["machine"]["cpu_count"] >= 1
    assert provenance["machine"]["torch"]
    data = provenance["data"]
    seeds = [data[name]["seed"] for name in ("unlabeled", "labeled", "fresh_test", "shifted_test")]
    assert len(set(seeds)) == 4, "every set from its own seed: the test sets share none with training"
    assert data["unlabeled"]["images"] >= 10000
    assert data["labeled"]["images"] >= 1000
    assert data["shifted_test"]["generator"] != data["fresh_test"]["generator"]
    pretrain, finetune = provenance["pretrain"], provenance["finetune"]
    assert pretrain["steps"] == provenance["pretrain_config"]["train"]["steps"]
    assert pretrain["last_loss"] > 0
    assert finetune["steps"] >= finetune["best_step"] > 0
    assert 0 < finetune["best_val_ap50"] <= 1
    # Every stage was timed when it ran: in this build, or (--keep-foundation) in the build that pretrained the encoder.
    kept = provenance.get("foundation_kept_from")
    pretraining = kept["stage_seconds"] if kept else provenance["stage_seconds"]
    assert {"synth_unlabeled", "pretrain"} <= set(pretraining), "timed, not re-exported"
    # (--keep-detector) the weights' fine-tuning was timed in the build that ran it; this one retuned them.
    kept_detector = provenance.get("detector_kept_from")
    fine_tuning = kept_detector["stage_seconds"] if kept_detector else provenance["stage_seconds"]
    assert "finetune" in fine_tuning, "timed, not re-exported"
    if kept_detector:
        assert "retune" in provenance["stage_seconds"]
        assert provenance["retune"]["threshold"] == read_package(REFERENCE_DETECTOR).threshold
    if kept:
        assert kept["sha256"] == provenance["files"][FOUNDATION_FILE]["sha256"]
    assert provenance["wall_seconds"] >= sum(provenance["stage_seconds"].values())
    for test_set in ("fresh_seed", "shifted_generator"):
        metrics = provenance["test_metrics"][test_set]
        assert metrics["images"] == data["fresh_test"]["images"]
        assert metrics["lesions"] > 0
        assert 0 <= metrics["ap50_ci"][0] <= metrics["ap50"] <= metrics["ap50_ci"][1] <= 1


def test_the_reference_detector_loads_verified_with_its_provenance_and_fp16_weights(provenance, package):
    recorded = {key: value for key, value in provenance.items() if key not in ("files", "wall_seconds")}
    assert package.provenance["reference"] == recorded
    floating = [tensor for tensor in package.state_dict.values() if tensor.is_floating_point()]
    assert floating
    assert all(tensor.dtype == torch.float16 for tensor in floating)
    finetune = provenance["finetune_config"]
    assert package.config.spacing_mm == finetune["detector"]["spacing_mm"]
    assert package.config.spatial_prior_width == finetune["detector"].get("spatial_prior_width")


def test_the_foundation_encoder_is_the_pretrained_architecture_the_detector_was_fine_tuned_from(provenance, package):
    stored = torch.load(SHIPPED_MODELS / FOUNDATION_FILE, weights_only=True)["state_dict"]
    assert all(tensor.dtype == torch.float16 for tensor in stored.values() if tensor.is_floating_point())
    loaded = load_encoder(SHIPPED_MODELS / FOUNDATION_FILE)  # into fp32
    model = provenance["pretrain_config"]["model"]
    assert (loaded.encoder.config.depth, loaded.encoder.config.patch_size) == (model["depth"], model["patch_size"])
    fine_tuned = package.config.encoder
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "in_channels"):
        assert getattr(fine_tuned, key) == getattr(loaded.encoder.config, key), key


def _iou(a: list[float], b: list[float]) -> float:
    return float(box_iou(np.array([a], dtype=float), np.array([b], dtype=float))[0, 0])


def _pair(findings: list[dict], candidates: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each finding scoring >= COMPARED_FLOOR with its own twin among ``candidates`` (each used once): same label,
    score within 0.01, box IoU >= 0.98; None when it has none."""
    unused = list(candidates)
    pairs = []
    for finding in sorted(findings, key=lambda item: -item["score"]):
        if finding["score"] < COMPARED_FLOOR:
            continue
        twin = next(
            (
                candidate
                for candidate in unused
                if candidate["label"] == finding["label"]
                and abs(candidate["score"] - finding["score"]) <= 0.01
                and _iou(candidate["box"], finding["box"]) >= 0.98
            ),
            None,
        )
        if twin is not None:
            unused.remove(twin)
        pairs.append((finding, twin))
    return pairs


def test_the_reference_detector_predicts_on_the_fixture_what_was_pinned(package, fixture_findings):
    pins = json.loads(PINS.read_text())
    assert pins["package_sha256"] == package_sha256(), (
        "models/ was rebuilt after the pins were taken: check the new detector, then re-pin with "
        "`.venv/bin/python -m tests.reference_pins`"
    )
    # Under the detector's cap, so no finding near the cut can swap places with one past it across machines.
    assert len(pins["findings"]) < package.config.detections_per_image
    found = fixture_findings
    pinned_pairs = _pair(pins["findings"], found)
    assert pinned_pairs, "the pins hold findings to compare"
    for finding, twin in pinned_pairs:
        assert twin is not None, f"pinned finding lost: {finding}"
        if abs(finding["score"] - pins["threshold"]) > 0.01:
            assert twin["above_threshold"] == finding["above_threshold"], finding
    for finding, twin in _pair(found, pins["findings"]):
        assert twin is not None, f"new finding: {finding}"


def test_predict_without_a_model_uses_the_shipped_reference_detector(capsys, fixture_findings):
    assert shipped_reference_detector() == REFERENCE_DETECTOR
    assert main(["predict", "--device", "cpu", "--all-findings", str(FIXTURE)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [finding["box"] for finding in row["findings"]] == [finding["box"] for finding in fixture_findings]


def test_the_reference_detector_finds_every_lesion_of_the_fixture(fixture_findings):
    truth = json.loads(FIXTURE.with_name("truth.json").read_text())["lesions"]
    found = [finding for finding in fixture_findings if finding["score"] >= 0.25]
    for lesion in truth:
        x, y, width, height = lesion["bbox_xywh"]
        box = [x, y, x + width, y + height]
        assert max(_iou(box, finding["box"]) for finding in found) >= 0.5, lesion
