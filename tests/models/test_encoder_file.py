"""``encoder.pt``: round trip, metadata, safe loading, config overrides on load, and every way a file can be wrong."""

from __future__ import annotations

import pytest
import torch

from caries_mim.errors import InvalidCheckpointError
from caries_mim.models import VisionTransformer, ViTConfig, load_encoder, save_encoder
from caries_mim.models.encoder_file import ENCODER_FORMAT, ENCODER_FORMAT_VERSION

SMALL = ViTConfig(image_size=(64, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4)
METADATA = {"objective": "mae", "steps": 30, "final_loss": 0.125, "tags": ["synthetic", "test"], "nested": {"a": 1}}


@pytest.fixture
def trained(tmp_path):
    """An encoder whose weights differ from a fresh one's, saved to ``encoder.pt``."""
    torch.manual_seed(0)
    encoder = VisionTransformer(SMALL).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, METADATA)
    return encoder, path


def test_round_trip_gives_identical_outputs(trained):
    encoder, path = trained
    loaded = load_encoder(path)
    assert loaded.encoder.config == encoder.config
    images = torch.rand(2, 1, 64, 96)
    loaded.encoder.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encoder(images).tokens, encoder(images).tokens)
    original = encoder.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in loaded.encoder.state_dict().items())


def test_metadata_is_preserved(trained):
    _, path = trained
    assert load_encoder(path).metadata == METADATA


def test_metadata_defaults_to_empty(tmp_path):
    path = tmp_path / "encoder.pt"
    save_encoder(VisionTransformer(SMALL), path)
    assert load_encoder(path).metadata == {}


def test_file_is_a_plain_dict_loadable_with_weights_only(trained):
    """No pickled classes: an untrusted encoder file cannot run code when loaded."""
    encoder, path = trained
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == ENCODER_FORMAT
    assert payload["version"] == ENCODER_FORMAT_VERSION
    assert payload["config"] == SMALL.to_dict()
    assert payload["metadata"] == METADATA
    assert set(payload["state_dict"]) == set(encoder.state_dict())
    assert all(tensor.device.type == "cpu" for tensor in payload["state_dict"].values())


def test_image_size_override_resamples_position_embedding(trained):
    encoder, path = trained
    loaded = load_encoder(path, image_size=(128, 96)).encoder.eval()
    assert loaded.config.image_size == (128, 96)
    assert loaded.config.grid_size == (8, 6)
    assert loaded.pos_embed.shape == (1, 1 + 8 * 6, 64)
    assert torch.equal(loaded.pos_embed[:, :1], encoder.pos_embed[:, :1])
    assert torch.allclose(loaded.pos_embed[:, 1:], encoder.position_embedding((8, 6)))
    assert torch.equal(loaded.blocks[1].mlp.fc1.weight, encoder.blocks[1].mlp.fc1.weight)
    images = torch.rand(2, 1, 128, 96)
    with torch.no_grad():
        # At the new reference grid the stored (resampled) embedding is used as is: same tokens as the original
        # encoder resampling on the fly.
        assert torch.allclose(loaded(images).tokens, encoder(images).tokens, atol=1e-5)
        assert loaded(torch.rand(1, 1, 64, 64)).tokens.shape == (1, 17, 64)


def test_drop_path_rate_override(trained):
    encoder, path = trained
    loaded = load_encoder(path, drop_path_rate=0.1).encoder
    assert loaded.config.drop_path_rate == 0.1
    assert loaded.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)


def test_no_temporary_files_are_left_after_save(tmp_path):
    encoder = VisionTransformer(SMALL)
    save_encoder(encoder, tmp_path / "encoder.pt")
    save_encoder(encoder, tmp_path / "encoder.pt", {"overwritten": True})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["encoder.pt"]
    assert load_encoder(tmp_path / "encoder.pt").metadata == {"overwritten": True}


def test_missing_file(tmp_path):
    with pytest.raises(InvalidCheckpointError, match="no such file"):
        load_encoder(tmp_path / "absent.pt")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InvalidCheckpointError):
        load_encoder(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [{"model": {"cls_token": torch.zeros(1, 1, 64)}}, {"format": "something-else"}, torch.zeros(3)],
    ids=["mae-checkpoint", "other-format", "bare-tensor"],
)
def test_non_encoder_file(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(InvalidCheckpointError, match="not a caries-mim encoder file"):
        load_encoder(path)


def test_truncated_file(trained):
    _, path = trained
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidCheckpointError, match="damaged or truncated"):
        load_encoder(path)


def test_text_file(tmp_path):
    path = tmp_path / "encoder.pt"
    path.write_text("not weights")
    with pytest.raises(InvalidCheckpointError):
        load_encoder(path)


def _rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return payload


def test_unsupported_version(trained):
    _, path = trained
    _rewrite(path, version=99)
    with pytest.raises(InvalidCheckpointError, match="version 99"):
        load_encoder(path)


def test_version_1_file_loads_with_the_raw_pixel_input_it_was_trained_on(trained):
    """Version 1 predates input standardization: its encoder must keep computing proj(x), not proj((x - m) / s)."""
    encoder, path = trained
    config = SMALL.to_dict()
    del config["input_mean"], config["input_std"]
    _rewrite(path, version=1, config=config)
    loaded = load_encoder(path).encoder.eval()
    assert (loaded.config.input_mean, loaded.config.input_std) == (0.0, 1.0)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = encoder.patch_embed.proj(images).flatten(2).transpose(1, 2)
        assert torch.allclose(loaded.patch_embed(images), expected, atol=1e-6)


def test_unusable_config(trained):
    _, path = trained
    config = SMALL.to_dict()
    config["bogus"] = 1
    _rewrite(path, config=config)
    with pytest.raises(InvalidCheckpointError, match="bogus"):
        load_encoder(path)


def test_weights_that_do_not_match_config(trained):
    _, path = trained
    config = SMALL.to_dict()
    config["depth"] = 3
    _rewrite(path, config=config)
    with pytest.raises(InvalidCheckpointError, match="do not match"):
        load_encoder(path)
