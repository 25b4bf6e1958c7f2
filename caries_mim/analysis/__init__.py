"""What pretraining did to an encoder, measured on its features (the diagnostics of "What do self-supervised ViTs
learn?" and of representation collapse): attention distance and query-key NMI, Fourier spectra and effective rank
of token maps, and linear-probe / k-NN accuracy of frozen features."""

from caries_mim.analysis.attention import attention_nmi, mean_attention_distance, patch_distances
from caries_mim.analysis.crops import SurfaceCrop, centre_crop, crop_at, surface_crops, to_working_scale
from caries_mim.analysis.probe import knn_accuracy, linear_probe_accuracy
from caries_mim.analysis.spectra import effective_rank, high_frequency_log_amplitude, radial_log_amplitude

__all__ = [
    "SurfaceCrop",
    "attention_nmi",
    "centre_crop",
    "crop_at",
    "effective_rank",
    "high_frequency_log_amplitude",
    "knn_accuracy",
    "linear_probe_accuracy",
    "mean_attention_distance",
    "patch_distances",
    "radial_log_amplitude",
    "surface_crops",
    "to_working_scale",
]
