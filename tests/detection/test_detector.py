"""CariesDetector: losses and their gradients, axis order end to end, prediction, the sliding-window path."""

from __future__ import annotations

import pytest
import torch
from monai.apps.detection.utils.predict_utils import predict_with_inferer
from monai.data.box_utils import box_iou

from caries_mim.detection import CariesDetector, DetectorConfig
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import VisionTransformer, ViTConfig
from tests.detection.tiny import fit, tiny_config


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0], [40.0, 5.0, 60.0, 40.0]]), "labels": torch.tensor([0, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def _record_network_inputs(detector):
    shapes = []
    detector.network.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_losses_are_finite_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config())
    losses = detector.losses(torch.rand(2, 1, 64, 96), _targets())
    assert set(losses) == {"classification", "box_regression", "total"}
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())
    assert losses["box_regression"] > 0  # the first image's boxes have positive anchors
    torch.testing.assert_close(losses["total"], losses["classification"] + losses["box_regression"])
    losses["total"].backward()
    for parameter in (detector.encoder.patch_embed.proj.weight, detector.encoder.blocks[0].attn.qkv.weight):
        assert parameter.grad is not None
        assert torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_forward_is_the_training_loss_for_distributed_data_parallel():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config())
    images = torch.rand(2, 1, 64, 64)
    # The hard negative sampler draws at random: same seed, same sample.
    torch.manual_seed(1)
    through_forward = detector(images, _targets())["total"]
    torch.manual_seed(1)
    torch.testing.assert_close(through_forward, detector.losses(images, _targets())["total"])


def test_images_without_boxes_give_only_a_classification_loss():
    detector = CariesDetector(tiny_config())
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = detector.losses(torch.rand(2, 1, 64, 64), [empty, empty])
    assert losses["classification"] > 0
    assert losses["box_regression"] == 0


