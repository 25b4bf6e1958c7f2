"""MoCo v3's pieces on hand-checked cases: InfoNCE, the momentum schedule and update, the two-view objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caries_mim.errors import InvalidArgumentError
from caries_mim.mim.moco import (
    MoCoOptions,
    MoCoV3,
    cosine_momentum,
    info_nce,
    momentum_update,
    projection_mlp,
)
from caries_mim.models import VisionTransformer, ViTConfig

TINY = ViTConfig(image_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
SMALL_HEADS = MoCoOptions(projector_hidden=16, predictor_hidden=16, out_dim=8)


def test_info_nce_with_orthogonal_keys_and_matching_queries_is_near_zero():
    # Each query equals its own key and is orthogonal to every other: logits 1/T on the diagonal, 0 elsewhere.
    keys = torch.eye(4)
    temperature = 0.2
    expected = 2 * temperature * -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 3))
    assert info_nce(keys.clone(), keys, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert expected < 0.01


def test_info_nce_with_identical_keys_cannot_tell_the_positive_apart():
    # Every key the same: the positive is one of B equal logits, the loss is 2T log B whatever the queries are.
    keys = torch.ones(5, 3)
    queries = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert info_nce(queries, keys, 0.2).item() == pytest.approx(2 * 0.2 * math.log(5), rel=1e-5)


def test_info_nce_is_scale_free_and_checks_shapes():
    queries = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    keys = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    assert info_nce(queries * 7.0, keys * 0.1, 0.5).item() == pytest.approx(info_nce(queries, keys, 0.5).item())
    reference = F.cross_entropy(F.normalize(queries) @ F.normalize(keys).T / 0.5, torch.arange(6)) * 1.0
    assert info_nce(queries, keys, 0.5).item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(InvalidArgumentError, match=r"\(B, D\)"):
        info_nce(queries, keys[:5], 0.5)


def test_cosine_momentum_rises_from_its_base_to_one():
    assert cosine_momentum(0.0, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(0.5, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(1.0, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(2.0, 0.99) == pytest.approx(1.0)  # clamped


def test_momentum_update_moves_the_target_towards_the_online_weights():
    online, target = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        online.weight.fill_(1.0)
        online.bias.fill_(1.0)
        target.weight.fill_(0.0)
        target.bias.fill_(0.0)
    momentum_update(online, target, 0.9)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))
    momentum_update(online, target, 1.0)  # momentum 1: frozen
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))
    momentum_update(online, target, 0.0)  # momentum 0: a copy
    assert torch.equal(target.bias, online.bias)


def test_projection_mlp_has_the_reference_layout():
    mlp = projection_mlp(32, 16, 8, 3)
    linears = [module for module in mlp if isinstance(module, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 16), (16, 8)]
    assert all(m.bias is None for m in linears)
    assert isinstance(mlp[-1], nn.BatchNorm1d)
    assert not mlp[-1].affine


def test_the_objective_trains_the_online_branch_only_and_its_momentum_branch_follows():
    torch.manual_seed(0)
    objective = MoCoV3(VisionTransformer(TINY), SMALL_HEADS)
    views = torch.rand(4, 2, 1, 32, 32)
    loss = objective(views).loss
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    assert objective.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert objective.predictor[0].weight.grad is not None
    assert all(p.grad is None for p in objective.momentum_encoder.parameters())
    assert all(not p.requires_grad for p in objective.momentum_projector.parameters())
    # The momentum branch starts as a copy; after an update it sits between its old weights and the online ones.
    before = objective.momentum_encoder.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        objective.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    objective.after_update(progress=0.0)
    after = objective.momentum_encoder.blocks[0].attn.qkv.weight
    assert torch.allclose(after, before + 0.01, atol=1e-6)
    assert objective.momentum == pytest.approx(0.99)


def test_the_loss_is_symmetric_in_the_two_views():
    torch.manual_seed(0)
    objective = MoCoV3(VisionTransformer(TINY), SMALL_HEADS).eval()  # eval: BatchNorm by its running statistics
    first, second = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    swapped = objective(torch.stack([second, first], dim=1)).loss
    assert objective(torch.stack([first, second], dim=1)).loss.item() == pytest.approx(swapped.item(), rel=1e-5)


def test_views_must_come_in_pairs():
    objective = MoCoV3(VisionTransformer(TINY), SMALL_HEADS)
    with pytest.raises(InvalidArgumentError, match="two views per image"):
        objective(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"base_momentum": 1.0}, "base_momentum"),
        ({"projector_layers": 1}, "projector_layers"),
        ({"out_dim": 0}, "widths"),
    ],
)
def test_bad_options_are_refused(bad, named):
    with pytest.raises(ValueError, match=named):
        MoCoOptions(**bad)
