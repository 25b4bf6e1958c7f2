"""DetectorConfig: round trip through plain types, and every bad value named by its key."""

from __future__ import annotations

import pytest
import torch
import yaml

from caries_mim.detection import DetectorConfig
from caries_mim.errors import InvalidArgumentError
from tests.detection.tiny import TINY_ENCODER, tiny_config


def test_round_trip_through_yaml_and_weights_only_torch(tmp_path):
    config = tiny_config(class_names=("enamel", "dentin"), anchor_shapes=((10, 10), (8, 14)), max_downscale=3.0)
    values = config.to_dict()
    assert DetectorConfig.from_dict(yaml.safe_load(yaml.safe_dump(values))) == config
    torch.save(values, tmp_path / "config.pt")
    assert DetectorConfig.from_dict(torch.load(tmp_path / "config.pt", weights_only=True)) == config


def test_defaults_round_trip():
    assert DetectorConfig.from_dict(DetectorConfig().to_dict()) == DetectorConfig()


def test_encoder_reference_grid_is_the_detector_input_and_roi_defaults_to_it():
    config = tiny_config(image_size=128)
    assert config.encoder.image_size == (128, 128)
    assert config.roi_size == 128
    assert config.strides == (8, 16, 32)
    assert config.num_classes == 1


def test_encoder_may_be_given_as_a_mapping():
    assert tiny_config(encoder=TINY_ENCODER.to_dict()) == tiny_config()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nms_treshold": 0.3}, "unknown detector config key.*nms_treshold"),
        ({"image_size": "512"}, "detector config image_size: expected a whole number"),
        ({"anchor_shapes": [[16, 16, 16]]}, "detector config anchor_shapes"),
        ({"class_names": "caries"}, "detector config class_names"),
        ({"encoder": {"embed_dims": 32}}, "detector config encoder: unknown ViT config key.*embed_dims"),
        ({"encoder": "vit_small"}, "encoder must be a ViT config mapping"),
    ],
)
def test_bad_keys_and_types_are_named(values, message):
    with pytest.raises(InvalidArgumentError, match=message):
        DetectorConfig.from_dict(values)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 80}, "image_size 80 must be a positive multiple of 32"),
        ({"roi_size": 48}, "roi_size 48"),
        ({"sliding_window_overlap": 0.25}, "sliding window step"),
        ({"pyramid_channels": 20}, "pyramid_channels 20"),
        ({"class_names": ("caries", "caries")}, "distinct"),
        ({"class_names": ()}, "one or more"),
        ({"anchor_shapes": ((0, 16),)}, "anchor_shapes"),
        ({"nms_threshold": 0.0}, "nms_threshold"),
        ({"score_threshold": 1.0}, "score_threshold"),
        ({"max_downscale": 0.5}, "max_downscale"),
        ({"detections_per_image": 0}, "detections_per_image"),
        ({"classification_loss": "hinge"}, "classification_loss must be one of focal, bce, got 'hinge'"),
        ({"focal_gamma": -0.5}, "focal_gamma must be >= 0"),
        ({"focal_alpha": 1.5}, r"focal_alpha must be in \[0, 1\] or null"),
        ({"focal_alpha": -0.1}, "focal_alpha"),
        ({"encoder": {**TINY_ENCODER.to_dict(), "patch_size": 15, "image_size": 210}}, "patch_size 15 must be even"),
    ],
)
def test_unusable_values_are_named(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_config(**overrides)


def test_loss_settings_round_trip_and_alpha_may_be_null():
    config = tiny_config(classification_loss="bce", hard_negative_sampling=True, focal_gamma=0.0, focal_alpha=None)
    assert DetectorConfig.from_dict(config.to_dict()) == config
    assert tiny_config().classification_loss == "focal"
    assert tiny_config().hard_negative_sampling is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hard_negative_sampling": "yes"}, "detector config hard_negative_sampling"),
        ({"focal_gamma": "two"}, "detector config focal_gamma"),
        ({"classification_loss": 1}, "detector config classification_loss"),
    ],
)
def test_loss_settings_of_the_wrong_type_are_named(values, message):
    with pytest.raises(InvalidArgumentError, match=message):
        DetectorConfig.from_dict({**tiny_config().to_dict(), **values})


def test_a_config_saved_before_the_pyramid_and_box_loss_options_loads_as_it_was_trained():
    values = DetectorConfig().to_dict()
    del values["pyramid_levels"], values["box_regression_loss"]
    config = DetectorConfig.from_dict(values)
    assert (config.pyramid_levels, config.box_regression_loss, config.strides) == (3, "smooth_l1", (8, 16, 32))
