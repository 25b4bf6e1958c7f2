"""Masked image modeling objectives (one module each) and their registry."""

from caries_mim.mim.mae import MAEOptions, MaskedAutoencoder, random_masking
from caries_mim.mim.objective import MaskedImageObjective, MIMOutput, Reconstruction
from caries_mim.mim.patches import mask_to_pixels, patchify, unpatchify
from caries_mim.mim.registry import OBJECTIVES, build_objective
from caries_mim.mim.simmim import SimMIM, SimMIMOptions, block_masking

__all__ = [
    "OBJECTIVES",
    "MAEOptions",
    "MIMOutput",
    "MaskedAutoencoder",
    "MaskedImageObjective",
    "Reconstruction",
    "SimMIM",
    "SimMIMOptions",
    "block_masking",
    "build_objective",
    "mask_to_pixels",
    "patchify",
    "random_masking",
    "unpatchify",
]