def test_a_few_steps_on_one_box_find_it_in_column_row_order():
    """A box whose x range (90-110) lies beyond the image height (64): with the axes mixed up anywhere between
    targets, MONAI and predictions, no prediction could overlap it."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(detections_per_image=5))
    image = torch.zeros(1, 1, 64, 128)
    image[..., 10:30, 90:110] = 1.0
    box = torch.tensor([[90.0, 10.0, 110.0, 30.0]])
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        detector.losses(image, [{"boxes": box, "labels": torch.tensor([0])}])["total"].backward()
        optimizer.step()
    detector.eval()
    (found,) = detector.predict(image)
    assert box_iou(found["boxes"][:1], box).item() > 0.5


def test_losses_in_eval_mode_keep_the_module_modes():
    detector = CariesDetector(tiny_config()).eval()
    losses = detector.losses(torch.rand(2, 1, 64, 64), _targets())
    assert torch.isfinite(losses["total"])
    assert not any(module.training for module in detector.modules())


def test_predict_returns_boxes_inside_the_input_in_column_row_order():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).eval()
    inputs = _record_network_inputs(detector)
    results = detector.predict(torch.rand(2, 1, 40, 64))  # not a multiple of 32: MONAI pads to 64 x 64
    assert inputs == [(2, 1, 64, 64)]
    assert len(results) == 2
    for found in results:
        assert set(found) == {"boxes", "scores", "labels"}
        assert found["boxes"].shape == (20, 4)
        assert found["scores"].shape == found["labels"].shape == (20,)
        assert found["labels"].dtype == torch.int64
        assert (found["scores"][:-1] >= found["scores"][1:]).all()
        boxes = found["boxes"]
        assert (boxes >= 0).all()
        assert (boxes[:, 2] > boxes[:, 0]).all()
        assert (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, [0, 2]] <= 64).all()
        assert (boxes[:, [1, 3]] <= 40).all()
    assert not any(module.training for module in detector.modules())


def test_inputs_larger_than_the_window_go_through_the_sliding_window():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).eval()
    inputs = _record_network_inputs(detector)
    (found,) = detector.predict(torch.rand(1, 1, 50, 150))
    # 150 px wide, 64 px windows every 32 px: windows at 0, 32, 64, 96 (padded to 160); 50 px high: one row,
    # padded to the window. The network never sees more than a window.
    assert {shape[-2:] for shape in inputs} == {(64, 64)}
    assert sum(shape[0] for shape in inputs) == 4
    assert set(found) == {"boxes", "scores", "labels"}
    assert found["boxes"].shape == (20, 4)
    boxes = found["boxes"]
    assert (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= 150).all()
    assert (boxes[:, [1, 3]] <= 50).all()
    assert boxes[:, 2].max() > 64  # boxes span the whole width, not one window


def test_encoder_must_match_the_config():
    config = tiny_config()
    other = VisionTransformer(ViTConfig.from_dict({**config.encoder.to_dict(), "embed_dim": 64, "num_heads": 4}))
    with pytest.raises(InvalidArgumentError, match="encoder's config"):
        CariesDetector(config, other)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([0])}, "without area"),
        ({"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": torch.tensor([1])}, "outside"),
        ({"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": torch.tensor([0, 0])}, "1 boxes but 2 labels"),
        ({"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]])}, "needs tensors"),
    ],
)
def test_unusable_targets_are_named(target, message):
    detector = CariesDetector(tiny_config())
    with pytest.raises(InvalidArgumentError, match=message):
        detector.losses(torch.rand(1, 1, 64, 64), [target])


def test_sliding_window_maps_line_up_with_whole_window_maps():
    """Without overlap, the stitched head maps of a two-window image are the two windows' maps side by side, at
    every level: the windows sit on multiples of the coarsest stride."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(sliding_window_overlap=0.0)).eval()
    images = torch.rand(1, 1, 64, 128)
    network, keys = detector.network, [detector.network.cls_key, detector.network.box_reg_key]
    with torch.no_grad():
        stitched = predict_with_inferer(images, network, keys, detector.retinanet.inferer)
        left, right = network(images[..., :64]), network(images[..., 64:])
    for key in keys:
        for level, whole in enumerate(stitched[key]):
            expected = torch.cat([left[key][level], right[key][level]], dim=-1)
            torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    trained = CariesDetector(config).eval()
    torch.save(trained.state_dict(), tmp_path / "detector.pt")
    assert all(key.startswith("retinanet.network.") for key in trained.state_dict())
    restored = CariesDetector(config).eval()
    restored.load_state_dict(torch.load(tmp_path / "detector.pt", weights_only=True))
    images = torch.rand(1, 1, 64, 96)
    expected, actual = trained.predict(images)[0], restored.predict(images)[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(actual[key], expected[key])


def test_overlapping_windows_keep_their_own_maps_where_only_one_covers():
    """Windows every 32 px (overlap 0.5): the first 32 and last 32 columns are seen by one window each."""
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).eval()
    images = torch.rand(1, 1, 64, 128)
    network, key = detector.network, detector.network.box_reg_key
    with torch.no_grad():
        stitched = predict_with_inferer(images, network, [key], detector.retinanet.inferer)[key]
        first, last = network(images[..., :64])[key], network(images[..., 64:])[key]
    for stride, whole, left, right in zip((8, 16, 32), stitched, first, last, strict=True):
        edge = 32 // stride
        torch.testing.assert_close(whole[..., :edge], left[..., :edge], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(whole[..., -edge:], right[..., -edge:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("side", "level"), [(15, 0), (20, 0), (30, 1), (60, 2), (80, 2)])
def test_default_anchors_give_every_lesion_size_positives_at_its_level(side, level):
    """Caries boxes are ~15-80 px on a 512 px input: each size gets ATSS positives, on the level whose anchors
    (16, 32, 64 px) fit it."""
    detector = CariesDetector(tiny_config(image_size=512, anchor_shapes=DetectorConfig().anchor_shapes))
    retinanet = detector.retinanet
    grids = [(64, 64), (32, 32), (16, 16)]
    anchors = retinanet.anchor_generator(torch.zeros(1, 1, 512, 512), [torch.zeros(1, 1, *grid) for grid in grids])
    # Matching happens in MONAI's axis order: rows first.
    box = torch.tensor([[100.0, 200.0, 100.0 + 0.8 * side, 200.0 + side]])
    target = {"boxes": box, "labels": torch.tensor([0])}
    (matched,) = retinanet.compute_anchor_matched_idxs(anchors, [target], [h * w for h, w in grids])
    anchor_levels = torch.cat([torch.full((h * w * 3,), index) for index, (h, w) in enumerate(grids)])
    positives = anchor_levels[matched == 0]
    assert len(positives) >= 2
    assert set(positives.tolist()) <= {level, level + 1}
    assert positives.tolist().count(level) > len(positives) / 2


def _fit_one_box(detector, image, box, steps, lr):
    """Train ``detector`` on ``image`` (B, 1, H, W) with ``box`` (1, 4) as every image's only lesion, then return
    the eval-mode prediction for the first image."""
    return fit(detector, image, [{"boxes": box, "labels": torch.tensor([0])}] * image.shape[0], steps, lr)


def test_the_cnn_yardstick_trains_and_predicts_through_the_same_detector(tmp_path):
    """backbone resnet10: same heads, anchors and losses; a few steps find a box in column-row order; its state
    dict round-trips; it takes no ViT encoder."""
    torch.manual_seed(0)
    config = tiny_config(encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=16), backbone="resnet10")
    detector = CariesDetector(config)
    assert config.strides == (8, 16, 32)
    image = torch.zeros(2, 1, 64, 128)
    image[..., 10:30, 90:110] = 1.0
    box = torch.tensor([[90.0, 10.0, 110.0, 30.0]])
    found = _fit_one_box(detector, image, box, steps=30, lr=1e-3)
    assert box_iou(found["boxes"][:1], box).item() > 0.5
    again = CariesDetector(config)
    again.load_state_dict(detector.state_dict())
    torch.testing.assert_close(again.eval().predict(image[:1])[0]["scores"], found["scores"])
    with pytest.raises(InvalidArgumentError, match="no ViT encoder"):
        _ = detector.encoder
    with pytest.raises(InvalidArgumentError, match="takes no ViT encoder"):
        CariesDetector(config, VisionTransformer(config.encoder))


def test_a_cnn_backbone_needs_strides_8_16_32():
    with pytest.raises(InvalidArgumentError, match="patch_size 16"):
        tiny_config(encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8), backbone="resnet18")
    with pytest.raises(InvalidArgumentError, match="backbone must be one of"):
        tiny_config(backbone="vgg")


