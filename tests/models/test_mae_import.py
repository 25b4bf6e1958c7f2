"""Importing official MAE (facebookresearch/mae) checkpoints: key mapping, RGB folding, grid resampling, errors.

The checkpoints are built here with the exact official key layout at a small width, so the suite needs no download.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caries_mim.errors import InvalidCheckpointError
from caries_mim.models import (
    VisionTransformer,
    ViTConfig,
    import_mae_weights,
    resample_position_embedding,
    sincos_position_embedding,
)
from caries_mim.models.mae_import import IMAGENET_MEAN, IMAGENET_STD

DIM = 64
HEADS = 4


def _block_keys(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm1.weight": (dim,),
        f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim),
        f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (4 * dim, dim),
        f"{prefix}.mlp.fc1.bias": (4 * dim,),
        f"{prefix}.mlp.fc2.weight": (dim, 4 * dim),
        f"{prefix}.mlp.fc2.bias": (dim,),
    }


def mae_state_dict(
    dim: int = DIM, depth: int = 2, grid: int = 14, decoder_dim: int = 32, finetuned: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A state dict in MAE's pretraining layout (``models_mae.py``), or its fine-tuning layout (``models_vit.py``
    with global pooling: ``fc_norm`` and ``head`` instead of ``norm`` and the decoder)."""
    generator = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    shapes.update({"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)})
    for index in range(depth):
        shapes.update(_block_keys(f"blocks.{index}", dim))
    if finetuned:
        shapes.update(
            {"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (1000, dim), "head.bias": (1000,)}
        )
    else:
        shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
        shapes.update({"decoder_embed.weight": (decoder_dim, dim), "decoder_embed.bias": (decoder_dim,)})
        shapes.update(_block_keys("decoder_blocks.0", decoder_dim))
        shapes.update({"decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,)})
        shapes.update({"decoder_pred.weight": (16 * 16 * 3, decoder_dim), "decoder_pred.bias": (16 * 16 * 3,)})
    # nn.Module.state_dict order: the model's own parameters first (cls_token, pos_embed, mask_token,
    # decoder_pos_embed), then submodules in definition order.
    state = {"cls_token": 0.02 * torch.randn(1, 1, dim, generator=generator)}
    state["pos_embed"] = torch.cat([torch.zeros(1, dim), sincos_position_embedding(dim, (grid, grid))]).unsqueeze(0)
    if not finetuned:
        state["mask_token"] = 0.02 * torch.randn(1, 1, decoder_dim, generator=generator)
        decoder_positions = sincos_position_embedding(decoder_dim, (grid, grid))
        state["decoder_pos_embed"] = torch.cat([torch.zeros(1, decoder_dim), decoder_positions]).unsqueeze(0)
    state.update({key: 0.02 * torch.randn(shape, generator=generator) for key, shape in shapes.items()})
    return state


def make_encoder(image_size: int = 224, depth: int = 2, in_channels: int = 1) -> VisionTransformer:
    config = ViTConfig(image_size=image_size, embed_dim=DIM, depth=depth, num_heads=HEADS, in_channels=in_channels)
    return VisionTransformer(config).eval()


def all_report_keys(report) -> list[str]:
    return [*report.mapped, *report.adapted, *report.dropped, *report.unexpected]


def taken_unchanged(report, key: str) -> bool:
    """Copied as is: listed in ``mapped`` and not in ``adapted``."""
    return key in report.mapped and key not in report.adapted


@pytest.fixture
def checkpoint_file(tmp_path):
    state = mae_state_dict()
    path = tmp_path / "mae_pretrain_vit_small.pth"
    torch.save({"model": state, "epoch": 799}, path)
    return path, state


@pytest.mark.parametrize("from_file", [True, False])
def test_every_source_key_lands_in_exactly_one_bucket(checkpoint_file, from_file):
    path, state = checkpoint_file
    source = path if from_file else {"model": state}
    report = import_mae_weights(make_encoder(), source)
    keys = all_report_keys(report)
    assert sorted(keys) == sorted(state), "every source key must be reported exactly once"
    assert report.unexpected == []
    assert report.missing == []
    assert report.summary().startswith(f"{len(report.mapped)} mapped")
    assert set(report.to_dict()) == {"mapped", "adapted", "dropped", "unexpected", "missing"}


def test_string_path_is_accepted(checkpoint_file):
    path, _ = checkpoint_file
    assert import_mae_weights(make_encoder(), str(path)).missing == []


def test_decoder_keys_are_dropped_with_a_reason(checkpoint_file):
    _, state = checkpoint_file
    report = import_mae_weights(make_encoder(), {"model": state})
    decoder_keys = {key for key in state if key.startswith("decoder_") or key == "mask_token"}
    assert set(report.dropped) == decoder_keys
    assert all("decoder" in reason for reason in report.dropped.values())


def test_block_and_norm_weights_are_copied_unchanged(checkpoint_file):
    _, state = checkpoint_file
    encoder = make_encoder()
    report = import_mae_weights(encoder, {"model": state})
    loaded = encoder.state_dict()
    for key in [k for k in state if k.startswith(("blocks.", "norm.")) or k == "cls_token"]:
        assert key in report.mapped
        assert torch.equal(loaded[key], state[key]), key
    assert taken_unchanged(report, "pos_embed")
    assert torch.equal(loaded["pos_embed"], state["pos_embed"])


def test_imported_encoder_runs(checkpoint_file):
    _, state = checkpoint_file
    encoder = make_encoder()
    import_mae_weights(encoder, {"model": state})
    with torch.no_grad():
        output = encoder(torch.rand(2, 1, 224, 224))
    assert output.tokens.shape == (2, 197, DIM)
    assert torch.isfinite(output.tokens).all()


def test_position_embedding_is_resampled_to_the_encoder_grid(checkpoint_file):
    _, state = checkpoint_file
    encoder = make_encoder(image_size=256)
    report = import_mae_weights(encoder, {"model": state})
    assert "resampled from a 14x14 grid to 16x16" in report.adapted["pos_embed"]
    pos_embed = encoder.state_dict()["pos_embed"]
    assert pos_embed.shape == (1, 1 + 16 * 16, DIM)
    assert torch.equal(pos_embed[:, :1], state["pos_embed"][:, :1])
    expected = resample_position_embedding(state["pos_embed"][:, 1:], (14, 14), (16, 16))
    assert torch.equal(pos_embed[:, 1:], expected)
    with torch.no_grad():
        assert encoder(torch.rand(1, 1, 256, 256)).tokens.shape == (1, 1 + 256, DIM)


def test_folded_gray_projection_equals_rgb_conv_on_imagenet_normalized_gray(checkpoint_file):
    """The exactness property: encoder(g) patch tokens == MAE's conv on ((g, g, g) - mean) / std."""
    _, state = checkpoint_file
    encoder = make_encoder()
    report = import_mae_weights(encoder, {"model": state}, fold_imagenet_normalization=True)
    assert "patch_embed.proj.bias" in report.adapted
    assert "patch_embed.proj.bias" not in report.mapped
    assert report.adapted["patch_embed.proj.weight"].startswith("RGB")

    gray = torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (gray.expand(-1, 3, -1, -1) - mean) / std
    expected = F.conv2d(
        rgb.double(), state["patch_embed.proj.weight"].double(), state["patch_embed.proj.bias"].double(), stride=16
    )
    with torch.no_grad():
        ours = encoder.patch_embed(gray)  # standardizes with the encoder's input_mean / input_std first
    expected = expected.flatten(2).transpose(1, 2)
    assert ours.shape == expected.shape == (2, 4 * 3, DIM)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-4)


def test_unfolded_gray_projection_is_channel_sum(checkpoint_file):
    _, state = checkpoint_file
    encoder = make_encoder()
    report = import_mae_weights(encoder, {"model": state}, fold_imagenet_normalization=False)
    gray = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(2))
    summed = state["patch_embed.proj.weight"].double().sum(dim=1, keepdim=True)
    expected = F.conv2d(gray.double(), summed, state["patch_embed.proj.bias"].double(), stride=16)
    with torch.no_grad():
        ours = encoder.patch_embed(gray)
    assert torch.allclose(ours.double(), expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert report.adapted["patch_embed.proj.weight"].startswith("RGB summed to 1 channel,")
    assert report.adapted["patch_embed.proj.bias"] == "plus the standardization offset"


def test_rgb_encoder_takes_rgb_projection_unchanged(checkpoint_file):
    _, state = checkpoint_file
    encoder = make_encoder(in_channels=3)
    report = import_mae_weights(encoder, {"model": state})
    assert taken_unchanged(report, "patch_embed.proj.weight")
    assert taken_unchanged(report, "patch_embed.proj.bias")
    assert torch.equal(encoder.state_dict()["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    assert torch.equal(encoder.state_dict()["patch_embed.proj.bias"], state["patch_embed.proj.bias"])


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_ddp_module_prefix_is_stripped(wrapper):
    state = mae_state_dict()
    prefixed = {f"module.{key}": value for key, value in state.items()}
    source = prefixed if wrapper is None else {wrapper: prefixed}
    encoder = make_encoder()
    report = import_mae_weights(encoder, source)
    assert sorted(all_report_keys(report)) == sorted(state)
    assert torch.equal(encoder.state_dict()["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_wrong_width_names_the_key():
    encoder = make_encoder()
    with pytest.raises(InvalidCheckpointError, match=r"^cls_token: checkpoint shape \(1, 1, 32\)") as caught:
        import_mae_weights(encoder, {"model": mae_state_dict(dim=32)})
    assert "another ViT size" in caught.value.message


def test_single_misshaped_key_is_named_and_nothing_is_loaded():
    state = mae_state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(128, DIM)
    encoder = make_encoder()
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    with pytest.raises(InvalidCheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        import_mae_weights(encoder, {"model": state})
    after = encoder.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before), "a failed import must not half-load"


def test_deeper_checkpoint_strict_raises_and_lenient_reports_unexpected():
    state = mae_state_dict(depth=3)
    encoder = make_encoder(depth=2)
    with pytest.raises(InvalidCheckpointError, match=r"unexpected .*blocks\.2\."):
        import_mae_weights(encoder, {"model": state}, strict=True)

    report = import_mae_weights(encoder, {"model": state}, strict=False)
    assert sorted(report.unexpected) == sorted(key for key in state if key.startswith("blocks.2."))
    assert report.missing == []
    assert sorted(all_report_keys(report)) == sorted(state)
    assert torch.equal(encoder.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_shallower_checkpoint_lenient_reports_missing_blocks():
    encoder = make_encoder(depth=2)
    report = import_mae_weights(encoder, {"model": mae_state_dict(depth=1)}, strict=False)
    assert report.missing == sorted(key for key in encoder.state_dict() if key.startswith("blocks.1."))


def test_finetuned_layout_reports_missing_norm_and_drops_head():
    state = mae_state_dict(finetuned=True)
    encoder = make_encoder()
    with pytest.raises(InvalidCheckpointError, match=r"missing .*norm\.bias"):
        import_mae_weights(encoder, {"model": state}, strict=True)

    report = import_mae_weights(encoder, {"model": state}, strict=False)
    assert report.missing == ["norm.bias", "norm.weight"]
    assert set(report.dropped) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert all("classification head" in reason for reason in report.dropped.values())
    assert report.unexpected == []
    assert sorted(all_report_keys(report)) == sorted(state)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b"PK\x03\x04 truncated zip", b""],
    ids=["text", "truncated-zip", "empty"],
)
def test_garbage_file_raises_invalid_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(InvalidCheckpointError):
        import_mae_weights(make_encoder(), path)


def test_missing_file_raises_invalid_checkpoint(tmp_path):
    with pytest.raises(InvalidCheckpointError, match="no such file"):
        import_mae_weights(make_encoder(), tmp_path / "absent.pth")


@pytest.mark.parametrize(
    "payload",
    [{"model": {"cls_token": torch.zeros(1, 1, DIM), "epoch": 3}}, {"model": [1, 2, 3]}, ["a", "list"]],
    ids=["non-tensor-value", "model-not-a-dict", "list"],
)
def test_payload_that_is_not_a_state_dict_raises(payload):
    with pytest.raises(InvalidCheckpointError, match="state dict"):
        import_mae_weights(make_encoder(), payload)


def test_non_square_position_embedding_raises():
    state = mae_state_dict()
    state["pos_embed"] = torch.zeros(1, 1 + 14 * 15, DIM)
    with pytest.raises(InvalidCheckpointError, match="square"):
        import_mae_weights(make_encoder(), {"model": state})
