"""Where a ViT's heads look: mean attention distance and the mutual information between queries and keys.

Both follow naver-ai/cl-vs-mim. Attention maps are (B, heads, T, T) probabilities (rows sum to 1) over ``prefix``
non-patch tokens (CLS, proxies) then the rows x columns patch tokens in row-major order. Only patch-to-patch
attention is measured: each patch query's attention over the patch keys, renormalized to sum to 1 (the CLS column
holds no position, and a head that sends most of its mass to CLS says nothing about distance).
"""

from __future__ import annotations

import math

import torch

from caries_mim.errors import InvalidArgumentError

#: Below this, a probability counts as zero in the entropies (0 log 0 = 0).
_TINY = 1e-12


def _patch_attention(attention: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, N, N) patch-to-patch attention, each row renormalized to sum to 1."""
    rows, columns = grid
    patches = rows * columns
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2] or attention.shape[-1] != prefix + patches:
        raise InvalidArgumentError(
            f"attention must be (B, heads, T, T) with T = {prefix} + {rows}x{columns}, got {tuple(attention.shape)}"
        )
    patch = attention[..., prefix:, prefix:].float()
    return patch / patch.sum(dim=-1, keepdim=True).clamp_min(_TINY)


def patch_distances(grid: tuple[int, int], patch_size: float) -> torch.Tensor:
    """(N, N) Euclidean distances between patch centres, in the units of ``patch_size`` (pixels per patch side)."""
    rows, columns = grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    centres = torch.stack([y.flatten(), x.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attention: torch.Tensor, grid: tuple[int, int], patch_size: float, prefix: int = 1
) -> torch.Tensor:
    """Per head, the attention-weighted distance between query and key patches, averaged over queries and images.

    Args:
        attention: (B, H, T, T) attention probabilities of one layer.
        grid: (rows, columns) of the patch grid.
        patch_size: pixels per patch side (the distance's unit: pass pixels x mm/px for millimetres).
        prefix: tokens before the patches (1: CLS).

    Returns:
        (H,) float distances >= 0: 0 when every patch attends to itself; the mean pairwise patch distance when
        attention is uniform.
    """
    patch = _patch_attention(attention, grid, prefix)
    distances = patch_distances(grid, patch_size).to(patch.device)
    return (patch * distances).sum(dim=-1).mean(dim=(0, 2))


def attention_nmi(attention: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Per head, the normalized mutual information between query and key positions, averaged over images.

    Queries are drawn uniformly, keys from the query's (renormalized) attention row: p(q, k) = A[q, k] / N. NMI =
    I(Q; K) / sqrt(H(Q) H(K)) in [0, 1]: 0 when every query attends alike (attention collapse: the map says nothing
    about which query it came from), 1 when each query attends to a key of its own (identity attention).

    Returns:
        (H,) float in [0, 1].
    """
    patch = _patch_attention(attention, grid, prefix)  # (B, H, N, N)
    queries = patch.shape[-2]
    joint = patch / queries
    key_marginal = joint.sum(dim=-2, keepdim=True)  # (B, H, 1, N)
    query_entropy = math.log(queries)
    key_entropy = -(key_marginal * key_marginal.clamp_min(_TINY).log()).sum(dim=(-2, -1))  # (B, H)
    ratio = joint / (key_marginal / queries).clamp_min(_TINY)
    mutual = (joint * ratio.clamp_min(_TINY).log()).sum(dim=(-2, -1))  # (B, H)
    if queries < 2:
        raise InvalidArgumentError("attention_nmi needs at least 2 patch tokens")
    nmi = mutual / (query_entropy * key_entropy).clamp_min(_TINY).sqrt()
    return nmi.clamp(0.0, 1.0).mean(dim=0)
