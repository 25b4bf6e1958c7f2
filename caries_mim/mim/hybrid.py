"""The CL+MIM hybrid of "What do self-supervised ViTs learn?" (Park et al. 2023): ``L = w * L_MoCo + (1 - w) * L_MIM``
on one encoder with one optimizer.

Contrastive learning makes late-layer attention global and features linearly separable; masked image modeling keeps
early layers local and high-frequency. The paper's weight on the contrastive part: 0.2 for fine-tuning, 0.4 for
linear probing (REFERENCES.md, "Contrastive and hybrid pretraining").

How views and masks are routed: each image comes as two augmented views. The contrastive part sees both views
whole (MoCo v3 needs every patch of both to compare the CLS tokens; a masked view would make the two branches
disagree about what the image holds). The MIM part (SimMIM by default, or MAE) masks the first view and
reconstructs it. So the encoder runs three times per step (two whole views, one masked view: SimMIM encodes all
its tokens, MAE only the visible quarter) and the momentum encoder twice.

Summing the two losses is reported to give conflicting gradients in deep layers (Layer Grafted Pre-training):
:func:`gradient_cosines` measures, block by block, the cosine between the two losses' gradients, which the
pretraining pipeline logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from caries_mim.errors import InvalidArgumentError
from caries_mim.mim.mae import MAEOptions, MaskedAutoencoder
from caries_mim.mim.moco import MoCoOptions, MoCoV3
from caries_mim.mim.objective import MaskedImageObjective, ObjectiveOutput, PretrainingObjective, options_from_dict
from caries_mim.mim.simmim import SimMIM, SimMIMOptions
from caries_mim.models.vit import VisionTransformer

#: The MIM objectives the hybrid can pair with the contrastive one, with their options types.
MIM_PARTS: dict[str, tuple[type[MaskedImageObjective], type]] = {
    "simmim": (SimMIM, SimMIMOptions),
    "mae": (MaskedAutoencoder, MAEOptions),
}


@dataclass(frozen=True)
class HybridOptions:
    """``contrastive_weight`` (the paper's lambda) on MoCo v3, the rest on ``mim`` (simmim or mae); ``moco`` and
    ``mim_options`` are the two parts' own options."""

    contrastive_weight: float = 0.2
    mim: str = "simmim"
    moco: dict[str, Any] = field(default_factory=dict)
    mim_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.contrastive_weight <= 1.0:
            raise ValueError(f"contrastive_weight must be in [0, 1], got {self.contrastive_weight}")
        if self.mim not in MIM_PARTS:
            raise ValueError(f"mim must be one of {', '.join(MIM_PARTS)}, got {self.mim!r}")


class HybridCLMIM(PretrainingObjective):
    """MoCo v3 and a MIM objective sharing one :class:`~caries_mim.models.VisionTransformer`; two views per image."""

    name = "hybrid"
    Options = HybridOptions
    views = 2

    def __init__(self, encoder: VisionTransformer, options: HybridOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options = options or HybridOptions()
        self.contrastive = MoCoV3(encoder, options_from_dict(MoCoOptions, options.moco, "objective.moco"))
        mim_type, mim_options_type = MIM_PARTS[options.mim]
        self.masked = mim_type(
            encoder, options_from_dict(mim_options_type, options.mim_options, "objective.mim_options")
        )

    def parts(self, views: torch.Tensor, *, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, C, H, W) -> (contrastive loss, MIM loss on the first view), both scalars; ``gather``: see
        :func:`~caries_mim.mim.moco.info_nce`."""
        if views.dim() != 5 or views.shape[1] != 2:
            raise InvalidArgumentError(f"expected two views per image (B, 2, C, H, W), got {tuple(views.shape)}")
        # Both parts always run, whatever the weight: under DDP every trained parameter must receive a gradient.
        contrastive = self.contrastive.contrastive_loss(views[:, 0], views[:, 1], gather=gather)
        return contrastive, self.masked(views[:, 0]).loss

    def forward(self, views: torch.Tensor) -> ObjectiveOutput:
        contrastive, masked = self.parts(views)
        weight = self.options.contrastive_weight
        return ObjectiveOutput(
            loss=weight * contrastive + (1.0 - weight) * masked, parts={"contrastive": contrastive, "mim": masked}
        )

    def after_update(self, progress: float) -> None:
        self.contrastive.after_update(progress)

    def diagnostics(self, views: torch.Tensor) -> dict[str, float]:
        """What the pipeline logs beside the loss: the per-block gradient cosines of the two parts."""
        return {f"gradient_cosine_block_{block}": value for block, value in gradient_cosines(self, views).items()}


def gradient_cosines(objective: HybridCLMIM, views: torch.Tensor) -> dict[int, float]:
    """Per encoder block: the cosine between the gradient of the contrastive loss and that of the MIM loss with
    respect to the block's parameters, on ``views`` (B, 2, C, H, W). 1: the two objectives pull the block the same
    way; 0: independently; -1: against each other. Leaves no gradient behind (``torch.autograd.grad``). This
    rank's keys only: one rank measures alone."""
    contrastive, masked = objective.parts(views, gather=False)
    per_block = [[p for p in block.parameters() if p.requires_grad] for block in objective.encoder.blocks]
    parameters = [parameter for block in per_block for parameter in block]
    gradients = [
        [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, parameters, strict=True)]
        for grads in (
            torch.autograd.grad(contrastive, parameters, retain_graph=True, allow_unused=True),
            torch.autograd.grad(masked, parameters, allow_unused=True),
        )
    ]
    cosines, start = {}, 0
    for index, block in enumerate(per_block):
        if block:
            first, second = (
                torch.cat([g.flatten().float() for g in grads[start : start + len(block)]]) for grads in gradients
            )
            cosines[index] = float(F.cosine_similarity(first, second, dim=0))
        start += len(block)
    return cosines
