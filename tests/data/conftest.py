"""Fixtures for the data layer: DICOM files written here with pydicom, annotation sets copied from fixtures/.

fixtures/ holds the three annotation layouts exactly as their sources publish them (tiny PNGs, a few boxes):
``dentex/quadrant_enumeration_disease/`` (json beside an ``xrays/`` folder), ``coco/`` (the synthetic
generator's layout: ``images/`` beside the json, extra per-annotation keys) and ``kaggle/train/``
(``_annotations.csv`` beside the images).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.dicom_factory import make_dataset, to_bytes

FIXTURES = Path(__file__).parent / "fixtures"


def textured_12bit(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """uint16 (rows, columns) 12-bit values with smooth structure and noise, like a sensor image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    base = 0.5 + 0.3 * np.sin(x / 17.0 + seed) * np.cos(y / 23.0)
    values = (base + rng.normal(0.0, 0.02, base.shape)) * 4095
    return np.clip(np.round(values), 0, 4095).astype(np.uint16)


def write_dicom(
    path: Path,
    rows: int = 48,
    columns: int = 64,
    *,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "IO",
) -> Path:
    """An intra-oral (IO), MONOCHROME2, 12-bit stored DICOM Part 10 file with a window, at ``path``."""
    ds = make_dataset(textured_12bit(rows, columns, seed), modality=modality, window=(2048, 4096))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds, transfer_syntax))
    return path


@pytest.fixture
def dicom_file(tmp_path: Path) -> Path:
    return write_dicom(tmp_path / "source" / "image.dcm")


@pytest.fixture
def dentex_dir(tmp_path: Path) -> Path:
    """A writable copy of the DENTEX fixture (json + xrays/)."""
    return Path(shutil.copytree(FIXTURES / "dentex" / "quadrant_enumeration_disease", tmp_path / "dentex"))


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "coco", tmp_path / "coco"))


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "kaggle" / "train", tmp_path / "kaggle"))