def test_the_giou_box_loss_decodes_predictions_stays_in_its_range_and_trains():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(box_regression_loss="giou"))
    assert (detector.retinanet.encode_gt, detector.retinanet.decode_pred) == (False, True)
    images = torch.rand(2, 1, 64, 96)
    optimizer = torch.optim.Adam(detector.parameters(), lr=1e-3)
    box_losses = []
    for _ in range(15):
        losses = detector.losses(images, _targets())
        box_losses.append(losses["box_regression"].item())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    # 1 - GIoU lies in [0, 2]; the anchors overlap their lesions, so it starts under 1.
    assert all(0.0 < value < 2.0 for value in box_losses)
    assert box_losses[0] < 1.0
    assert box_losses[-1] < 0.8 * box_losses[0]


def test_an_unknown_box_regression_loss_is_named():
    with pytest.raises(InvalidArgumentError, match="box_regression_loss must be one of smooth_l1, giou, got 'l2'"):
        tiny_config(box_regression_loss="l2")


@pytest.mark.parametrize("backbone", ["vit", "resnet10"])
def test_a_four_level_pyramid_adds_a_stride_p_over_4_level_and_finds_a_small_lesion(backbone):
    torch.manual_seed(0)
    encoder = ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=16)
    config = tiny_config(encoder=encoder, backbone=backbone, pyramid_levels=4, anchor_shapes=[(6.0, 6.0)])
    assert config.strides == (4, 8, 16, 32)
    assert config.anchor_scales == (1, 2, 4, 8)
    detector = CariesDetector(config)
    image = torch.zeros(2, 1, 64, 128)
    image[..., 20:27, 70:77] = 1.0
    maps = detector.network(image)[detector.retinanet.cls_key]
    assert [tuple(level.shape[-2:]) for level in maps] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    box = torch.tensor([[70.0, 20.0, 77.0, 27.0]])
    found = _fit_one_box(detector, image, box, steps=40, lr=2e-3)
    assert box_iou(found["boxes"][:1], box).item() > 0.5


def test_four_pyramid_levels_need_a_patch_size_divisible_by_4():
    with pytest.raises(InvalidArgumentError, match="pyramid_levels 4 needs a patch_size divisible by 4"):
        tiny_config(encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=2), pyramid_levels=4)
    with pytest.raises(InvalidArgumentError, match="pyramid_levels must be 3 or 4, got 5"):
        tiny_config(pyramid_levels=5)
