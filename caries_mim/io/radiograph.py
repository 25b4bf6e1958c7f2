"""The in-memory radiograph every later stage consumes."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def hash_uid(uid: str | None) -> str | None:
    """Short, stable, non-reversible stand-in for a DICOM UID, for logs and listings (16 hex chars of SHA-256)."""
    if uid is None:
        return None
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:16]


@dataclass(frozen=True)
class DicomReferences:
    """The UIDs an output (DICOM SR, overlay) needs to reference its source. Nothing patient-identifying."""

    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class Radiograph:
    """One projection radiograph, normalized for display and learning.

    Attributes:
        pixels: float32 array of shape (H, W), values in [0, 1], higher = more attenuating (bright enamel,
            dark air), whatever the source's photometric interpretation.
        spacing_mm: (row, column) pixel spacing in millimetres, or None when the source does not say.
        source_format: "dicom", "png", "jpeg", "tiff", "mha", "nrrd" or "nifti".
        modality: DICOM Modality (IO, PX, DX, CR) or None for non-DICOM sources.
        photometric_interpretation: the source's value (MONOCHROME1/2) or None.
        bits_stored: bits per sample in the source (12 for most intra-oral sensors, 8 for PNG/JPEG).
        transfer_syntax_uid: the DICOM transfer syntax, or None.
        intensity_normalization: how stored values became [0, 1]: "voi_lut", "window", "percentile" or "full_range".
        dicom: UIDs of the source DICOM object, or None for non-DICOM sources.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    source_format: str
    modality: str | None = None
    photometric_interpretation: str | None = None
    bits_stored: int | None = None
    transfer_syntax_uid: str | None = None
    intensity_normalization: str = "full_range"
    dicom: DicomReferences | None = field(default=None)

    def metadata(self) -> dict[str, Any]:
        """Everything but the pixels, as plain JSON types: what travels beside the pixels when a radiograph is
        stored (the decode cache) or sent between processes (the isolated reader). See :meth:`from_metadata`."""
        return {
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            "source_format": self.source_format,
            "modality": self.modality,
            "photometric_interpretation": self.photometric_interpretation,
            "bits_stored": self.bits_stored,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "intensity_normalization": self.intensity_normalization,
            "dicom": None if self.dicom is None else dataclasses.asdict(self.dicom),
        }

    @classmethod
    def from_metadata(cls, pixels: np.ndarray, metadata: dict[str, Any]) -> Radiograph:
        """The radiograph of :meth:`metadata` and its pixels. Every field is converted to its type, nothing is
        evaluated: the metadata may come from a file or another process.

        Raises:
            KeyError, TypeError, ValueError, IndexError, OverflowError: a missing field or one of the wrong type.
        """
        spacing = metadata["spacing_mm"]
        dicom = metadata["dicom"]
        bits = metadata["bits_stored"]
        return cls(
            pixels=pixels,
            spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            source_format=str(metadata["source_format"]),
            modality=_optional_str(metadata["modality"]),
            photometric_interpretation=_optional_str(metadata["photometric_interpretation"]),
            bits_stored=None if bits is None else int(bits),
            transfer_syntax_uid=_optional_str(metadata["transfer_syntax_uid"]),
            intensity_normalization=str(metadata["intensity_normalization"]),
            dicom=None
            if dicom is None
            else DicomReferences(
                **{field.name: _optional_str(dicom[field.name]) for field in dataclasses.fields(DicomReferences)}
            ),
        )

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def describe(self, *, reveal_uids: bool = False) -> dict[str, Any]:
        """JSON-ready metadata. UIDs are hashed unless ``reveal_uids``; patient data is never kept at all."""
        info: dict[str, Any] = {
            "format": self.source_format,
            "rows": self.height,
            "columns": self.width,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm else None,
            "modality": self.modality,
            "photometric_interpretation": self.photometric_interpretation,
            "bits_stored": self.bits_stored,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "intensity_normalization": self.intensity_normalization,
        }
        if self.dicom is not None:
            uid = self.dicom.sop_instance_uid
            if reveal_uids:
                info["sop_instance_uid"] = uid
                info["sop_class_uid"] = self.dicom.sop_class_uid
                info["study_instance_uid"] = self.dicom.study_instance_uid
                info["series_instance_uid"] = self.dicom.series_instance_uid
            else:
                info["sop_instance_uid_hash"] = hash_uid(uid)
                info["sop_class_uid"] = self.dicom.sop_class_uid
        return info


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
