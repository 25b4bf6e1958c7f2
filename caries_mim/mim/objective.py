"""What every pretraining objective provides, so pipelines can train any of them the same way.

An objective is an ``nn.Module`` that owns the encoder (``.encoder``, a
:class:`~caries_mim.models.VisionTransformer`) plus whatever it needs only for pretraining (decoder, mask token,
prediction head, projector, momentum branch). Its forward takes a batch of ``views`` views per image and returns
an :class:`ObjectiveOutput` with the loss; :meth:`PretrainingObjective.after_update` runs after each optimizer
step (a momentum branch follows the encoder there). Masked-image-modeling objectives also turn a forward into
pictures (:meth:`MaskedImageObjective.reconstruct`). Hyper-parameters live in a frozen dataclass (``Options``) so
configs are validated by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from caries_mim.errors import InvalidConfigError
from caries_mim.mim.patches import patchify, unpatchify
from caries_mim.models.vit import VisionTransformer
from caries_mim.typed_values import dataclass_kwargs

#: Gray level that marks removed patches in the "masked" picture (a black patch would look like background).
MASKED_FILL = 0.5


@dataclass
class ObjectiveOutput:
    """One forward pass of a pretraining objective.

    Attributes:
        loss: scalar, what is optimized.
        parts: named scalars the loss is made of, logged beside it (a hybrid's contrastive and MIM terms).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict, kw_only=True)


@dataclass
class MIMOutput(ObjectiveOutput):
    """One forward pass of a masked-image-modeling objective.

    Attributes:
        loss: scalar, averaged over removed patches only.
        mask: (B, N) float, 1 = removed (predicted), 0 = visible; N = patches of the input grid, row-major.
        prediction: (B, N, p*p*C) the objective's prediction in its target space (e.g. per-patch normalized
            pixels for MAE with ``norm_pix_loss``; see :meth:`MaskedImageObjective.prediction_to_pixels`). Only
            removed patches are defined: an objective may leave visible ones zero (MAE does not predict them).
        grid: (rows, columns) patch grid.
    """

    mask: torch.Tensor
    prediction: torch.Tensor
    grid: tuple[int, int]


@dataclass
class Reconstruction:
    """Pictures of one forward pass, all (B, C, H, W) float in [0, 1].

    Attributes:
        original: the input.
        masked: the input with removed patches painted :data:`MASKED_FILL`.
        reconstruction: visible patches from the input, removed ones from the prediction (MAE's convention for
            showing what the model filled in).
    """

    original: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor


class PretrainingObjective(nn.Module):
    """Base class: subclasses set ``name``, ``Options`` and ``views`` and implement :meth:`forward`."""

    name: ClassVar[str]
    Options: ClassVar[type]
    #: Augmented views of each image a batch holds: 1, (B, C, H, W) batches; 2, (B, 2, C, H, W) (two-view objectives).
    views: ClassVar[int] = 1

    def __init__(self, encoder: VisionTransformer) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: torch.Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def after_update(self, progress: float) -> None:
        """After each optimizer step, ``progress`` in [0, 1] of the run; nothing unless the objective needs it."""

    def diagnostics(self, batch: torch.Tensor) -> dict[str, float]:
        """Named measurements on ``batch`` that the pipeline logs beside the loss now and then; none by default."""
        return {}


class MaskedImageObjective(PretrainingObjective):
    """Base class of masked image modeling: one view per image, and pictures of what it reconstructs."""

    def forward(self, images: torch.Tensor) -> MIMOutput:
        """(B, C, H, W) float images in [0, 1], sides multiples of the patch size -> :class:`MIMOutput`."""
        raise NotImplementedError

    def prediction_to_pixels(self, prediction: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
        """Map ``prediction`` (B, N, p*p*C) from target space to pixel space; ``target_patches`` are the input's
        patches (what per-patch normalizations are undone with). Identity unless the objective normalizes."""
        return prediction

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> Reconstruction:
        """Run a forward pass and paint its mask and prediction (the model's train/eval mode is left alone)."""
        output = self(images)
        p = self.encoder.patch_size
        patches = patchify(images, p)
        removed = output.mask.unsqueeze(-1).to(patches.dtype)  # (B, N, 1)
        predicted = self.prediction_to_pixels(output.prediction.to(patches.dtype), patches)
        masked = patches * (1 - removed) + MASKED_FILL * removed
        filled = patches * (1 - removed) + predicted * removed
        return Reconstruction(
            original=images,
            masked=unpatchify(masked, output.grid, p),
            reconstruction=unpatchify(filled, output.grid, p).clamp(0.0, 1.0),
        )


def options_from_dict(options_type: type, values: dict[str, Any] | None, context: str) -> Any:
    """Build an ``Options`` dataclass from a config mapping; unknown keys and bad values name themselves."""
    checked, unknown, problems = dataclass_kwargs(options_type, dict(values or {}))
    if unknown:
        known = ", ".join(sorted(field.name for field in dataclasses.fields(options_type)))
        raise InvalidConfigError(f"{context}: unknown key(s) {', '.join(unknown)} (known: {known})")
    if problems:
        key, problem = next(iter(problems.items()))
        raise InvalidConfigError(f"{context}: {key}: {problem}")
    try:
        return options_type(**checked)
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{context}: {exc}") from None
