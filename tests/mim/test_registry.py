"""The objective registry, its extension path, and a tiny training sanity check for every objective."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from caries_mim.errors import InvalidConfigError
from caries_mim.mim import (
    OBJECTIVES,
    MAEOptions,
    MaskedAutoencoder,
    MaskedImageObjective,
    MIMOutput,
    MoCoV3,
    PretrainingObjective,
    SemanticMIM,
    SimMIM,
    SimMIMOptions,
    build_objective,
    patchify,
    random_masking,
)
from caries_mim.mim.objective import options_from_dict
from caries_mim.models import VisionTransformer, ViTConfig

SMALL = ViTConfig(image_size=(64, 64), patch_size=16, embed_dim=64, depth=2, num_heads=4)


def test_registry_holds_mae_simmim_moco_the_hybrid_and_semantic_mim():
    assert OBJECTIVES["mae"] is MaskedAutoencoder
    assert OBJECTIVES["simmim"] is SimMIM
    assert OBJECTIVES["moco"] is MoCoV3
    assert OBJECTIVES["semantic_mim"] is SemanticMIM
    for name, objective_type in OBJECTIVES.items():
        assert objective_type.name == name
        assert issubclass(objective_type, PretrainingObjective)
    # Masked image modeling takes one view of each image; the contrastive objective two.
    assert {name: objective_type.views for name, objective_type in OBJECTIVES.items()} == {
        "mae": 1,
        "simmim": 1,
        "moco": 2,
        "hybrid": 2,
        "semantic_mim": 1,
    }
    assert not issubclass(MoCoV3, MaskedImageObjective)


def test_unknown_objective_names_the_choices():
    with pytest.raises(InvalidConfigError) as caught:
        build_objective("beit", VisionTransformer(SMALL))
    message = caught.value.message
    assert "'beit'" in message
    assert "objective.name" in message
    assert "mae" in message
    assert "simmim" in message


def test_no_options_means_defaults():
    assert build_objective("simmim", VisionTransformer(SMALL)).options == SimMIMOptions()
    assert options_from_dict(MAEOptions, None, "objective options") == MAEOptions()


@pytest.mark.parametrize(("name", "options"), [("mae", {"decoder_dim": 32, "decoder_depth": 1}), ("simmim", None)])
def test_objective_keeps_the_given_encoder(name, options):
    encoder = VisionTransformer(SMALL)
    assert build_objective(name, encoder, options).encoder is encoder


@dataclass(frozen=True)
class ToyOptions:
    mask_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


class ToyObjective(MaskedImageObjective):
    """Zero out removed patch tokens, predict every patch linearly from its token: the smallest MIM objective."""

    name = "toy"
    Options = ToyOptions

    def __init__(self, encoder: VisionTransformer, options: ToyOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options or ToyOptions()
        self.head = nn.Linear(encoder.config.embed_dim, encoder.patch_size**2 * encoder.config.in_channels)

    def forward(self, images: torch.Tensor) -> MIMOutput:
        tokens, grid = self.encoder.embed_patches(images)
        _, mask, _ = random_masking(tokens.shape[0], tokens.shape[1], self.options.mask_ratio, tokens.device)
        tokens = tokens * (1 - mask.unsqueeze(-1)) + self.encoder.position_embedding(grid)
        prediction = self.head(self.encoder.encode(tokens, grid).patch_tokens)
        per_patch = (prediction - patchify(images, self.encoder.patch_size)).pow(2).mean(dim=-1)
        return MIMOutput(loss=(per_patch * mask).sum() / mask.sum(), mask=mask, prediction=prediction, grid=grid)


def test_a_new_objective_is_one_registry_entry(monkeypatch):
    """The extension path: a subclass plus one OBJECTIVES entry, and build_objective / reconstruct just work."""
    monkeypatch.setitem(OBJECTIVES, ToyObjective.name, ToyObjective)
    objective = build_objective("toy", VisionTransformer(SMALL), {"mask_ratio": 0.25})
    assert isinstance(objective, ToyObjective)
    assert objective.options == ToyOptions(mask_ratio=0.25)
    output = objective(torch.rand(2, 1, 64, 64))
    assert output.mask.sum().item() == 2 * (16 - int(16 * 0.75))
    pictures = objective.reconstruct(torch.rand(2, 1, 64, 64))
    assert pictures.reconstruction.shape == (2, 1, 64, 64)

    with pytest.raises(InvalidConfigError, match="ratio"):
        build_objective("toy", VisionTransformer(SMALL), {"ratio": 0.5})
    with pytest.raises(InvalidConfigError, match="mask_ratio"):
        build_objective("toy", VisionTransformer(SMALL), {"mask_ratio": 2.0})
    with pytest.raises(InvalidConfigError, match="toy"):
        build_objective("beit", VisionTransformer(SMALL))


# ---------------------------------------------------------------------------------------------------- training


def smooth_blobs(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(count, 1, size, size) images in [0, 1]: a few Gaussian blobs each, a stand-in for smooth anatomy."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.zeros(count, 1, size, size)
    for index in range(count):
        for _ in range(4):
            center = torch.rand(2, generator=generator)
            sigma = 0.05 + 0.15 * torch.rand(1, generator=generator)
            amplitude = torch.rand(1, generator=generator)
            images[index, 0] += amplitude * torch.exp(-((x - center[1]) ** 2 + (y - center[0]) ** 2) / (2 * sigma**2))
    return images.clamp(0, 1)


@pytest.fixture
def single_thread():
    """Tiny models train faster on one thread, and far faster when other processes compete for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mae", {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4, "norm_pix_loss": False}),
        ("mae", {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4, "norm_pix_loss": True}),
        ("simmim", {}),
    ],
    ids=["mae", "mae-norm-pix", "simmim"],
)
def test_thirty_steps_reduce_the_loss(name, options):
    """30 AdamW steps on one fixed batch; the loss is measured before and after with the same masks (same seed)."""
    torch.manual_seed(0)
    objective = build_objective(name, VisionTransformer(SMALL), options)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    images = smooth_blobs(4)

    def evaluation_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return objective(images).loss.item()

    initial = evaluation_loss()
    for _ in range(30):
        loss = objective(images).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = evaluation_loss()
    assert final < 0.7 * initial, f"{name}: loss {initial:.4f} -> {final:.4f}"
