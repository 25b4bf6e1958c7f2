"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie and He 2021), after
facebookresearch/moco-v3.

Two augmented views of each image. The online branch (encoder -> CLS token -> projector MLP -> predictor MLP) predicts,
for each view, the momentum branch's projection of the *other* view; the momentum branch (encoder + projector) is an
exponential moving average of the online one, its momentum rising from ``base_momentum`` to 1 on a half-cosine over
the run. The loss is InfoNCE over the batch: each query's own key is the positive, every other key (on every rank)
a negative, at temperature 0.2 for ViTs, scaled by 2T and summed over the two directions as the reference does.

This is the contrastive (CL) baseline of the objective comparison: CL gives global, shape-like, linearly separable
CLS features, where MIM gives local, high-frequency ones (REFERENCES.md, "CL vs MIM").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from caries_mim.errors import InvalidArgumentError
from caries_mim.mim.objective import ObjectiveOutput, PretrainingObjective
from caries_mim.models.vit import VisionTransformer


@dataclass(frozen=True)
class MoCoOptions:
    """MoCo v3 hyper-parameters (the reference's ViT settings: a 3-layer 4096-wide projector to 256, a 2-layer
    predictor, T = 0.2, momentum from 0.99). Small CPU configs shrink the MLP widths."""

    temperature: float = 0.2
    projector_hidden: int = 4096
    projector_layers: int = 3
    predictor_hidden: int = 4096
    out_dim: int = 256
    base_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.projector_hidden, self.predictor_hidden, self.out_dim) < 1 or self.projector_layers < 2:
            raise ValueError("MLP widths must be >= 1 and projector_layers >= 2")
        if not 0.0 <= self.base_momentum < 1.0:
            raise ValueError(f"base_momentum must be in [0, 1), got {self.base_momentum}")


def projection_mlp(in_dim: int, hidden: int, out_dim: int, layers: int, *, last_norm: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``layers`` bias-free linears, BatchNorm + ReLU after each but the last, and a BatchNorm
    without affine after the last (the reference's ``last_bn``). (B, in_dim) -> (B, out_dim)."""
    modules: list[nn.Module] = []
    for index in range(layers):
        last = index == layers - 1
        modules.append(nn.Linear(in_dim if index == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            modules += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_norm:
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


def gather_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's keys (B, D) -> (world * B, D) in rank order, without gradient (keys come from the momentum
    branch), and where this rank's keys start. One process: the keys themselves and 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, 0
    gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered), dist.get_rank() * keys.shape[0]


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """InfoNCE of (B, D) ``queries`` against (B, D) ``keys`` of the same images, in the same order: each query's own
    key is its positive, every other key (this rank's and, under DDP with ``gather``, every other rank's) a
    negative. Both are L2-normalized; the cross-entropy is multiplied by 2T, as MoCo v3 does. Returns a scalar
    (float32). ``gather=False`` keeps to this rank's keys (a measurement one rank makes alone)."""
    if queries.shape != keys.shape or queries.dim() != 2:
        raise InvalidArgumentError(
            f"queries and keys must both be (B, D), got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    queries = F.normalize(queries.float(), dim=1)
    normalized = F.normalize(keys.float(), dim=1)
    every_key, offset = gather_keys(normalized) if gather else (normalized, 0)
    logits = queries @ every_key.T / temperature  # (B, world * B)
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def cosine_momentum(progress: float, base: float) -> float:
    """MoCo v3's momentum at ``progress`` in [0, 1] of the run: ``base`` at the start, 1 at the end, half-cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter. Buffers (BatchNorm's
    running statistics) are left to the momentum branch's own forward passes, as in the reference."""
    for online_param, target_param in zip(online.parameters(), target.parameters(), strict=True):
        target_param.lerp_(online_param, 1.0 - momentum)


class MoCoV3(PretrainingObjective):
    """MoCo v3 around a :class:`~caries_mim.models.VisionTransformer`; ``forward`` takes two views of each image.

    ``encoder`` and ``projector`` (online) are trained; ``predictor`` is online only; ``momentum_encoder`` and
    ``momentum_projector`` follow them by :meth:`after_update` after each optimizer step and get no gradient.
    """

    name = "moco"
    Options = MoCoOptions
    views = 2

    def __init__(self, encoder: VisionTransformer, options: MoCoOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options = options or MoCoOptions()
        dim = encoder.config.embed_dim
        self.projector = projection_mlp(dim, options.projector_hidden, options.out_dim, options.projector_layers)
        self.predictor = projection_mlp(options.out_dim, options.predictor_hidden, options.out_dim, 2)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for parameter in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            parameter.requires_grad_(False)
        self.momentum = options.base_momentum

    def after_update(self, progress: float) -> None:
        """After an optimizer step at ``progress`` in [0, 1] of the run: the momentum branch follows the online one
        with the momentum of the cosine schedule."""
        self.momentum = cosine_momentum(progress, self.options.base_momentum)
        momentum_update(self.encoder, self.momentum_encoder, self.momentum)
        momentum_update(self.projector, self.momentum_projector, self.momentum)

    def contrastive_loss(self, first: torch.Tensor, second: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
        """Two (B, C, H, W) views of the same B images -> the symmetric MoCo v3 loss (a scalar); ``gather``: the keys
        of every rank are negatives (:func:`info_nce`)."""
        if first.shape != second.shape:
            raise InvalidArgumentError(f"the two views differ in shape: {tuple(first.shape)} and {tuple(second.shape)}")
        queries = [self.predictor(self.projector(self.encoder(view).tokens[:, 0])) for view in (first, second)]
        with torch.no_grad():
            keys = [self.momentum_projector(self.momentum_encoder(view).tokens[:, 0]) for view in (first, second)]
        temperature = self.options.temperature
        return info_nce(queries[0], keys[1], temperature, gather=gather) + info_nce(
            queries[1], keys[0], temperature, gather=gather
        )

    def forward(self, views: torch.Tensor) -> ObjectiveOutput:
        """(B, 2, C, H, W) two views per image -> the loss (a scalar)."""
        if views.dim() != 5 or views.shape[1] != 2:
            raise InvalidArgumentError(f"expected two views per image (B, 2, C, H, W), got {tuple(views.shape)}")
        return ObjectiveOutput(loss=self.contrastive_loss(views[:, 0], views[:, 1]))
