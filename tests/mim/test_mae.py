"""MAE: per-sample random masking, encoder on visible tokens only, loss on removed patches, norm-pix targets."""

from __future__ import annotations

import pytest
import torch

from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from caries_mim.mim import MAEOptions, MaskedAutoencoder, build_objective, patchify, random_masking
from caries_mim.mim.mae import NORM_PIX_EPS, normalize_patches
from caries_mim.mim.objective import MASKED_FILL
from caries_mim.models import VisionTransformer, ViTConfig, sincos_position_embedding

SMALL = ViTConfig(image_size=(64, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4)
DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


def make_mae(norm_pix_loss: bool = True, mask_ratio: float = 0.75, seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    options = MAEOptions(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, **DECODER)
    return MaskedAutoencoder(VisionTransformer(SMALL), options)


def expected_keep_count(num_patches: int, mask_ratio: float) -> int:
    """MAE's ``len_keep = int(L * (1 - mask_ratio))``, at least one visible patch."""
    return max(1, int(num_patches * (1 - mask_ratio)))


# ---------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize(("num_patches", "mask_ratio"), [(16, 0.75), (196, 0.75), (49, 0.6), (24, 0.5), (10, 0.8)])
def test_random_masking_invariants(num_patches, mask_ratio):
    torch.manual_seed(0)
    batch = 6
    keep, mask, restore = random_masking(batch, num_patches, mask_ratio, torch.device("cpu"))
    kept = expected_keep_count(num_patches, mask_ratio)
    assert keep.shape == (batch, kept)
    assert keep.dtype == restore.dtype == torch.long
    assert mask.shape == restore.shape == (batch, num_patches)
    assert torch.equal(mask.sum(dim=1), torch.full((batch,), float(num_patches - kept)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for row in range(batch):
        assert len(set(keep[row].tolist())) == kept, "kept indices must be distinct"
        assert sorted(restore[row].tolist()) == list(range(num_patches)), "restore must be a permutation"
        # mask == 0 exactly at the kept indices
        assert set(torch.nonzero(mask[row] == 0).flatten().tolist()) == set(keep[row].tolist())


def test_restore_puts_kept_then_removed_back_in_patch_order():
    torch.manual_seed(1)
    batch, num_patches = 4, 20
    keep, mask, restore = random_masking(batch, num_patches, 0.75, torch.device("cpu"))
    shuffle = restore.argsort(dim=1)  # [kept..., removed...] order that restore inverts
    assert torch.equal(shuffle[:, : keep.shape[1]], keep)
    removed = shuffle[:, keep.shape[1] :]
    assert torch.all(mask.gather(1, removed) == 1)
    # Tokens labelled by their patch index: [kept, removed] gathered with restore is the original order.
    labels = torch.arange(num_patches).expand(batch, -1)
    shuffled = torch.cat([labels.gather(1, keep), labels.gather(1, removed)], dim=1)
    assert torch.equal(shuffled.gather(1, restore), labels)


def test_samples_get_different_masks():
    torch.manual_seed(2)
    _, mask, _ = random_masking(8, 196, 0.75, torch.device("cpu"))
    assert len({tuple(row.tolist()) for row in mask}) == 8


# ---------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96), (32, 48)])
def test_forward_shapes(height, width):
    mae = make_mae()
    output = mae(torch.rand(3, 1, height, width))
    grid = (height // 16, width // 16)
    num_patches = grid[0] * grid[1]
    assert output.grid == grid
    assert output.mask.shape == (3, num_patches)
    assert output.prediction.shape == (3, num_patches, 16 * 16)
    assert output.loss.dim() == 0
    assert torch.isfinite(output.loss)
    assert torch.equal(
        output.mask.sum(dim=1), torch.full((3,), float(num_patches - expected_keep_count(num_patches, 0.75)))
    )


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96)])
def test_encoder_sees_only_visible_tokens(height, width):
    """The encoder's first block gets CLS + the K visible patches (with positions), nothing else."""
    mae = make_mae()
    seen = []
    handle = mae.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    images = torch.rand(2, 1, height, width)
    try:
        output = mae(images)
    finally:
        handle.remove()
    num_patches = (height // 16) * (width // 16)
    kept = expected_keep_count(num_patches, 0.75)
    assert seen[0].shape == (2, 1 + kept, 64)

    with torch.no_grad():
        tokens, grid = mae.encoder.embed_patches(images)
        tokens = tokens + mae.encoder.position_embedding(grid)
    for row in range(2):
        visible = tokens[row][output.mask[row] == 0]
        distances = torch.cdist(seen[0][row, 1:], visible)  # each encoded token is one visible patch token
        assert distances.min(dim=1).values.max() < 1e-5
        assert len(set(distances.argmin(dim=1).tolist())) == kept


def test_decoder_position_embedding_is_sincos_at_decoder_width():
    mae = make_mae()
    assert mae.decoder_pos_embed.shape == (1, 17, 32)
    assert torch.equal(mae.decoder_pos_embed[0, 1:], sincos_position_embedding(32, (4, 4)))
    assert "decoder_pos_embed" not in dict(mae.named_parameters())


# ---------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_gradient_reaches_removed_patches_only(norm_pix_loss):
    """d loss / d prediction is zero on every visible patch: the loss ignores them."""
    mae = make_mae(norm_pix_loss=norm_pix_loss)
    output = mae(torch.rand(4, 1, 64, 64))
    output.prediction.retain_grad()
    output.loss.backward()
    gradient = output.prediction.grad.abs().sum(dim=-1)  # (B, N)
    visible = output.mask == 0
    assert torch.all(gradient[visible] == 0)
    assert torch.all(gradient[~visible] > 0)


def test_last_decoder_block_on_removed_tokens_only_is_exact():
    """The last decoder block and the head run on removed tokens only; loss and every gradient equal decoding
    all tokens (float64, same masks), and visible patches get no prediction (zeros)."""
    torch.manual_seed(0)
    options = MAEOptions(decoder_dim=32, decoder_depth=2, decoder_heads=4)
    mae = MaskedAutoencoder(VisionTransformer(SMALL), options).double()
    images = torch.rand(3, 1, 64, 64, dtype=torch.float64)

    def loss_and_gradients(model: MaskedAutoencoder):
        model.zero_grad()
        torch.manual_seed(7)  # same masks for both runs
        output = model(images)
        output.loss.backward()
        return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    pruned, pruned_grads = loss_and_gradients(mae)
    last = mae.decoder_blocks[-1]
    last.forward_selected = lambda tokens, index: last(tokens)[0].gather(1, index)  # decode every token
    full, full_grads = loss_and_gradients(mae)
    assert torch.equal(pruned.mask, full.mask)
    assert torch.allclose(pruned.loss, full.loss, rtol=1e-12)
    assert pruned_grads.keys() == full_grads.keys()
    for name, gradient in pruned_grads.items():
        assert torch.allclose(gradient, full_grads[name], rtol=1e-9, atol=1e-12), name
    assert torch.all(pruned.prediction[pruned.mask == 0] == 0)
    assert torch.all(pruned.prediction[pruned.mask == 1] != 0)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_mean_patch_mse_over_removed_patches(norm_pix_loss):
    mae = make_mae(norm_pix_loss=norm_pix_loss)
    images = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        output = mae(images)
    target = patchify(images, 16)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5

    def recomputed(prediction: torch.Tensor) -> torch.Tensor:
        per_patch = ((prediction - target) ** 2).mean(dim=-1)
        return (per_patch * output.mask).sum() / output.mask.sum()

    assert torch.allclose(output.loss, recomputed(output.prediction), rtol=1e-5)
    changed = output.prediction.clone()
    changed[output.mask == 0] += 100.0  # any prediction on visible patches
    assert torch.allclose(recomputed(changed), output.loss, rtol=1e-5)
    changed[output.mask == 1] += 1.0
    assert not torch.allclose(recomputed(changed), output.loss, rtol=1e-5)


def test_norm_pix_targets_are_standardized_per_patch():
    patches = 3.0 * torch.rand(2, 10, 256) + 5.0
    normalized, _, std = normalize_patches(patches)
    assert torch.allclose(normalized.mean(dim=-1), torch.zeros(2, 10), atol=1e-5)
    unbiased = patches.var(dim=-1, keepdim=True)  # MAE uses torch's default (unbiased) variance
    assert torch.allclose(std, (unbiased + NORM_PIX_EPS).sqrt())
    assert torch.allclose(normalized.var(dim=-1), unbiased.squeeze(-1) / (unbiased.squeeze(-1) + NORM_PIX_EPS))
    assert torch.allclose(normalized.var(dim=-1), torch.ones(2, 10), atol=1e-4)
    assert NORM_PIX_EPS == 1e-6


def test_norm_pix_of_flat_patch_is_finite_zero():
    normalized, _, std = normalize_patches(torch.full((1, 2, 16), 0.3))
    assert torch.allclose(normalized, torch.zeros_like(normalized), atol=1e-4)
    assert torch.allclose(std, torch.full_like(std, NORM_PIX_EPS**0.5))


def test_prediction_to_pixels_inverts_normalization():
    patches = torch.rand(2, 16, 256)
    normalized, _, _ = normalize_patches(patches)
    assert torch.allclose(make_mae(norm_pix_loss=True).prediction_to_pixels(normalized, patches), patches, atol=1e-5)
    assert make_mae(norm_pix_loss=False).prediction_to_pixels(normalized, patches) is normalized


# ---------------------------------------------------------------------------------------------------- reconstruct


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruct_keeps_visible_patches_exactly(norm_pix_loss):
    mae = make_mae(norm_pix_loss=norm_pix_loss)
    images = torch.rand(2, 1, 64, 96)
    torch.manual_seed(7)
    pictures = mae.reconstruct(images)
    torch.manual_seed(7)
    with torch.no_grad():
        output = mae(images)  # same seed: same mask as inside reconstruct
    assert pictures.original is images
    for picture in (pictures.masked, pictures.reconstruction):
        assert picture.shape == images.shape
        assert picture.min() >= 0
        assert picture.max() <= 1
    visible = (output.mask == 0).unsqueeze(-1)
    source = patchify(images, 16)
    reconstruction = patchify(pictures.reconstruction, 16)
    masked = patchify(pictures.masked, 16)
    assert torch.equal(torch.where(visible, reconstruction, 0.0), torch.where(visible, source, 0.0))
    assert torch.equal(torch.where(visible, masked, 0.0), torch.where(visible, source, 0.0))
    assert torch.all(masked[~visible.expand_as(masked)] == MASKED_FILL)
    predicted = mae.prediction_to_pixels(output.prediction, source).clamp(0, 1)
    removed = ~visible.expand_as(reconstruction)
    assert torch.allclose(reconstruction[removed], predicted[removed], atol=1e-5)


def test_reconstruct_leaves_train_mode_alone():
    mae = make_mae().train()
    mae.reconstruct(torch.rand(1, 1, 64, 64))
    assert mae.training
    mae.eval()
    mae.reconstruct(torch.rand(1, 1, 64, 64))
    assert not mae.training


# ---------------------------------------------------------------------------------------------------- options


def test_default_options_are_mae_reference():
    options = MAEOptions()
    assert (options.mask_ratio, options.decoder_dim, options.decoder_depth, options.decoder_heads) == (0.75, 512, 8, 16)
    assert options.norm_pix_loss is True


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"decoder_depth": 0}, "decoder_depth"),
        ({"decoder_dim": 64, "decoder_heads": 5}, "decoder_dim"),
        ({"decoder_dim": 6, "decoder_heads": 2}, "decoder_dim"),
        ({"decoder_width": 64}, "decoder_width"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(options, key):
    encoder = VisionTransformer(SMALL)
    with pytest.raises(InvalidConfigError) as caught:
        build_objective("mae", encoder, {**DECODER, **options})
    assert key in caught.value.message
    assert "'mae'" in caught.value.message
    assert caught.value.code == "invalid_config"


def test_wrongly_typed_option_names_the_key():
    with pytest.raises(InvalidConfigError, match=r"mask_ratio: expected a number, got '0\.75'"):
        build_objective("mae", VisionTransformer(SMALL), {"mask_ratio": "0.75"})


def test_build_objective_parses_options():
    mae = build_objective("mae", VisionTransformer(SMALL), {**DECODER, "mask_ratio": 0.5, "norm_pix_loss": False})
    assert isinstance(mae, MaskedAutoencoder)
    assert mae.options == MAEOptions(mask_ratio=0.5, norm_pix_loss=False, **DECODER)
    assert len(mae.decoder_blocks) == 1
    assert mae.decoder_pred.out_features == 256


def test_an_image_too_small_to_mask_is_a_clear_error():
    """One 16 px patch cannot be both kept and removed; without the check the loss would be 0/0 = NaN."""
    mae = build_objective("mae", VisionTransformer(SMALL), DECODER)
    with pytest.raises(InvalidArgumentError, match="too small for this mask ratio"):
        mae(torch.rand(1, 1, 16, 16))
