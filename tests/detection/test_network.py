"""ViTRetinaNet: the output structure and attributes MONAI's RetinaNetDetector expects."""

from __future__ import annotations

import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

from caries_mim.detection import ViTRetinaNet
from caries_mim.models import VisionTransformer
from tests.detection.tiny import TINY_ENCODER


def _network(num_classes: int = 2, num_anchors: int = 3) -> ViTRetinaNet:
    return ViTRetinaNet(VisionTransformer(TINY_ENCODER), num_classes, num_anchors, channels=16)


def test_attributes_read_by_retinanet_detector():
    network = _network()
    assert network.spatial_dims == 2
    assert network.num_classes == 2
    assert network.num_anchors == 3
    assert tuple(network.size_divisible) == (32, 32)
    assert (network.cls_key, network.box_reg_key) == ("classification", "box_regression")


def test_rectangular_input_gives_per_level_classification_and_box_maps():
    network = _network(num_classes=2, num_anchors=3)
    out = network(torch.rand(2, 1, 64, 96))
    assert set(out) == {"classification", "box_regression"}
    sizes = [(8, 12), (4, 6), (2, 3)]  # strides 8, 16, 32
    assert [tuple(m.shape) for m in out["classification"]] == [(2, 3 * 2, h, w) for h, w in sizes]
    assert [tuple(m.shape) for m in out["box_regression"]] == [(2, 3 * 4, h, w) for h, w in sizes]


def test_levels_fit_monai_anchor_generation():
    """One anchor per location and shape for every position of every level, strides inferred from the maps."""
    network = _network(num_classes=1, num_anchors=2)
    images = torch.rand(1, 1, 64, 128)
    maps = network(images)["classification"]
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=(1, 2, 4), base_anchor_shapes=((8, 8), (6, 10)))
    (per_image,) = anchors(images, maps)
    assert per_image.shape == (2 * sum(m.shape[-2] * m.shape[-1] for m in maps), 4)
    # The finest level's first anchor sits at the centre of the first 8 px cell.
    torch.testing.assert_close(per_image[0], torch.tensor([0.0, 0.0, 8.0, 8.0]))


def test_gradients_reach_the_encoder():
    network = _network()
    out = network(torch.rand(1, 1, 64, 64))
    sum(m.sum() for m in out["classification"] + out["box_regression"]).backward()
    gradient = network.encoder.patch_embed.proj.weight.grad
    assert gradient is not None
    assert gradient.abs().sum() > 0
