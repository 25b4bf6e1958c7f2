"""SemanticMIM: mask tokens read the proxies and never an image token; the loss is MAE's; only the encoder is kept."""

from __future__ import annotations

import pytest
import torch

from caries_mim.errors import InvalidConfigError
from caries_mim.mim import MaskedAutoencoder, SemanticMIM, SemanticMIMOptions, build_objective, random_masking
from caries_mim.mim.mae import masked_pixel_loss
from caries_mim.models import VisionTransformer, ViTConfig

TINY = ViTConfig(image_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2)


def objective(proxies: int = 3, **options) -> SemanticMIM:
    torch.manual_seed(0)
    return SemanticMIM(VisionTransformer(TINY), SemanticMIMOptions(proxy_tokens=proxies, **options))


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def encoded_layers(model: SemanticMIM, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each encoder layer's output as a leaf that records its gradient, and mask tokens for the removed patches."""
    tokens, grid = model.encoder.embed_patches(batch)
    tokens = tokens + model.encoder.position_embedding(grid)
    torch.manual_seed(3)
    keep, _, restore = random_masking(batch.shape[0], tokens.shape[1], 0.75, batch.device)
    visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    layers = [layer.detach().requires_grad_(True) for layer in model.compress(visible, grid)]
    removed = restore.shape[1] - keep.shape[1]
    return layers, model.mask_token.expand(batch.shape[0], removed, -1).clone()


@pytest.mark.parametrize("proxies", [1, 3])
def test_mask_tokens_read_the_proxies_of_every_layer_and_never_an_image_token(proxies):
    model = objective(proxies)
    layers, mask_tokens = encoded_layers(model, images())
    states = model.reconstruct_removed(layers, mask_tokens)
    states.square().sum().backward()
    for layer in layers:
        assert layer.shape[1] == proxies + 4  # the CLS token, the extra proxies, the 4 visible patches of 16
        # Every proxy of every layer feeds the reconstruction ...
        assert (layer.grad[:, :proxies].abs().sum(dim=-1) > 0).all()
        # ... and no image token of any layer does, not even through another mask token.
        assert torch.count_nonzero(layer.grad[:, proxies:]) == 0


def test_changing_the_visible_tokens_changes_the_reconstruction_only_through_the_proxies():
    model = objective(2)
    layers, mask_tokens = encoded_layers(model, images())
    scrambled = [torch.cat([layer[:, :2], torch.randn_like(layer[:, 2:])], dim=1) for layer in layers]
    with torch.no_grad():
        assert torch.equal(
            model.reconstruct_removed(layers, mask_tokens), model.reconstruct_removed(scrambled, mask_tokens)
        )
        # A random change (a constant shift would vanish in the blocks' LayerNorm).
        moved_proxy = [
            torch.cat([layer[:, :1] + torch.randn_like(layer[:, :1]), layer[:, 1:]], dim=1) for layer in layers
        ]
        assert not torch.allclose(
            model.reconstruct_removed(layers, mask_tokens), model.reconstruct_removed(moved_proxy, mask_tokens)
        )


def test_the_loss_is_maes_on_the_removed_patches_and_gradients_reach_the_encoder_through_the_proxies():
    model = objective(3)
    batch = images()
    output = model(batch)
    assert output.mask.shape == (2, 16)
    assert output.mask.sum(dim=1).tolist() == [12.0, 12.0]
    assert torch.count_nonzero(output.prediction[output.mask == 0]) == 0  # visible patches are not predicted
    expected = masked_pixel_loss(output.prediction, batch, output.mask, 16, norm_pix_loss=True)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    output.loss.backward()
    encoder = model.encoder
    for parameter in (encoder.patch_embed.proj.weight, encoder.cls_token, encoder.blocks[0].attn.qkv.weight):
        assert parameter.grad is not None
        assert parameter.grad.abs().sum() > 0
    assert model.extra_proxies.grad.abs().sum() > 0
    # Every weight is trained, the encoder's final norm included (DDP refuses parameters without a gradient).
    untrained = [name for name, parameter in model.named_parameters() if parameter.numel() and parameter.grad is None]
    assert not untrained
    # The encoder's last block only reaches the loss through the proxies it outputs: its MLP still gets a gradient.
    assert encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_one_proxy_is_the_cls_token_alone_and_the_encoder_keeps_no_pretraining_parts():
    model = objective(1)
    assert model.extra_proxies.shape == (1, 0, 32)
    assert len(model.mask_blocks) == TINY.depth
    encoder_keys = set(model.encoder.state_dict())
    assert not any(key.startswith(("mask_", "extra_", "predict")) for key in encoder_keys)
    assert encoder_keys == set(VisionTransformer(TINY).state_dict())


def test_it_trains_and_reconstructs_like_mae():
    model = objective(2, mask_ratio=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = images(4)
    torch.manual_seed(7)
    first = model(batch).loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        torch.manual_seed(7)  # the same masks: the loss must fall on one batch
        model(batch).loss.backward()
        optimizer.step()
    torch.manual_seed(7)
    assert model(batch).loss.item() < 0.8 * first
    pictures = model.reconstruct(batch)
    assert pictures.reconstruction.shape == batch.shape
    assert pictures.reconstruction.min() >= 0.0
    assert pictures.reconstruction.max() <= 1.0


def test_mae_and_semantic_mim_share_the_loss():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(VisionTransformer(TINY))
    batch = images()
    torch.manual_seed(4)
    output = mae(batch)
    assert output.loss.item() == pytest.approx(
        masked_pixel_loss(output.prediction, batch, output.mask, 16, norm_pix_loss=True).item(), rel=1e-6
    )


def test_built_by_name_with_checked_options():
    model = build_objective("semantic_mim", VisionTransformer(TINY), {"proxy_tokens": 4, "mask_ratio": 0.6})
    assert isinstance(model, SemanticMIM)
    assert model.proxy_count == 4
    with pytest.raises(InvalidConfigError, match="proxy_tokens must be >= 1"):
        build_objective("semantic_mim", VisionTransformer(TINY), {"proxy_tokens": 0})
    with pytest.raises(InvalidConfigError, match="unknown key"):
        build_objective("semantic_mim", VisionTransformer(TINY), {"decoder_dim": 16})
