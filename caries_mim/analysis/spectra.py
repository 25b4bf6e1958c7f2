"""The frequency content and the rank of token features, per layer.

``high_frequency_log_amplitude`` follows naver-ai/cl-vs-mim's Fourier analysis: MIM keeps high frequencies in its
token maps (texture), contrastive learning suppresses them (shape). ``effective_rank`` (Roy and Vetterli 2007)
measures dimensional collapse: how many directions the features really use.
"""

from __future__ import annotations

import torch

from caries_mim.errors import InvalidArgumentError

_TINY = 1e-12


def _radial_bins(rows: int, columns: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(rows, columns) integer radius of each centred FFT bin, in units of the smaller side's frequency step, and
    the number of bins from 0 to the highest frequency on the diagonal."""
    fy = torch.fft.fftshift(torch.fft.fftfreq(rows, device=device))  # cycles per token in [-0.5, 0.5)
    fx = torch.fft.fftshift(torch.fft.fftfreq(columns, device=device))
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # up to 0.5 sqrt(2) at the corner
    step = 1.0 / min(rows, columns)
    index = torch.round(radius / step).long()
    return index, int(index.max()) + 1


def radial_log_amplitude(feature_map: torch.Tensor) -> torch.Tensor:
    """Mean log amplitude of the 2-D Fourier transform of ``feature_map`` (B, D, rows, columns) per radial
    frequency bin, from 0 (the mean of the map) to the highest frequency the grid holds (the diagonal corner).

    The maps keep their mean, as in cl-vs-mim: bin 0 is each channel's DC term, and the curve minus its first value
    reads as the energy at each scale relative to the map's mean. Amplitudes are averaged over images and channels
    before the log.

    Returns:
        (bins,) float.
    """
    if feature_map.dim() != 4:
        raise InvalidArgumentError(f"feature_map must be (B, D, rows, columns), got {tuple(feature_map.shape)}")
    rows, columns = feature_map.shape[-2:]
    amplitude = torch.fft.fftshift(torch.fft.fft2(feature_map.float()), dim=(-2, -1)).abs().mean(dim=(0, 1))
    index, bins = _radial_bins(rows, columns, amplitude.device)
    totals = torch.zeros(bins, device=amplitude.device).scatter_add_(0, index.flatten(), amplitude.flatten())
    counts = torch.zeros(bins, device=amplitude.device).scatter_add_(0, index.flatten(), torch.ones(index.numel()))
    return (totals / counts.clamp_min(1)).clamp_min(_TINY).log()


def high_frequency_log_amplitude(feature_map: torch.Tensor) -> float:
    """Relative log amplitude of the highest frequency: log A(highest) - log A(0) of :func:`radial_log_amplitude`.

    Near 0 or above: as much energy at the grid's finest scale as in the mean (a high-pass map); strongly negative:
    smooth, low-frequency maps.
    """
    profile = radial_log_amplitude(feature_map)
    return float(profile[-1] - profile[0])


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the normalized singular values) of the centred ``features`` (M samples, D dims).

    1 for rank-1 features, D for features spread evenly over D orthogonal directions; in between, how many
    directions the representation really uses.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise InvalidArgumentError(f"features must be (M >= 2, D), got {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(centred)
    total = singular.sum()
    if total <= _TINY:
        return 0.0
    share = singular / total
    share = share[share > _TINY]
    return float(torch.exp(-(share * share.log()).sum()))
