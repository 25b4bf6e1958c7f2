"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al. 2021), after facebookresearch/mae.

Per image, a random 75% of the patches are removed; the encoder sees only the visible quarter (where MAE's
speed comes from), a light decoder receives the encoded tokens plus one shared mask token per removed patch, and
regresses the removed patches' pixels. The loss is the MSE on removed patches only, optionally against each
patch normalized by its own mean and variance (``norm_pix_loss``, MAE's default for better features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caries_mim.errors import InvalidArgumentError
from caries_mim.mim.objective import MaskedImageObjective, MIMOutput
from caries_mim.mim.patches import patchify
from caries_mim.models.position import resample_position_embedding, sincos_position_embedding
from caries_mim.models.vit import Block, VisionTransformer

#: MAE's variance epsilon for per-patch target normalization.
NORM_PIX_EPS = 1e-6


@dataclass(frozen=True)
class MAEOptions:
    """MAE hyper-parameters (reference decoder: 512 wide, 8 deep; MAE's ablation shows 1-2 blocks suffice for
    fine-tuning quality, so small configs use fewer)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 1 or self.decoder_heads < 1 or self.decoder_dim % self.decoder_heads:
            raise ValueError("decoder_depth and decoder_heads must be >= 1, decoder_dim a multiple of decoder_heads")
        if self.decoder_dim % 4:
            raise ValueError(f"decoder_dim must be a multiple of 4, got {self.decoder_dim}")


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample uniform random masking with exactly ``int(N * (1 - mask_ratio))`` visible patches each.

    Returns:
        keep: (B, K) long indices of visible patches, in random order.
        mask: (B, N) float, 1 = removed, 0 = visible, in original patch order.
        restore: (B, N) long, the permutation that puts [visible..., removed...] back into patch order.
    """
    keep_count = int(num_patches * (1 - mask_ratio))
    if keep_count < 1 or keep_count >= num_patches:
        raise InvalidArgumentError(
            f"masking {mask_ratio:.0%} of {num_patches} patch(es) leaves {keep_count} visible: the image is too small "
            "for this mask ratio (MAE needs some patches kept and some removed)"
        )
    noise = torch.rand(batch, num_patches, device=device)
    shuffle = noise.argsort(dim=1)  # ascending: the first keep_count are kept
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :keep_count]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep_count] = 0
    return keep, mask.gather(1, restore), restore


@dataclass(frozen=True)
class VisibleSplit:
    """Patch tokens split by :func:`random_masking`: ``visible`` (B, K, D) the kept tokens (in ``keep``'s order),
    ``mask`` (B, N) 1 = removed, ``restore`` (B, N) the permutation back to patch order, ``removed`` (B, R) the
    removed patches' indices."""

    visible: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor
    removed: torch.Tensor


def split_visible(tokens: torch.Tensor, mask_ratio: float) -> VisibleSplit:
    """Mask (B, N, D) patch tokens (positions already added) per sample with :func:`random_masking`."""
    batch, num_patches, dim = tokens.shape
    keep, mask, restore = random_masking(batch, num_patches, mask_ratio, tokens.device)
    visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
    removed = restore.argsort(dim=1)[:, keep.shape[1] :]
    return VisibleSplit(visible=visible, mask=mask, restore=restore, removed=removed)


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch standardization (B, N, V) -> (normalized, mean (B, N, 1), std (B, N, 1)), as MAE computes it."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return (patches - mean) / std, mean, std


