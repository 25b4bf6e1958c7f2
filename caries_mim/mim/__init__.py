"""Pretraining objectives (one module each: masked image modeling, contrastive) and their registry."""

from caries_mim.mim.hybrid import HybridCLMIM, HybridOptions, gradient_cosines
from caries_mim.mim.mae import MAEOptions, MaskedAutoencoder, random_masking
from caries_mim.mim.moco import MoCoOptions, MoCoV3
from caries_mim.mim.objective import (
    MaskedImageObjective,
    MIMOutput,
    ObjectiveOutput,
    PretrainingObjective,
    Reconstruction,
)
from caries_mim.mim.patches import mask_to_pixels, patchify, unpatchify
from caries_mim.mim.registry import OBJECTIVES, build_objective
from caries_mim.mim.semantic_mim import SemanticMIM, SemanticMIMOptions
from caries_mim.mim.simmim import SimMIM, SimMIMOptions, block_masking

__all__ = [
    "OBJECTIVES",
    "HybridCLMIM",
    "HybridOptions",
    "MAEOptions",
    "MIMOutput",
    "MaskedAutoencoder",
    "MaskedImageObjective",
    "MoCoOptions",
    "MoCoV3",
    "ObjectiveOutput",
    "PretrainingObjective",
    "Reconstruction",
    "SemanticMIM",
    "SemanticMIMOptions",
    "SimMIM",
    "SimMIMOptions",
    "block_masking",
    "build_objective",
    "gradient_cosines",
    "mask_to_pixels",
    "patchify",
    "random_masking",
    "unpatchify",
]
