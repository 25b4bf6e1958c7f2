"""Vision Transformer encoder for single-channel radiographs (timm/MAE parameter names, fused attention).

Shapes used throughout: B images, C channels, H x W pixels, p patch side, grid (rows, columns) = (H/p, W/p),
N = rows * columns patch tokens, M <= N tokens actually encoded (MAE encodes only the visible ones), D width.
Token sequences the blocks see are (B, 1 + M, D): the CLS token first, then patch tokens in row-major grid order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from caries_mim.errors import InvalidArgumentError
from caries_mim.models.config import ViTConfig
from caries_mim.models.position import resample_position_embedding, sincos_position_embedding


class PatchEmbedding(nn.Module):
    """(B, C, H, W) images in [0, 1] -> (B, N, D) patch tokens: standardized as ``(x - mean) / std``, then one
    linear projection per non-overlapping p x p patch."""

    def __init__(
        self, patch_size: int, in_channels: int, embed_dim: int, input_mean: float = 0.0, input_std: float = 1.0
    ) -> None:
        super().__init__()
        self.input_mean = input_mean
        self.input_std = input_std
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        standardized = (images - self.input_mean) / self.input_std
        return self.proj(standardized).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, D) tokens with one fused qkv projection.

    The training path calls :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
    kernels on GPU, a fused kernel on CPU). Asking for the attention probabilities takes the explicit
    softmax(QK^T / sqrt(d)) V path instead, which computes the same values but materializes the (T, T) map.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> ((B, T, D), attention probabilities (B, heads, T, T) in [0, 1] or None)."""
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if return_attention:
            scores = (query * self.head_dim**-0.5) @ key.transpose(-2, -1)
            attention = scores.float().softmax(dim=-1).to(value.dtype)
            mixed = attention @ value
        else:
            attention = None
            mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, dim)), attention

    def forward_selected(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Attention output (B, R, D) for the tokens that ``index`` (B, R, D), a :func:`torch.gather` index along
        dim 1, selects; every token is still a key and a value. Equals ``forward(tokens)[0].gather(1, index)``
        without computing the queries and the output projection of the other tokens."""
        batch, length, dim = tokens.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        query = F.linear(tokens.gather(1, index), weight[:dim], None if bias is None else bias[:dim])
        key_value = F.linear(tokens, weight[dim:], None if bias is None else bias[dim:])
        count = index.shape[1]
        query = query.view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)
        key, value = key_value.view(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, count, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed, attention = self.attn(self.norm1(tokens), return_attention)
        tokens = tokens + self.drop_path(mixed)
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens, attention

    def forward_selected(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Block output (B, R, D) for the tokens ``index`` selects (see :meth:`Attention.forward_selected`); equals
        ``forward(tokens)[0].gather(1, index)``, with the MLP run on the selected tokens only."""
        selected = tokens.gather(1, index) + self.drop_path(self.attn.forward_selected(self.norm1(tokens), index))
        return selected + self.drop_path(self.mlp(self.norm2(selected)))


@dataclass
class EncoderOutput:
    """What :class:`VisionTransformer` returns.

    Attributes:
        tokens: (B, 1 + M, D) after the final LayerNorm; index 0 is the CLS token.
        grid: (rows, columns) of the patch grid of the input images.
        hidden: block index -> (B, 1 + M, D) output of that block (before the final norm), for requested blocks.
        attention: block index -> (B, heads, 1 + M, 1 + M) attention probabilities, for requested blocks.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def patch_tokens(self) -> torch.Tensor:
        """(B, M, D): every token but CLS."""
        return self.tokens[:, 1:]

    def feature_map(self, block: int | None = None) -> torch.Tensor:
        """(B, D, rows, columns) map of the final tokens, or of ``hidden[block]``; needs all N patches encoded."""
        tokens = self.tokens if block is None else self.hidden[block]
        patches = tokens[:, 1:]
        rows, columns = self.grid
        if patches.shape[1] != rows * columns:
            raise ValueError(f"{patches.shape[1]} tokens cannot form the {rows}x{columns} grid (masked input?)")
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], rows, columns)


class VisionTransformer(nn.Module):
    """ViT encoder (CLS token, fixed 2D sin-cos position embedding, pre-norm blocks, final LayerNorm).

    Parameter names follow timm / MAE (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``,
    ``norm``) so imported weights map one to one (see :mod:`caries_mim.models.mae_import`). Any input whose sides
    are multiples of the patch size works: the position embedding is resampled to its grid.

    Three entry points, so MIM objectives can change what the blocks see without re-implementing the encoder:
    :meth:`embed_patches` (pixels to tokens), :meth:`position_embedding` (for a grid) and :meth:`encode` (CLS +
    blocks + norm over whichever patch tokens the caller chose). :meth:`forward` chains them for plain encoding.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbedding(
            config.patch_size, config.in_channels, dim, config.input_mean, config.input_std
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, not learned (MAE): a buffer, so optimizers never see it, but saved with the weights. Slot 0 is the
        # CLS token's (zeros), as in MAE checkpoints.
        patch_positions = sincos_position_embedding(dim, config.grid_size)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), patch_positions]).unsqueeze(0))
        drop_rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias, rate, config.layer_norm_eps)
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialization: xavier-uniform linears (the patch projection treated as one), N(0, 0.02) CLS.
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.config.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, columns) for an H x W input; sides must be multiples of the patch size."""
        p = self.config.patch_size
        if height % p or width % p or height < p or width < p:
            raise InvalidArgumentError(f"input {height}x{width} is not a positive multiple of the patch size {p}")
        return height // p, width // p

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, rows * columns, D) patch position embedding for ``grid`` (resampled from the reference grid)."""
        return resample_position_embedding(self.pos_embed[:, 1:], self.config.grid_size, grid)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (patch tokens (B, N, D) without position embedding, grid (rows, columns))."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise InvalidArgumentError(
                f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        return self.patch_embed(images), grid

    def encode(
        self,
        patch_tokens: torch.Tensor,
        grid: tuple[int, int],
        *,
        hidden_blocks: Sequence[int] = (),
        attention_blocks: Sequence[int] = (),
    ) -> EncoderOutput:
        """Run CLS + blocks + final norm over ``patch_tokens`` (B, M, D) that already carry their positions.

        Args:
            hidden_blocks: block indices (negative counts from the end) whose outputs to return.
            attention_blocks: block indices whose attention probabilities to return (slower path).
        """
        keep_hidden = self._block_indices(hidden_blocks)
        keep_attention = self._block_indices(attention_blocks)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, patch_tokens], dim=1)
        output = EncoderOutput(tokens=tokens, grid=grid)
        for index, block in enumerate(self.blocks):
            tokens, attention = block(tokens, return_attention=index in keep_attention)
            if attention is not None:
                output.attention[index] = attention
            if index in keep_hidden:
                output.hidden[index] = tokens
        output.tokens = self.norm(tokens)
        return output

    def _block_indices(self, indices: Sequence[int]) -> set[int]:
        depth = len(self.blocks)
        outside = [index for index in indices if not -depth <= index < depth]
        if outside:
            raise InvalidArgumentError(f"block index {outside[0]} out of range for an encoder of depth {depth}")
        return {index % depth for index in indices}

    def forward(
        self, images: torch.Tensor, *, hidden_blocks: Sequence[int] = (), attention_blocks: Sequence[int] = ()
    ) -> EncoderOutput:
        """Encode (B, C, H, W) images (any sides divisible by the patch size) with every patch visible."""
        patches, grid = self.embed_patches(images)
        patches = patches + self.position_embedding(grid)
        return self.encode(patches, grid, hidden_blocks=hidden_blocks, attention_blocks=attention_blocks)


def build_encoder(size_or_config: str | ViTConfig, **overrides: object) -> VisionTransformer:
    """A fresh encoder from a named size (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``) or a config."""
    if isinstance(size_or_config, ViTConfig):
        config = size_or_config if not overrides else ViTConfig.from_dict({**size_or_config.to_dict(), **overrides})
    else:
        config = ViTConfig.named(size_or_config, **overrides)
    return VisionTransformer(config)
