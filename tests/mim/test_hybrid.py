"""The CL+MIM hybrid: its weight reduces it to its parts, one encoder serves both, and the gradient cosines."""

from __future__ import annotations

import pytest
import torch

from caries_mim.errors import InvalidConfigError
from caries_mim.mim import HybridCLMIM, HybridOptions, build_objective, gradient_cosines
from caries_mim.models import VisionTransformer, ViTConfig

TINY = ViTConfig(image_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2)
SMALL_MOCO = {"projector_hidden": 16, "predictor_hidden": 16, "out_dim": 8}


def hybrid(weight: float, mim: str = "simmim", **mim_options) -> HybridCLMIM:
    torch.manual_seed(0)
    options = HybridOptions(contrastive_weight=weight, mim=mim, moco=SMALL_MOCO, mim_options=mim_options)
    return HybridCLMIM(VisionTransformer(TINY), options)


def views(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mim", ["simmim", "mae"])
def test_weights_zero_and_one_reduce_the_hybrid_to_its_parts(mim):
    options = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2} if mim == "mae" else {}
    batch = views()
    only_mim = hybrid(0.0, mim, **options)
    torch.manual_seed(5)
    output = only_mim(batch)
    torch.manual_seed(5)  # the same masks
    assert output.loss.item() == pytest.approx(only_mim.masked(batch[:, 0]).loss.item(), rel=1e-6)
    assert set(output.parts) == {"contrastive", "mim"}

    only_contrastive = hybrid(1.0, mim, **options)
    torch.manual_seed(5)
    output = only_contrastive(batch)
    expected = only_contrastive.contrastive.contrastive_loss(batch[:, 0], batch[:, 1])
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)

    halfway = hybrid(0.5, mim, **options)
    torch.manual_seed(5)
    output = halfway(batch)
    parts = output.parts
    assert output.loss.item() == pytest.approx(0.5 * (parts["contrastive"] + parts["mim"]).item(), rel=1e-6)


def test_one_encoder_serves_both_parts_and_the_momentum_branch_follows_it():
    objective = hybrid(0.2)
    assert objective.contrastive.encoder is objective.encoder
    assert objective.masked.encoder is objective.encoder
    objective(views()).loss.backward()
    assert objective.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert objective.masked.mask_token.grad is not None
    assert objective.contrastive.predictor[0].weight.grad is not None
    before = objective.contrastive.momentum_encoder.blocks[0].mlp.fc1.weight.clone()
    with torch.no_grad():
        objective.encoder.blocks[0].mlp.fc1.weight.add_(1.0)
    objective.after_update(progress=0.0)
    torch.testing.assert_close(objective.contrastive.momentum_encoder.blocks[0].mlp.fc1.weight, before + 0.01)


def test_gradient_cosines_read_agreement_and_conflict_block_by_block(monkeypatch):
    objective = hybrid(0.2)

    def same_loss_twice(batch, *, gather=True):
        loss = objective.encoder(batch[:, 0]).tokens.pow(2).mean()
        return loss, loss

    monkeypatch.setattr(objective, "parts", same_loss_twice)
    agreeing = gradient_cosines(objective, views())
    assert sorted(agreeing) == [0, 1, 2]
    assert all(value == pytest.approx(1.0, abs=1e-5) for value in agreeing.values())

    def opposite_losses(batch, *, gather=True):
        loss = objective.encoder(batch[:, 0]).tokens.pow(2).mean()
        return loss, -loss

    monkeypatch.setattr(objective, "parts", opposite_losses)
    assert all(value == pytest.approx(-1.0, abs=1e-5) for value in gradient_cosines(objective, views()).values())


def test_the_real_gradient_cosines_are_one_per_block_in_range_and_leave_no_gradient():
    objective = hybrid(0.2)
    measured = objective.diagnostics(views())
    assert sorted(measured) == [f"gradient_cosine_block_{block}" for block in range(3)]
    assert all(-1.0 <= value <= 1.0 for value in measured.values())
    assert all(parameter.grad is None for parameter in objective.parameters())


def test_options_are_checked_with_the_parts_named():
    encoder = VisionTransformer(TINY)
    with pytest.raises(InvalidConfigError, match="contrastive_weight"):
        build_objective("hybrid", encoder, {"contrastive_weight": 1.5})
    with pytest.raises(InvalidConfigError, match="mim must be one of simmim, mae"):
        build_objective("hybrid", encoder, {"mim": "beit"})
    with pytest.raises(InvalidConfigError, match=r"objective\.moco.*temprature"):
        build_objective("hybrid", encoder, {"moco": {"temprature": 0.1}})
    assert build_objective("hybrid", encoder, {"moco": SMALL_MOCO}).views == 2
