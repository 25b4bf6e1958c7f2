"""Reading radiographs: DICOM Part 10 and common image formats into one :class:`Radiograph`."""

from caries_mim.io.options import DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS, ReadOptions
from caries_mim.io.radiograph import DicomReferences, Radiograph, hash_uid
from caries_mim.io.reader import RadiographSource, read_radiograph, read_source_bytes

__all__ = [
    "DEFAULT_ALLOWED_MODALITIES",
    "DEFAULT_MAX_PIXELS",
    "DicomReferences",
    "Radiograph",
    "RadiographSource",
    "ReadOptions",
    "hash_uid",
    "read_radiograph",
    "read_source_bytes",
]
