"""Import official MAE (facebookresearch/mae) ImageNet checkpoints into the 1-channel encoder.

MAE checkpoints use timm's key layout under ``"model"``: ``patch_embed.proj.{weight,bias}``, ``cls_token``,
``pos_embed`` (1, 1 + N, D, frozen sin-cos), ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
``norm.*``, plus the pretraining decoder (``decoder_*``, ``mask_token``) or, in fine-tuned ones, ``fc_norm.*`` and
``head.*``. Every source key ends up in exactly one bucket of the :class:`ImportReport`; nothing is dropped silently.

Two adaptations:

- **RGB -> gray patch projection.** MAE saw RGB normalized with ImageNet mean/std. A gray image g in [0, 1] shown
  as (g, g, g) gives ``sum_c W_c (g - m_c) / s_c``; folding that in (weight ``sum_c W_c / s_c``, bias
  ``b - sum_c sum(W_c) m_c / s_c``) makes the imported encoder see our [0, 1] radiographs exactly as MAE saw a gray
  picture. ``fold_imagenet_normalization=False`` gives the plain channel sum (timm's ``adapt_input_conv``).
  Either gray projection (weight G, bias b acting on g) is then re-expressed for the encoder's standardized input
  x = (g - mean) / std (:attr:`ViTConfig.input_mean`, ``input_std``): weight ``std * G``, bias ``b + mean *
  sum(G)``, so the function of g does not change. A 1-channel projection is taken as it is.
- **Position embedding** resampled from the checkpoint's square grid to the encoder's reference grid.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from caries_mim.errors import InvalidCheckpointError
from caries_mim.models.encoder_file import read_weights_file
from caries_mim.models.position import resample_position_embedding
from caries_mim.models.vit import VisionTransformer

MAE_CHECKPOINT_DESCRIPTION = "an MAE checkpoint (.pth, e.g. the official mae_pretrain_vit_base.pth) or a state dict"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Source keys that are expected in MAE files and have no place in an encoder, with the reason.
_NOT_ENCODER = (
    (re.compile(r"^(decoder_|mask_token$)"), "MAE pretraining decoder"),
    (re.compile(r"^(head|fc_norm)\."), "classification head of a fine-tuned checkpoint"),
)


@dataclass
class ImportReport:
    """Where every key went.

    Attributes:
        mapped: encoder keys filled from the checkpoint unchanged.
        adapted: encoder key -> how its value was transformed (channel folding, grid resampling).
        dropped: source key -> why it is not used (decoder, classifier head).
        unexpected: source keys that look like encoder weights but have no place in this encoder (e.g. blocks
            beyond its depth).
        missing: encoder keys the checkpoint did not provide (left at their initialization).
    """

    mapped: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapped": self.mapped,
            "adapted": self.adapted,
            "dropped": self.dropped,
            "unexpected": self.unexpected,
            "missing": self.missing,
        }

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} mapped, {len(self.adapted)} adapted, {len(self.dropped)} dropped, "
            f"{len(self.unexpected)} unexpected, {len(self.missing)} missing"
        )


def import_mae_weights(
    encoder: VisionTransformer,
    source: str | os.PathLike | dict[str, Any],
    *,
    fold_imagenet_normalization: bool = True,
    strict: bool = True,
) -> ImportReport:
    """Load an MAE / timm ViT checkpoint (file or dict) into ``encoder`` in place.

    Args:
        source: a ``.pth`` path or an already loaded dict (a bare state dict, or one under ``"model"`` /
            ``"state_dict"``; a ``module.`` prefix from DDP is stripped).
        fold_imagenet_normalization: see the module docstring.
        strict: raise when an encoder key is missing or a source key is unexpected (the report is in the message).
    Raises:
        InvalidCheckpointError: unreadable file, a shape that cannot be adapted (other width or patch size), or
            ``strict`` and an incomplete mapping.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_weights_file(source, MAE_CHECKPOINT_DESCRIPTION)
    state = _state_dict_of(source)
    targets = encoder.state_dict()
    report = ImportReport()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        reason = next((why for pattern, why in _NOT_ENCODER if pattern.search(key)), None)
        if reason is not None:
            report.dropped[key] = reason
        elif key not in targets:
            report.unexpected.append(key)
        elif key in ("patch_embed.proj.weight", "pos_embed"):
            if key == "pos_embed":
                loaded[key], note = _adapt_position_embedding(value, targets[key], encoder.config.grid_size)
            else:
                loaded[key], note = _adapt_patch_projection(value, targets[key], fold_imagenet_normalization)
            if note is None:
                report.mapped.append(key)
            else:
                report.adapted[key] = note
        else:
            if value.shape != targets[key].shape:
                raise _shape_mismatch(key, value, targets[key])
            loaded[key] = value
            report.mapped.append(key)
    rgb_to_gray = report.adapted.get("patch_embed.proj.weight", "").startswith("RGB")
    if rgb_to_gray:
        gray = loaded["patch_embed.proj.weight"]  # acts on raw gray pixels g in [0, 1]
        loaded["patch_embed.proj.weight"] = gray * encoder.config.input_std
        report.adapted["patch_embed.proj.weight"] += ", scaled for the encoder's standardized input"
        if "patch_embed.proj.bias" in loaded:
            bias = loaded["patch_embed.proj.bias"] + encoder.config.input_mean * gray.sum(dim=(1, 2, 3))
            note = "plus the standardization offset"
            if fold_imagenet_normalization:
                bias = bias - _imagenet_offset(state["patch_embed.proj.weight"])
                note = "minus the folded ImageNet mean offset of the RGB weights, " + note
            loaded["patch_embed.proj.bias"] = bias
            report.mapped.remove("patch_embed.proj.bias")
            report.adapted["patch_embed.proj.bias"] = note
    report.missing = sorted(set(targets) - set(loaded))
    if strict and (report.missing or report.unexpected):
        raise InvalidCheckpointError(
            "checkpoint does not fit the encoder: "
            + "; ".join(
                part
                for part in (
                    f"missing {_preview(report.missing)}" if report.missing else "",
                    f"unexpected {_preview(report.unexpected)}" if report.unexpected else "",
                )
                if part
            )
            + " (pass strict=False to load what fits)"
        )
    with torch.no_grad():
        for key, value in loaded.items():
            targets[key].copy_(value.to(targets[key].dtype))
    return report


