"""The detector's encoder from encoder.pt: every key reported, position embedding resampled, strict architecture."""

from __future__ import annotations

import pytest
import torch

from caries_mim.detection import build_detector, load_detector_encoder
from caries_mim.errors import InvalidCheckpointError
from caries_mim.models import VisionTransformer, ViTConfig, save_encoder
from tests.detection.tiny import TINY_ENCODER, tiny_config


def _save(tmp_path, config: ViTConfig):
    torch.manual_seed(0)
    encoder = VisionTransformer(config)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, {"objective": "mae"})
    return encoder, path


def test_every_encoder_key_is_loaded_and_the_position_embedding_resampled(tmp_path):
    pretrained, path = _save(tmp_path, ViTConfig.from_dict({**TINY_ENCODER.to_dict(), "image_size": 32}))
    config = tiny_config()  # 64 px input: a 4 x 4 grid instead of the pretrained 2 x 2
    encoder, report = load_detector_encoder(config, path)
    keys = set(encoder.state_dict())
    assert set(report.mapped) == keys - {"pos_embed"}
    assert set(report.adapted) == {"pos_embed"}
    assert "(2, 2)" in report.adapted["pos_embed"]
    assert "(4, 4)" in report.adapted["pos_embed"]
    assert report.missing == []
    assert report.unexpected == []
    assert encoder.config == config.encoder
    assert encoder.pos_embed.shape == (1, 1 + 16, 32)
    stored = pretrained.state_dict()
    assert all(torch.equal(encoder.state_dict()[key], stored[key]) for key in report.mapped)


def test_same_grid_maps_every_key_unchanged(tmp_path):
    config = tiny_config()
    _, path = _save(tmp_path, config.encoder)
    encoder, report = load_detector_encoder(config, path)
    assert set(report.mapped) == set(encoder.state_dict())
    assert report.adapted == {}


def test_the_detector_uses_the_loaded_weights_and_the_configs_stochastic_depth(tmp_path):
    pretrained, path = _save(tmp_path, TINY_ENCODER)
    config = tiny_config(encoder={**TINY_ENCODER.to_dict(), "drop_path_rate": 0.1})
    detector, report = build_detector(config, path)
    assert detector.encoder.config.drop_path_rate == 0.1
    weight = "blocks.0.attn.qkv.weight"
    assert weight in report.mapped
    assert torch.equal(
        detector.state_dict()[f"retinanet.network.feature_extractor.encoder.{weight}"], pretrained.state_dict()[weight]
    )


def test_without_a_file_every_key_is_reported_missing():
    encoder, report = load_detector_encoder(tiny_config())
    assert set(report.missing) == set(encoder.state_dict())
    assert report.mapped == []


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"embed_dim": 64, "num_heads": 4}, "embed_dim 64 (config: 32)"),
        ({"depth": 2}, "depth 2 (config: 1)"),
        # 8 px patches: the stored grid would not even fit; still an architecture error, not a config error.
        ({"patch_size": 8, "image_size": 64}, "patch_size 8 (config: 16)"),
    ],
)
def test_another_architecture_is_refused_by_name(tmp_path, changes, named):
    _, path = _save(tmp_path, ViTConfig.from_dict({**TINY_ENCODER.to_dict(), **changes}))
    with pytest.raises(InvalidCheckpointError, match="architecture differs") as caught:
        load_detector_encoder(tiny_config(), path)
    assert named in caught.value.message


def test_a_file_that_is_not_an_encoder_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(InvalidCheckpointError, match="not a caries-mim encoder file"):
        load_detector_encoder(tiny_config(), path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidCheckpointError, match="no such file"):
        build_detector(tiny_config(), tmp_path / "absent.pt")
