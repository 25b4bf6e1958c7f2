"""What the routes need once the model is loaded: the predictor, its inference worker and the model's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from caries_mim.inference import Predictor
from caries_mim.io.options import ReadOptions
from caries_mim.package import preprocessing_description
from service.batching import InferenceWorker
from service.decoding import UploadDecoder

INTENDED_USE = (
    "Decision support for detecting dental caries on intra-oral radiographs (bitewing, periapical): boxes with "
    "scores for a dentist to review, as a second reader. Not a diagnosis and not a cleared medical device; "
    "research use only unless your deployment has its own regulatory clearance. Findings below the operating "
    "threshold are not reported by default."
)


@dataclass(frozen=True)
class ModelIdentity:
    """Name, version and checksum of the loaded package, as every response reports them."""

    name: str
    version: str
    checksum: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "checksum": self.checksum}


@dataclass
class Runtime:
    predictor: Predictor
    worker: InferenceWorker
    identity: ModelIdentity
    decoder: UploadDecoder

    @property
    def read_options(self) -> ReadOptions:
        return self.decoder.options

    def model_card(self) -> dict[str, Any]:
        package = self.predictor.package
        config = package.config
        return {
            "model": self.identity.to_dict(),
            "classes": list(config.class_names),
            "threshold": package.threshold,
            "target_sensitivity": package.target_sensitivity,
            "input": {
                "accepted": "DICOM Part 10 (single-frame grayscale radiographs), PNG, JPEG, TIFF",
                "modalities": sorted(self.read_options.allowed_modalities),
                "max_pixels": self.read_options.max_pixels,
                "preprocessing": preprocessing_description(config),
            },
            "architecture": {
                "encoder": config.encoder.to_dict(),
                "image_size": config.image_size,
                "roi_size": config.roi_size,
            },
            "device": str(self.predictor.device),
            "provenance": package.provenance,
            "intended_use": INTENDED_USE,
        }
