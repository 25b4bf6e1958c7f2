"""ViT-Adapter's spatial prior: its maps at the pyramid strides, how they join the pyramid, and the detector and
config options that switch it on."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from caries_mim.detection import CariesDetector, DetectorConfig, SimpleFeaturePyramid
from caries_mim.detection.spatial_prior import SpatialPriorModule
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import ViTConfig
from tests.detection.tiny import fit, tiny_config

ENCODER_16 = ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=16)


@pytest.mark.parametrize(
    ("strides", "widths"), [((4, 8, 16, 32), (8, 16, 16, 16)), ((8, 16, 32), (16, 16, 16)), ((16,), (16,))]
)
def test_maps_tile_the_image_at_each_stride_with_the_stem_width_then_twice_it(strides, widths):
    prior = SpatialPriorModule(strides, width=8)
    maps = prior(torch.rand(2, 1, 64, 96))
    assert prior.out_widths == widths
    assert [tuple(m.shape) for m in maps] == [(2, w, 64 // s, 96 // s) for s, w in zip(strides, widths, strict=True)]


@pytest.mark.parametrize("stem", ["vit_adapter", "strided"])
def test_both_stems_give_the_same_maps_and_reach(stem):
    """Either stem gives the stride-4 map the levels are built on, and a change to one pixel reaches only the cells
    whose 15 x 15 px receptive field holds it: a finding's context is the same with either."""
    torch.manual_seed(0)
    prior = SpatialPriorModule((4, 8), width=8, stem=stem).eval()
    image = torch.rand(1, 1, 64, 64)
    changed = image.clone()
    changed[..., 32, 32] += 1.0
    with torch.no_grad():
        maps, again = prior(image), prior(changed)
    assert prior.out_widths == (8, 16)
    assert [tuple(m.shape) for m in maps] == [(1, 8, 16, 16), (1, 16, 8, 8)]
    rows, cols = torch.nonzero((maps[0] - again[0]).abs().sum(dim=1)[0] > 0, as_tuple=True)
    # Output cell i covers input pixels 4i - 7 ... 4i + 7 with both stems, so pixel 32 can reach cells 7 to 9 only
    # (ReLU and max pooling may stop it reaching some of them).
    assert rows.numel() > 0
    assert set(rows.tolist()) <= {7, 8, 9}
    assert set(cols.tolist()) <= {7, 8, 9}


def test_the_strided_stem_is_the_cheaper_one():
    """Multiply-adds per 256 x 256 image of the two stems (what their convolutions compute)."""

    def multiply_adds(stem: torch.nn.Module) -> int:
        total, side = 0, 256
        for conv in (m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)):
            side //= conv.stride[0]
            total += side * side * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        return total

    resnet_style = multiply_adds(SpatialPriorModule((4,), width=32).stem)
    strided = multiply_adds(SpatialPriorModule((4,), width=32, stem="strided").stem)
    assert strided * 4 < resnet_style


def test_an_unknown_stem_is_named():
    with pytest.raises(InvalidArgumentError, match="spatial_prior_stem must be one of vit_adapter, strided, got 'x'"):
        tiny_config(encoder=ENCODER_16, spatial_prior_width=8, spatial_prior_stem="x")


@pytest.mark.parametrize("strides", [(2, 4), (4, 12), (8, 4), (8, 8)])
def test_strides_the_stem_cannot_serve_are_named(strides):
    with pytest.raises(ValueError, match="spatial prior strides must be increasing powers of two >= 4"):
        SpatialPriorModule(strides, width=8)


def test_the_stem_standardizes_its_input_as_the_encoder_does():
    """With mean m and std s, an image x gives the maps an unstandardized stem gives (x - m) / s."""
    torch.manual_seed(0)
    standardizing = SpatialPriorModule((4,), width=8, input_mean=0.5, input_std=0.25).eval()
    plain = SpatialPriorModule((4,), width=8).eval()
    plain.load_state_dict(standardizing.state_dict())
    images = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(standardizing(images)[0], plain((images - 0.5) / 0.25)[0])