def scatter_removed(predicted: torch.Tensor, removed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Predictions (B, R, V) of the removed patches ``removed`` (B, R) -> (B, N, V) in patch order, zero elsewhere."""
    prediction = predicted.new_zeros(predicted.shape[0], num_patches, predicted.shape[-1])
    return prediction.scatter(1, removed.unsqueeze(-1).expand_as(predicted), predicted)


def masked_pixel_loss(
    prediction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> torch.Tensor:
    """MAE's loss: the MSE between ``prediction`` (B, N, p*p*C) and the patches of ``images`` (B, C, H, W; each
    patch standardized when ``norm_pix_loss``), per patch, averaged over the removed ones (``mask`` (B, N) = 1)."""
    target = patchify(images, patch_size)  # (B, N, p*p*C)
    if norm_pix_loss:
        target = normalize_patches(target)[0]
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def norm_pix_to_pixels(prediction: torch.Tensor, target_patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """Undo norm-pix with the input patch's own mean/std (MAE's visualization), else identity."""
    if not norm_pix_loss:
        return prediction
    _, mean, std = normalize_patches(target_patches)
    return prediction * std + mean


class MaskedAutoencoder(MaskedImageObjective):
    """MAE around a :class:`~caries_mim.models.VisionTransformer`."""

    name = "mae"
    Options = MAEOptions

    def __init__(self, encoder: VisionTransformer, options: MAEOptions | None = None) -> None:
        super().__init__(encoder)
        self.options = options = options or MAEOptions()
        config = encoder.config
        width = options.decoder_dim
        self.decoder_embed = nn.Linear(config.embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer(
            "decoder_pos_embed",
            torch.cat([torch.zeros(1, width), sincos_position_embedding(width, config.grid_size)]).unsqueeze(0),
        )
        self.decoder_blocks = nn.ModuleList(
            Block(width, options.decoder_heads, 4.0, True, 0.0, config.layer_norm_eps)
            for _ in range(options.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, config.patch_size**2 * config.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> MIMOutput:
        encoder = self.encoder
        tokens, grid = encoder.embed_patches(images)  # (B, N, D)
        split = split_visible(tokens + encoder.position_embedding(grid), self.options.mask_ratio)
        latent = encoder.encode(split.visible, grid).tokens  # (B, 1 + K, D)
        prediction = self._decode(latent, split.restore, split.removed, grid)  # (B, N, p*p*C)

        loss = masked_pixel_loss(prediction, images, split.mask, encoder.patch_size, self.options.norm_pix_loss)
        return MIMOutput(loss=loss, mask=split.mask, prediction=prediction, grid=grid)

    def _decode(
        self, latent: torch.Tensor, restore: torch.Tensor, removed: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """(B, 1 + K, D) encoded CLS + visible tokens -> (B, N, p*p*C) predictions, zero on visible patches.

        Only removed patches are predicted: the loss and :meth:`reconstruct` never read the others. Every token
        still goes through all blocks but the last, where the CLS and visible tokens are only keys and values, so
        that block's queries, projection and MLP, and the prediction head, run on the R removed tokens only (the
        loss and every gradient are those of predicting all N).
        """
        tokens = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        batch, visible_plus_cls, width = tokens.shape
        num_patches = restore.shape[1]
        fill = self.mask_token.expand(batch, num_patches + 1 - visible_plus_cls, width)
        shuffled = torch.cat([tokens[:, 1:], fill], dim=1)  # (B, N, Dd) in [visible..., removed...] order
        patches = shuffled.gather(1, restore.unsqueeze(-1).expand(-1, -1, width))  # back to patch order
        positions = resample_position_embedding(self.decoder_pos_embed[:, 1:], self.encoder.config.grid_size, grid)
        tokens = torch.cat([tokens[:, :1] + self.decoder_pos_embed[:, :1], patches + positions], dim=1)
        *blocks, last = self.decoder_blocks
        for block in blocks:
            tokens = block(tokens)[0]
        index = (removed + 1).unsqueeze(-1).expand(-1, -1, width)  # token 0 is CLS
        predicted = self.decoder_pred(self.decoder_norm(last.forward_selected(tokens, index)))  # (B, R, p*p*C)
        return scatter_removed(predicted, removed, num_patches)

    def prediction_to_pixels(self, prediction: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
        """Undo norm-pix with the input patch's own mean/std (MAE's visualization), else identity."""
        return norm_pix_to_pixels(prediction, target_patches, self.options.norm_pix_loss)
