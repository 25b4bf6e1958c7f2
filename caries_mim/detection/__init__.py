"""Caries detection: ViT encoder + simple feature pyramid + MONAI's RetinaNetDetector, its config, encoder loading
and the resize-predict-map-back path for radiographs of any size."""

from caries_mim.detection.config import DetectorConfig
from caries_mim.detection.detector import CariesDetector, build_detector
from caries_mim.detection.encoder_loading import load_detector_encoder
from caries_mim.detection.network import ViTFeatureExtractor, ViTRetinaNet
from caries_mim.detection.preprocessing import (
    Detections,
    detect,
    detect_batch,
    model_geometry,
    model_scale,
    prepare_image,
)
from caries_mim.detection.pyramid import ChannelLayerNorm, SimpleFeaturePyramid

__all__ = [
    "CariesDetector",
    "ChannelLayerNorm",
    "Detections",
    "DetectorConfig",
    "SimpleFeaturePyramid",
    "ViTFeatureExtractor",
    "ViTRetinaNet",
    "build_detector",
    "detect",
    "detect_batch",
    "load_detector_encoder",
    "model_geometry",
    "model_scale",
    "prepare_image",
]
