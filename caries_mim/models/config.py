"""Architecture of a ViT encoder as a small, serializable config, and the registry of named sizes.

An encoder file (``encoder.pt``) stores :meth:`ViTConfig.to_dict` beside the weights, so nothing else is needed to
rebuild the network: not the training config, not this package's defaults at the time of training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from caries_mim.errors import InvalidArgumentError
from caries_mim.typed_values import checked_kwargs

#: Named sizes: (embed_dim, depth, num_heads), the ViT paper / timm / MAE widths. ``vit_large`` exists so official
#: MAE ViT-L checkpoints can be imported.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass(frozen=True)
class ViTConfig:
    """Everything that determines a ViT encoder's parameter shapes and forward computation.

    Attributes:
        image_size: (height, width) in pixels of the reference grid; the stored position embedding covers
            ``image_size / patch_size`` patches, other input sizes interpolate it.
        patch_size: side of a square patch in pixels.
        in_channels: image channels (1 for radiographs).
        embed_dim, depth, num_heads: width, number of blocks, attention heads.
        mlp_ratio: hidden width of each block's MLP as a multiple of ``embed_dim``.
        qkv_bias: bias on the query/key/value projection (MAE and timm: yes).
        drop_path_rate: stochastic depth at the last block, rising linearly from 0 at the first.
        layer_norm_eps: LayerNorm epsilon (1e-6 as in MAE, so imported weights behave identically).
        input_mean, input_std: images in [0, 1] enter the patch projection as ``(x - input_mean) / input_std``.
            A fixed affine map before a linear layer changes no function the encoder can represent, but it
            changes training: zero-centred inputs keep Adam's updates of the patch weights from shifting every
            token alike. A short MAE run leaves its "predict each image's mean" plateau ~500 steps earlier with
            it (REFERENCES: MAE and SimMIM standardize their inputs too).
    """

    #: An int means a square; stored as (height, width) either way.
    image_size: tuple[int, int] | int = (224, 224)
    patch_size: int = 16
    in_channels: int = 1
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    input_mean: float = 0.5
    input_std: float = 0.25

    def __post_init__(self) -> None:
        size = _pair(self.image_size)
        object.__setattr__(self, "image_size", size)
        problems = []
        if self.patch_size < 1 or any(side < self.patch_size or side % self.patch_size for side in size):
            problems.append(f"image_size {size} must be a positive multiple of patch_size {self.patch_size}")
        if self.in_channels < 1 or self.depth < 1 or self.num_heads < 1:
            problems.append("in_channels, depth and num_heads must be >= 1")
        if self.num_heads >= 1 and (self.embed_dim < 1 or self.embed_dim % self.num_heads):
            problems.append(f"embed_dim {self.embed_dim} must be a positive multiple of num_heads {self.num_heads}")
        if self.embed_dim % 4:
            problems.append(f"embed_dim {self.embed_dim} must be a multiple of 4 (2D sin-cos position embedding)")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not self.input_std > 0:
            problems.append(f"input_std must be > 0, got {self.input_std}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if problems:
            raise InvalidArgumentError("invalid ViT config: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patches at ``image_size``."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, numbers, bools), loadable with ``torch.load(weights_only=True)`` and YAML."""
        values = dataclasses.asdict(self)
        values["image_size"] = list(self.image_size)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        """Inverse of :meth:`to_dict`; an unknown key or a value of the wrong type is an error that names it."""
        return cls(**checked_kwargs(cls, values, "ViT config"))

    @classmethod
    def named(cls, name: str, **overrides: Any) -> ViTConfig:
        """A named size (see :data:`VIT_SIZES`) with optional overrides, e.g. ``named("vit_small", patch_size=8)``."""
        if name not in VIT_SIZES:
            raise InvalidArgumentError(f"unknown ViT size {name!r}; choose one of {', '.join(VIT_SIZES)}")
        embed_dim, depth, num_heads = VIT_SIZES[name]
        return cls.from_dict({"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **overrides})


def _pair(value: Any) -> tuple[int, int]:
    """An int or a 2-sequence of ints -> (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise InvalidArgumentError(f"image_size must be an int or [height, width], got {value!r}")
