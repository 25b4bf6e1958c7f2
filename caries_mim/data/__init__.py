"""Datasets, decode cache and augmentation presets between :mod:`caries_mim.io` and training.

* :class:`DecodeCache` - decoded pixels on disk, keyed by file content, so epochs do not re-decode DICOM.
* :class:`UnlabeledRadiographs` - every readable radiograph under some folders, for MIM pretraining.
* :class:`ResumableEpochSampler` - per-epoch shuffle split across ranks, restartable mid-epoch, seeded items;
  :func:`repeat_factors` for over-sampling images of rare classes.
* :func:`load_annotations` - COCO, DENTEX and box-CSV annotations as :class:`DetectionRecord` lists.
* :class:`DetectionDataset` and :func:`collate_detection` - annotated images for the detector.
* :mod:`caries_mim.data.transforms` - albumentations presets and the :class:`Letterbox` box mapping.
"""

from caries_mim.data.annotations import load_annotations
from caries_mim.data.box_csv import DEFAULT_CSV_CLASS_MAP, load_box_csv
from caries_mim.data.cache import CACHE_FORMAT_VERSION, DecodeCache, RadiographLoader
from caries_mim.data.coco import load_coco
from caries_mim.data.dentex import DEFAULT_DENTEX_CLASS_MAP, load_dentex
from caries_mim.data.detection import DetectionDataset, collate_detection
from caries_mim.data.discovery import RADIOGRAPH_SUFFIXES, find_radiographs
from caries_mim.data.indexing import SkippedFiles, index_readable
from caries_mim.data.records import AnnotationSet, AnnotationStats, DetectionRecord
from caries_mim.data.sampling import (
    ResumableEpochSampler,
    category_repeat_factors,
    image_repeat_factors,
    item_seed,
    repeat_factors,
)
from caries_mim.data.transforms import (
    FloatClahe,
    Letterbox,
    contrastive_view_transform,
    detection_eval_transform,
    detection_train_transform,
    mim_pretrain_transform,
)
from caries_mim.data.unlabeled import UnlabeledRadiographs

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_CSV_CLASS_MAP",
    "DEFAULT_DENTEX_CLASS_MAP",
    "RADIOGRAPH_SUFFIXES",
    "AnnotationSet",
    "AnnotationStats",
    "DecodeCache",
    "DetectionDataset",
    "DetectionRecord",
    "FloatClahe",
    "Letterbox",
    "RadiographLoader",
    "ResumableEpochSampler",
    "SkippedFiles",
    "UnlabeledRadiographs",
    "category_repeat_factors",
    "collate_detection",
    "contrastive_view_transform",
    "detection_eval_transform",
    "detection_train_transform",
    "find_radiographs",
    "image_repeat_factors",
    "index_readable",
    "item_seed",
    "load_annotations",
    "load_box_csv",
    "load_coco",
    "load_dentex",
    "mim_pretrain_transform",
    "repeat_factors",
]