def _state_dict_of(payload: Any) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(payload.get(wrapper), dict):
                payload = payload[wrapper]
                break
    if not isinstance(payload, dict) or not all(isinstance(value, torch.Tensor) for value in payload.values()):
        raise InvalidCheckpointError("not a state dict of tensors (expected MAE's {'model': {...}} layout)")
    return {key.removeprefix("module."): value for key, value in payload.items()}


def _shape_mismatch(key: str, value: torch.Tensor, target: torch.Tensor) -> InvalidCheckpointError:
    return InvalidCheckpointError(
        f"{key}: checkpoint shape {tuple(value.shape)} does not fit the encoder's {tuple(target.shape)} "
        "(another ViT size?)"
    )


def _adapt_patch_projection(value: torch.Tensor, target: torch.Tensor, fold: bool) -> tuple[torch.Tensor, str | None]:
    """(D, C_src, p, p) -> (D, C_target, p, p) and a note (None = unchanged); only RGB -> 1 channel changes it."""
    if value.shape == target.shape:
        return value, None
    rgb_to_gray = value.shape[1] == 3 and target.shape[1] == 1
    if not rgb_to_gray or value.shape[0] != target.shape[0] or value.shape[2:] != target.shape[2:]:
        raise _shape_mismatch("patch_embed.proj.weight", value, target)
    if fold:
        std = torch.tensor(IMAGENET_STD, dtype=value.dtype).view(1, 3, 1, 1)
        return (value / std).sum(dim=1, keepdim=True), "RGB summed to 1 channel with ImageNet mean/std folded in"
    return value.sum(dim=1, keepdim=True), "RGB summed to 1 channel"


def _imagenet_offset(rgb_weight: torch.Tensor) -> torch.Tensor:
    """(D,) bias change for a gray input: sum over channels and pixels of W_c * mean_c / std_c."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb_weight.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb_weight.dtype).view(1, 3, 1, 1)
    return (rgb_weight * mean / std).sum(dim=(1, 2, 3))


def _adapt_position_embedding(
    value: torch.Tensor, target: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, str | None]:
    """(1, [1 +] n*n, D) square-grid embedding -> (1, 1 + rows*cols, D) on the encoder's grid, and a note (None =
    unchanged)."""
    if value.dim() != 3 or value.shape[-1] != target.shape[-1]:
        raise _shape_mismatch("pos_embed", value, target)
    positions = value.shape[1]
    for prefix in (1, 0):
        side = math.isqrt(positions - prefix)
        if side * side == positions - prefix:
            break
    else:
        raise InvalidCheckpointError(f"pos_embed: {positions} positions do not form a square grid (+ CLS)")
    cls_slot = value[:, :1] if prefix else torch.zeros_like(target[:, :1])
    patches = resample_position_embedding(value[:, prefix:], (side, side), grid)
    if (side, side) == tuple(grid) and prefix:
        return value, None
    return torch.cat([cls_slot, patches], dim=1), f"resampled from a {side}x{side} grid to {grid[0]}x{grid[1]}"


def _preview(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} key(s): {shown}" + (", ..." if len(keys) > limit else "")