def test_the_pyramid_concatenates_each_prior_before_its_output_block():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(in_channels=32, channels=16, levels=3, prior_widths=(4, 8, 8)).eval()
    assert [block[0].in_channels for block in pyramid.output] == [16 + 4, 32 + 8, 32 + 8]
    features = torch.randn(1, 32, 4, 4)
    priors = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    changed = [prior.clone() for prior in priors]
    changed[0][..., 0, 0] += 5.0
    with torch.no_grad():
        levels, again = pyramid(features, priors), pyramid(features, changed)
    assert [tuple(level.shape) for level in levels] == [(1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)]
    difference = (levels[0] - again[0]).abs().sum(dim=1)[0]
    # Only the finest level reads that prior, and only within its 3x3 conv's reach of the changed position.
    assert difference[0, 0] > 0
    assert difference[3:, :].sum() == 0
    torch.testing.assert_close(levels[1], again[1])


def test_priors_must_come_exactly_with_prior_widths():
    plain = SimpleFeaturePyramid(in_channels=32, channels=16)
    with pytest.raises(ValueError, match="priors must be given exactly when"):
        plain(torch.randn(1, 32, 4, 4), [torch.randn(1, 4, 8, 8)] * 3)
    with pytest.raises(ValueError, match="prior_widths needs one width per level"):
        SimpleFeaturePyramid(in_channels=32, channels=16, levels=3, prior_widths=(4, 8))


@pytest.mark.parametrize("levels", [3, 4])
def test_a_detector_with_the_prior_trains_finds_a_small_lesion_and_round_trips(levels):
    torch.manual_seed(0)
    config = tiny_config(
        encoder=ENCODER_16,
        pyramid_levels=levels,
        spatial_prior_width=8,
        spatial_prior_stem="strided" if levels == 4 else "vit_adapter",
        anchor_shapes=[(8.0, 8.0)],
    )
    detector = CariesDetector(config)
    prior = detector.network.feature_extractor.spatial_prior
    assert prior.strides == config.strides
    image = torch.zeros(2, 1, 64, 128)
    image[..., 20:28, 70:78] = 1.0
    box = torch.tensor([[70.0, 20.0, 78.0, 28.0]])
    targets = [{"boxes": box, "labels": torch.tensor([0])}] * 2
    detector.losses(image, targets)["total"].backward()
    assert prior.stem[0][0].weight.grad.abs().sum() > 0
    found = fit(detector, image, targets, steps=40, lr=2e-3)
    assert box_iou(found["boxes"][:1], box).item() > 0.5
    restored = CariesDetector(DetectorConfig.from_dict(config.to_dict()))
    restored.load_state_dict(detector.state_dict())
    torch.testing.assert_close(restored.eval().predict(image[:1])[0]["scores"], found["scores"])


def test_the_plain_pyramid_has_no_prior_and_old_configs_load_without_one():
    assert CariesDetector(tiny_config()).network.feature_extractor.spatial_prior is None
    values = tiny_config().to_dict()
    for key in ("spatial_prior_width", "spatial_prior_stem", "head_convs"):
        del values[key]
    old = DetectorConfig.from_dict(values)
    assert (old.spatial_prior_width, old.spatial_prior_stem, old.head_convs) == (None, "vit_adapter", 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "resnet18"}, r"spatial_prior_width is for the vit backbone \(resnet18 is convolutional\)"),
        ({"spatial_prior_width": 4}, r"spatial_prior_width must be in \[8, 1024\] or null, got 4"),
        (
            {"encoder": ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8), "pyramid_levels": 4},
            "patch_size 8 with 4 levels has a finest stride of 2",
        ),
    ],
)
def test_configs_the_prior_cannot_serve_are_named(overrides, message):
    values = {"encoder": ENCODER_16, "spatial_prior_width": 8, **overrides}
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_config(**values)
