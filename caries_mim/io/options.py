"""What the readers accept: modality allow-list, size limit, which VOI transform to apply."""

from __future__ import annotations

from dataclasses import dataclass

#: Projection radiography modalities: intra-oral, panoramic, digital and computed radiography.
DEFAULT_ALLOWED_MODALITIES = frozenset({"DX", "IO", "PX", "CR"})

#: 50 megapixels: larger than any dental or chest detector (a 43 x 43 cm flat panel at 0.1 mm is 18.5 MP),
#: small enough that a hostile header cannot make us allocate gigabytes.
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ReadOptions:
    """Limits and choices for :func:`caries_mim.io.read_radiograph`.

    Attributes:
        allowed_modalities: DICOM Modality values accepted (upper case).
        allow_non_dicom: accept PNG/JPEG/TIFF/MHA/NRRD/NIfTI files, which carry no modality.
        max_pixels: Rows x Columns limit, checked from the header before any pixel data is decoded.
        voi_index: which VOI LUT or window (0-based) to apply when the file carries several.
    """

    allowed_modalities: frozenset[str] = DEFAULT_ALLOWED_MODALITIES
    allow_non_dicom: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    voi_index: int = 0
