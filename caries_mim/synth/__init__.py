"""Synthetic dental radiographs (bitewings and periapicals) with caries ground truth, written as DICOM + COCO.

Physics-based: tissues are path-length maps (enamel, dentin, pulp, bone, soft tissue, restorations), combined by
Beer-Lambert attenuation and passed through a detector model (quantum and electronic noise, blur, gain,
log response, vendor-like sharpening and display curve), quantized to 12 bits.
"""

from caries_mim.synth.config import TRANSFER_SYNTAXES, SynthConfig
from caries_mim.synth.dataset import GENERATOR_VERSION, SynthSummary, generate_dataset, render_indexed
from caries_mim.synth.dicom import write_dicom
from caries_mim.synth.render import LesionAnnotation, SyntheticRadiograph, render_radiograph

__all__ = [
    "GENERATOR_VERSION",
    "TRANSFER_SYNTAXES",
    "LesionAnnotation",
    "SynthConfig",
    "SynthSummary",
    "SyntheticRadiograph",
    "generate_dataset",
    "render_indexed",
    "render_radiograph",
    "write_dicom",
]
