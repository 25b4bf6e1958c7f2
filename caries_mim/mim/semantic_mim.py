"""SemanticMIM's proxy architecture on MAE (yyk-wew/SemanticMIM): compression and reconstruction kept apart.

In MAE the decoder's mask tokens read the encoded image tokens directly, so the encoder can hand local texture
straight to the reconstruction. SemanticMIM cuts that path:

- *Compression.* A few proxy tokens (the encoder's CLS token and ``proxy_tokens - 1`` extra learned ones) travel
  with the visible patch tokens through the encoder; every token of that stack attends to every other, as in MAE.
- *Reconstruction.* A parallel stack of the encoder's depth and width carries one mask token per removed patch
  (a learned token plus that patch's position). Its layer i attends to the proxy tokens as the encoder's layer i
  left them and to the mask tokens themselves, never to an image token; so whatever the reconstruction needs about
  the visible patches must pass through the proxies, which is what makes them (and the encoder under them) carry
  image-level semantics.
- The loss is MAE's own: MSE on the removed patches' (per-patch normalized) pixels, from the last mask-token states
  through a LayerNorm and one linear layer.

After pretraining the parallel stack, the extra proxies and the head are dropped; only ``encoder`` is saved (its CLS
token was the first proxy). Shapes: B images, N patches, K visible, R = N - K removed, P proxies, D encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caries_mim.mim.mae import masked_pixel_loss, norm_pix_to_pixels, scatter_removed, split_visible
from caries_mim.mim.objective import MaskedImageObjective, MIMOutput
from caries_mim.models.vit import Block, VisionTransformer


@dataclass(frozen=True)
class SemanticMIMOptions:
    """``proxy_tokens`` counts the encoder's CLS token (1: the CLS alone, SemanticMIM's BEiT setting; 8: its
    MaskFeat setting, the default here); the mask ratio is MAE's (SemanticMIM used 0.6-0.8)."""

    mask_ratio: float = 0.75
    proxy_tokens: int = 8
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.proxy_tokens < 1:
            raise ValueError(f"proxy_tokens must be >= 1 (the CLS token is the first), got {self.proxy_tokens}")


class SemanticMIM(MaskedImageObjective):
    """MAE with SemanticMIM's proxy tokens and parallel mask-token stack, around a :class:`VisionTransformer`."""

    name = "semantic_mim"
    Options = SemanticMIMOptions

    def __init__(self, encoder: VisionTransformer, options: SemanticMIMOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options = options or SemanticMIMOptions()
        config = encoder.config
        width = config.embed_dim
        # The proxies beyond the CLS token; zero of them with proxy_tokens=1.
        self.extra_proxies = nn.Parameter(torch.zeros(1, options.proxy_tokens - 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_blocks = nn.ModuleList(
            Block(width, config.num_heads, config.mlp_ratio, config.qkv_bias, 0.0, config.layer_norm_eps)
            for _ in range(config.depth)
        )
        self.mask_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.predict = nn.Linear(width, config.patch_size**2 * config.in_channels)
        nn.init.normal_(self.extra_proxies, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.predict, *self.mask_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def proxy_count(self) -> int:
        return self.options.proxy_tokens

    def compress(self, visible: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Encode visible patch tokens (B, K, D), positions added, with the proxies; return each encoder layer's
        output (B, 1 + P - 1 + K, D): the CLS token, the extra proxies, then the visible tokens. The last is the
        encoder's output (through its final norm, as fine-tuning and analysis read it), so every encoder weight
        is trained (DDP also requires that every parameter gets a gradient)."""
        extra = self.extra_proxies.expand(visible.shape[0], -1, -1)
        depth = len(self.encoder.blocks)
        output = self.encoder.encode(torch.cat([extra, visible], dim=1), grid, hidden_blocks=range(depth - 1))
        return [*(output.hidden[index] for index in range(depth - 1)), output.tokens]

    def reconstruct_removed(self, layers: list[torch.Tensor], mask_tokens: torch.Tensor) -> torch.Tensor:
        """The parallel stack: ``mask_tokens`` (B, R, D) through one block per encoder layer, layer i attending to
        the first P tokens of ``layers[i]`` (the proxies after encoder layer i) and to the mask tokens, nothing
        else. Returns the final mask-token states (B, R, D), before the head's norm."""
        proxies = self.proxy_count
        removed = mask_tokens.shape[1]
        # Positions P .. P + R - 1 of [proxies, mask tokens]: the queries; the proxies are keys and values only.
        index = torch.arange(proxies, proxies + removed, device=mask_tokens.device)
        index = index.view(1, removed, 1).expand(mask_tokens.shape[0], -1, mask_tokens.shape[2])
        states = mask_tokens
        for block, layer in zip(self.mask_blocks, layers, strict=True):
            states = block.forward_selected(torch.cat([layer[:, :proxies], states], dim=1), index)
        return states

    def forward(self, images: torch.Tensor) -> MIMOutput:
        encoder = self.encoder
        tokens, grid = encoder.embed_patches(images)  # (B, N, D)
        positions = encoder.position_embedding(grid)  # (1, N, D)
        split = split_visible(tokens + positions, self.options.mask_ratio)
        layers = self.compress(split.visible, grid)
        batch, num_patches, dim = tokens.shape
        index = split.removed.unsqueeze(-1).expand(-1, -1, dim)
        removed_positions = positions.expand(batch, -1, -1).gather(1, index)  # (B, R, D)
        states = self.reconstruct_removed(layers, self.mask_token + removed_positions)
        predicted = self.predict(self.mask_norm(states))  # (B, R, p*p*C)
        prediction = scatter_removed(predicted, split.removed, num_patches)
        loss = masked_pixel_loss(prediction, images, split.mask, encoder.patch_size, self.options.norm_pix_loss)
        return MIMOutput(loss=loss, mask=split.mask, prediction=prediction, grid=grid)

    def prediction_to_pixels(self, prediction: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
        """Undo norm-pix with the input patch's own mean/std (as MAE shows it), else identity."""
        return norm_pix_to_pixels(prediction, target_patches, self.options.norm_pix_loss)
