"""The model package file: round trip, checksum, typed errors for unusable files, atomic writes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from caries_mim.detection import CariesDetector
from caries_mim.errors import InvalidArgumentError, InvalidCheckpointError
from caries_mim.inference import Predictor
from caries_mim.package import (
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    ModelPackage,
    load_package,
    package_checksum,
    read_package,
    save_package,
)
from tests.detection.tiny import tiny_config

PROVENANCE = {"training_config": {"steps": 3, "lr": 1e-4}, "data_fingerprint": "abc123", "val": {"froc": 0.5}}


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config())
    return ModelPackage.from_detector(
        detector, threshold=0.3, target_sensitivity=0.9, version="1.2.3", provenance=PROVENANCE
    )


@pytest.fixture
def saved(package, tmp_path) -> Path:
    return save_package(package, tmp_path / "model.cmpkg")


def _rewrite(path: Path, change) -> None:
    """Edit the stored dict the way a tamperer would: without recomputing the checksum."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_round_trip_keeps_everything(package, saved):
    loaded = read_package(saved)
    assert loaded.config == package.config
    assert loaded.threshold == 0.3
    assert loaded.target_sensitivity == 0.9
    assert loaded.version == "1.2.3"
    assert loaded.provenance == PROVENANCE
    assert loaded.class_names == ("caries",)
    assert sorted(loaded.state_dict) == sorted(package.state_dict)
    for name, tensor in package.state_dict.items():
        assert torch.equal(loaded.state_dict[name], tensor), name


def test_file_is_plain_and_self_describing(saved, package):
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == PACKAGE_FORMAT
    assert payload["version"] == PACKAGE_FORMAT_VERSION
    assert payload["detector_config"] == package.config.to_dict()
    assert payload["preprocessing"]["image_size"] == 64
    assert payload["checksum"]["algorithm"] == "sha256"
    assert payload["checksum"]["value"] == package_checksum(payload)


def test_checksum_is_deterministic_and_covers_weights_and_metadata(package):
    first, second = package.to_payload(), package.to_payload()
    assert first["checksum"] == second["checksum"]
    changed = dict(first, threshold=0.31)
    assert package_checksum(changed) != first["checksum"]["value"]


def test_a_read_package_hashes_its_weights_once(saved, monkeypatch):
    """read_package verifies the checksum; the package reports that value instead of hashing every weight again."""
    import caries_mim.package as package_module

    calls = []
    original = package_module.package_checksum
    monkeypatch.setattr(package_module, "package_checksum", lambda payload: calls.append(1) or original(payload))
    loaded = read_package(saved)
    assert loaded.checksum == torch.load(saved, weights_only=True)["checksum"]["value"]
    assert loaded.to_payload()["checksum"]["value"] == loaded.checksum
    assert len(calls) == 1


def test_round_trip_gives_identical_predictions(package, saved):
    pixels = np.random.default_rng(0).random((50, 77), dtype=np.float32)
    before = Predictor(package, device="cpu").predict(pixels)
    after = load_package(saved, device="cpu").predict(pixels)
    assert len(before) > 0
    assert [f.box for f in before.findings] == [f.box for f in after.findings]
    assert [f.score for f in before.findings] == [f.score for f in after.findings]


def test_a_flipped_weight_bit_is_a_checksum_mismatch(saved):
    def flip(payload):
        name = sorted(payload["state_dict"])[0]
        payload["state_dict"][name].reshape(-1).view(torch.uint8)[0] ^= 1

    _rewrite(saved, flip)
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch: file corrupt or modified") as info:
        read_package(saved)
    assert str(saved) in info.value.message
    assert info.value.code == "invalid_checkpoint"


def test_an_edited_threshold_is_a_checksum_mismatch(saved):
    _rewrite(saved, lambda payload: payload.update(threshold=0.01))
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch"):
        read_package(saved)


def test_unsupported_version_is_refused(saved):
    _rewrite(saved, lambda payload: payload.update(version=99))
    with pytest.raises(InvalidCheckpointError, match="version 99 is not supported"):
        read_package(saved)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.cmpkg"
    with pytest.raises(InvalidCheckpointError, match="no such file") as info:
        read_package(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    "write",
    [
        lambda path: torch.save({"model": torch.zeros(3)}, path),
        lambda path: path.write_text("threshold: 0.5\n"),
        lambda path: path.write_bytes(b""),
    ],
    ids=["foreign-torch-file", "text-file", "empty-file"],
)
def test_files_that_are_not_packages(tmp_path, write):
    path = tmp_path / "model.cmpkg"
    write(path)
    with pytest.raises(InvalidCheckpointError) as info:
        read_package(path)
    assert str(path) in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("write", "said"),
    [
        (lambda path: path.write_text("# caries-mim\n\nREADME text\n"), "not a file torch.save writes"),
        (lambda path: torch.save({"x": PurePosixPath("/")}, path), "could run code from the file"),
        (lambda path: torch.save({"format": "caries-mim-encoder"}, path), "it is a 'caries-mim-encoder' file"),
    ],
    ids=["text", "pickled-objects", "an-encoder"],
)
def test_a_file_that_is_not_a_package_is_called_that_never_advised_to_load_unsafely(tmp_path, write, said):
    """`caries-mim predict --model README.md` once passed on torch's advice to reload with weights_only=False."""
    path = tmp_path / "model.cmpkg"
    write(path)
    with pytest.raises(InvalidCheckpointError) as info:
        read_package(path)
    message = info.value.message
    assert message.startswith(f"{path} is not a caries-mim model package (the model.cmpkg that `caries-mim finetune`")
    assert said in message
    assert "weights_only" not in message
    assert "will likely succeed" not in message


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidCheckpointError, match="damaged or truncated") as info:
        read_package(saved)
    assert str(saved) in info.value.message


def test_weights_that_do_not_fit_the_config(package, tmp_path):
    other = CariesDetector(tiny_config(pyramid_channels=24))
    mismatched = ModelPackage(config=package.config, state_dict=dict(other.state_dict()), threshold=0.5)
    path = save_package(mismatched, tmp_path / "model.cmpkg")
    with pytest.raises(InvalidCheckpointError, match="weights do not match the stored config") as info:
        load_package(path, device="cpu")
    assert str(path) in info.value.message


def test_save_leaves_no_temporary_files(package, tmp_path):
    save_package(package, tmp_path / "model.cmpkg")
    assert [p.name for p in tmp_path.iterdir()] == ["model.cmpkg"]


def test_a_save_that_dies_keeps_the_previous_file(package, saved, monkeypatch):
    good = saved.read_bytes()
    real_save = torch.save

    def dying_save(obj, target, *args, **kwargs):
        if Path(target).name.startswith(".model.cmpkg"):
            Path(target).write_bytes(b"half a package")
            raise OSError("disk full")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_package(ModelPackage.from_detector(CariesDetector(tiny_config()), threshold=0.9), saved)
    assert saved.read_bytes() == good
    assert not list(saved.parent.glob(".*.tmp"))
    assert read_package(saved).threshold == 0.3


@pytest.mark.parametrize(
    "change",
    [{"threshold": 1.5}, {"threshold": -0.1}, {"target_sensitivity": 2.0}, {"provenance": {"x": float("nan")}}],
)
def test_invalid_package_values_are_refused(package, change):
    values = {"config": package.config, "state_dict": package.state_dict, "threshold": 0.5, **change}
    with pytest.raises(InvalidArgumentError):
        ModelPackage(**values)
