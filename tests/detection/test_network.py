"""ViTRetinaNet: the output structure and attributes MONAI's RetinaNetDetector expects."""

from __future__ import annotations

import pytest
import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

from caries_mim.detection import CariesDetector, ViTRetinaNet
from caries_mim.detection.heads import keep_head_convs
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import VisionTransformer, ViTConfig
from tests.detection.tiny import TINY_ENCODER, tiny_config


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


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_head_convs_keeps_that_many_blocks_in_both_heads_of_both_networks(blocks):
    """MONAI builds four (conv, GroupNorm, ReLU) blocks per head; ``head_convs`` keeps the first ones, and the
    detector still trains and predicts with the shorter towers."""
    for backbone, encoder in (("vit", TINY_ENCODER), ("resnet10", ViTConfig(embed_dim=32, depth=1, num_heads=2))):
        detector = CariesDetector(tiny_config(backbone=backbone, encoder=encoder, head_convs=blocks))
        network = detector.network
        for head in (network.classification_head, network.regression_head):
            kinds = [type(layer) for layer in head.conv]
            assert kinds == [torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.ReLU] * blocks
        image = torch.rand(1, 1, 64, 64)
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0])}]
        detector.losses(image, targets)["total"].backward()
        assert network.classification_head.conv[0].weight.grad.abs().sum() > 0


def test_keeping_more_head_blocks_than_monai_builds_is_refused():
    with pytest.raises(ValueError, match="cannot keep 5 of the head's 4 convolution blocks"):
        keep_head_convs(_network(), 5)


@pytest.mark.parametrize("blocks", [0, 5])
def test_a_head_length_outside_one_to_four_is_named(blocks):
    with pytest.raises(InvalidArgumentError, match=rf"head_convs must be in \[1, 4\], got {blocks}"):
        tiny_config(head_convs=blocks)
