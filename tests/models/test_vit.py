"""ViT encoder: shapes, intermediate outputs, attention paths, input validation, named sizes, config."""

from __future__ import annotations

import pytest
import torch

from caries_mim.errors import InvalidArgumentError
from caries_mim.models import VIT_SIZES, VisionTransformer, ViTConfig, build_encoder
from caries_mim.models.vit import Block

SMALL = ViTConfig(image_size=(64, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def encoder() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(SMALL).eval()


def vit_parameter_count(embed_dim: int, depth: int, patch_size: int = 16, in_channels: int = 1) -> int:
    """Closed form for this architecture: patch conv, CLS, depth x (2 LN, qkv, proj, fc1, fc2), final LN.

    The position embedding is a fixed buffer, not a parameter (MAE freezes it too).
    """
    d = embed_dim
    patch = d * in_channels * patch_size**2 + d
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return patch + d + depth * block + 2 * d


@pytest.mark.parametrize(("height", "width"), [(64, 64), (32, 96), (96, 48), (128, 128)])
def test_output_shapes_for_square_and_rectangular_inputs(encoder, height, width):
    images = torch.rand(2, 1, height, width)
    with torch.no_grad():
        output = encoder(images)
    rows, columns = height // 16, width // 16
    assert output.grid == (rows, columns)
    assert output.tokens.shape == (2, 1 + rows * columns, 64)
    assert output.patch_tokens.shape == (2, rows * columns, 64)
    assert output.feature_map().shape == (2, 64, rows, columns)
    assert output.hidden == {}
    assert output.attention == {}


def test_feature_map_is_patch_tokens_in_row_major_order(encoder):
    with torch.no_grad():
        output = encoder(torch.rand(1, 1, 32, 48))
    feature_map = output.feature_map()
    # Patch (row 1, column 2) of a 2x3 grid is token 1 + 1 * 3 + 2.
    assert torch.equal(feature_map[0, :, 1, 2], output.tokens[0, 1 + 5])


@pytest.mark.parametrize(("requested", "expected"), [((0,), {0}), ((-1,), {1}), ((0, -1), {0, 1}), ((-2, 1), {0, 1})])
def test_hidden_blocks_accept_negative_indices(encoder, requested, expected):
    with torch.no_grad():
        output = encoder(torch.rand(2, 1, 64, 64), hidden_blocks=requested)
    assert set(output.hidden) == expected
    for hidden in output.hidden.values():
        assert hidden.shape == (2, 17, 64)


def test_last_hidden_block_is_tokens_before_final_norm(encoder):
    with torch.no_grad():
        output = encoder(torch.rand(2, 1, 64, 64), hidden_blocks=(-1,))
        assert torch.allclose(encoder.norm(output.hidden[1]), output.tokens, atol=1e-6)
    assert output.feature_map(block=1).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("index", [2, -3])
def test_out_of_range_block_index_is_rejected(encoder, index):
    with pytest.raises(InvalidArgumentError, match=f"block index {index} out of range for an encoder of depth 2"):
        encoder(torch.rand(1, 1, 64, 64), hidden_blocks=(index,))


def test_attention_blocks_return_probabilities(encoder):
    with torch.no_grad():
        output = encoder(torch.rand(3, 1, 48, 64), attention_blocks=(0, -1))
    assert set(output.attention) == {0, 1}
    for attention in output.attention.values():
        assert attention.shape == (3, 4, 1 + 12, 1 + 12)
        assert attention.min() >= 0
        assert torch.allclose(attention.sum(dim=-1), torch.ones(3, 4, 13), atol=1e-5)


def test_explicit_attention_path_matches_sdpa_path(encoder):
    """Asking for attention maps switches to softmax(QK^T/sqrt(d))V; the tokens must not change."""
    images = torch.rand(2, 1, 64, 80)
    with torch.no_grad():
        fused = encoder(images, hidden_blocks=(0,))
        explicit = encoder(images, hidden_blocks=(0,), attention_blocks=(0, 1))
    assert torch.allclose(fused.hidden[0], explicit.hidden[0], atol=1e-5)
    assert torch.allclose(fused.tokens, explicit.tokens, atol=1e-5)


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_block_forward_selected_equals_full_forward_gathered(drop_path):
    """Computing a block for some tokens only (MAE's last decoder block) changes nothing for those tokens."""
    torch.manual_seed(0)
    block = Block(32, 4, 4.0, True, drop_path, 1e-6).double().eval()
    tokens = torch.randn(3, 11, 32, dtype=torch.float64)
    selected = torch.stack([torch.randperm(11)[:5] for _ in range(3)])  # (B, R) distinct per row
    index = selected.unsqueeze(-1).expand(-1, -1, 32)
    full = block(tokens)[0].gather(1, index)
    assert torch.allclose(block.forward_selected(tokens, index), full, atol=1e-12)


def test_feature_map_refuses_masked_token_sequences(encoder):
    tokens, grid = encoder.embed_patches(torch.rand(2, 1, 64, 64))
    visible = (tokens + encoder.position_embedding(grid))[:, :5]
    with torch.no_grad():
        output = encoder.encode(visible, grid)
    assert output.tokens.shape == (2, 6, 64)
    with pytest.raises(ValueError, match="4x4"):
        output.feature_map()


@pytest.mark.parametrize(
    "shape",
    [
        (1, 64, 64),  # no batch axis
        (2, 3, 64, 64),  # RGB into a 1-channel encoder
        (2, 1, 64, 60),  # width not a multiple of the patch
        (2, 1, 50, 64),  # height not a multiple of the patch
        (2, 1, 8, 64),  # smaller than one patch
    ],
)
def test_bad_input_shapes_raise_invalid_argument(encoder, shape):
    with pytest.raises(InvalidArgumentError):
        encoder(torch.rand(*shape))


def test_grid_for_rejects_non_multiples(encoder):
    assert encoder.grid_for(32, 80) == (2, 5)
    with pytest.raises(InvalidArgumentError, match="patch size 16"):
        encoder.grid_for(33, 80)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small"])
def test_named_sizes_have_documented_widths(name):
    embed_dim, depth, num_heads = VIT_SIZES[name]
    encoder = build_encoder(name, image_size=64)
    assert encoder.config.embed_dim == embed_dim
    assert encoder.config.num_heads == num_heads
    assert len(encoder.blocks) == depth
    assert encoder.cls_token.shape == (1, 1, embed_dim)
    assert encoder.patch_embed.proj.weight.shape == (embed_dim, 1, 16, 16)
    assert sum(p.numel() for p in encoder.parameters()) == vit_parameter_count(embed_dim, depth)


def test_documented_size_table():
    assert VIT_SIZES["vit_tiny"] == (192, 12, 3)
    assert VIT_SIZES["vit_small"] == (384, 12, 6)
    assert VIT_SIZES["vit_base"] == (768, 12, 12)
    assert VIT_SIZES["vit_large"] == (1024, 24, 16)


def test_vit_base_parameter_count(monkeypatch):
    """ViT-B/16 with one input channel: 85.25M trainable parameters (timm's 86.6M minus the 1000-class head, the
    learned position embedding and two of three input channels)."""
    # Initialization cannot change the count; skipping it (85M random draws, twice) keeps this test fast.
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.init, "xavier_uniform_", lambda tensor, *args, **kwargs: tensor)
    encoder = build_encoder("vit_base")
    count = sum(p.numel() for p in encoder.parameters())
    assert count == vit_parameter_count(768, 12) == 85_254_144
    assert encoder.pos_embed.shape == (1, 1 + 14 * 14, 768)
    assert "pos_embed" not in dict(encoder.named_parameters()), "the sin-cos embedding must stay fixed"


def test_drop_path_is_active_in_train_mode_only():
    torch.manual_seed(0)
    encoder = build_encoder(SMALL, drop_path_rate=0.5)
    images = torch.rand(8, 1, 64, 64)
    with torch.no_grad():
        encoder.train()
        first, second = encoder(images).tokens, encoder(images).tokens
        encoder.eval()
        third, fourth = encoder(images).tokens, encoder(images).tokens
    assert not torch.allclose(first, second)
    assert torch.equal(third, fourth)


def test_drop_path_rate_rises_linearly_from_zero():
    encoder = build_encoder(ViTConfig(image_size=32, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.2))
    assert isinstance(encoder.blocks[0].drop_path, torch.nn.Identity)
    assert encoder.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    assert encoder.blocks[2].drop_path.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": (64, 60)}, "multiple of patch_size"),
        ({"image_size": 8}, "multiple of patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"depth": 0}, "depth"),
        ({"in_channels": 0}, "in_channels"),
        ({"embed_dim": 66, "num_heads": 4}, "multiple of num_heads"),
        ({"embed_dim": 6, "num_heads": 3}, "multiple of 4"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
        ({"image_size": (64, 64, 64)}, "image_size"),
        ({"image_size": "64"}, "image_size"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ViTConfig.from_dict({**SMALL.to_dict(), **overrides})


def test_zero_heads_is_a_config_error():
    with pytest.raises(InvalidArgumentError, match="num_heads"):
        ViTConfig(embed_dim=64, num_heads=0)


def test_config_collects_every_problem_in_one_message():
    with pytest.raises(InvalidArgumentError) as caught:
        ViTConfig(image_size=(64, 60), depth=0, mlp_ratio=-1.0)
    assert "multiple of patch_size" in caught.value.message
    assert "depth" in caught.value.message
    assert "mlp_ratio" in caught.value.message


def test_config_dict_round_trip():
    config = ViTConfig(image_size=(128, 96), patch_size=8, embed_dim=96, depth=3, num_heads=6, drop_path_rate=0.1)
    values = config.to_dict()
    assert values["image_size"] == [128, 96]
    assert ViTConfig.from_dict(values) == config
    assert config.grid_size == (16, 12)
    assert config.head_dim == 16


def test_int_image_size_means_square():
    assert ViTConfig(image_size=64, embed_dim=64, num_heads=4).image_size == (64, 64)


def test_unknown_config_key_is_named():
    with pytest.raises(InvalidArgumentError, match="embed_dims"):
        ViTConfig.from_dict({**SMALL.to_dict(), "embed_dims": 64})


def test_named_size_with_overrides_and_unknown_name():
    config = ViTConfig.named("vit_small", patch_size=8, image_size=64)
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (384, 12, 6, 8)
    with pytest.raises(InvalidArgumentError, match="vit_tiny"):
        ViTConfig.named("vit_huge")


def test_build_encoder_from_config_with_overrides():
    encoder = build_encoder(SMALL, depth=3)
    assert len(encoder.blocks) == 3
    assert encoder.config == ViTConfig.from_dict({**SMALL.to_dict(), "depth": 3})


@pytest.mark.parametrize(("key", "value"), [("drop_path_rate", "0.1"), ("patch_size", "16"), ("qkv_bias", 1)])
def test_a_wrongly_typed_config_value_names_the_key(key, value):
    with pytest.raises(InvalidArgumentError, match=f"ViT config {key}: expected"):
        ViTConfig.from_dict({**SMALL.to_dict(), key: value})
