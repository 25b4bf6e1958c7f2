"""Writing a synthetic radiograph as a Digital Intra-Oral X-Ray Image, For Presentation (DICOM Part 10).

Identifiers are synthetic and derived from (seed, split, index) only, so a dataset regenerates byte for byte.
MONOCHROME1 files store inverted values with a mirrored window, so every viewer (and
:func:`caries_mim.io.read_radiograph`) displays them exactly like the MONOCHROME2 file of the same render.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from caries_mim.atomic_files import atomic_path
from caries_mim.errors import InvalidArgumentError
from caries_mim.synth.acquisition import MAX_STORED
from caries_mim.synth.render import SyntheticRadiograph

#: Digital Intra-Oral X-Ray Image Storage - For Presentation.
INTRAORAL_PRESENTATION_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.3")

TRANSFER_SYNTAX_UIDS = {
    "explicit_vr_little_endian": ExplicitVRLittleEndian,
    "rle_lossless": RLELossless,
    "jpeg2000_lossless": JPEG2000Lossless,
}
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
MANUFACTURER = "caries-mim synthetic"

#: FDI position within a quadrant (ISO 3950: 1 central incisor .. 8 third molar) -> how CID 4018's concept names
#: (SNOMED CT, "Primary Anatomic Structure for Intra-oral Radiography (permanent dentition)") spell the tooth.
#: SNOMED's name for the lower left lateral incisor drops the word "Incisor", so the match is on "Lateral".
_TOOTH_TYPES = {
    1: "CentralIncisor",
    2: "Lateral",
    3: "Canine",
    4: "FirstPremolar",
    5: "SecondPremolar",
    6: "FirstMolar",
    7: "SecondMolar",
    8: "ThirdMolar",
}
#: FDI quadrant -> (arch, patient side) as CID 4018's names spell them.
_QUADRANTS = {
    1: ("Maxillary", "Right"),
    2: ("Maxillary", "Left"),
    3: ("Mandibular", "Left"),
    4: ("Mandibular", "Right"),
}


def _permanent_teeth() -> dict[int, Code]:
    """FDI tooth number (11-48) -> its CID 4018 code, matched by name once at import."""
    teeth = {}
    for quadrant, (arch, side) in _QUADRANTS.items():
        for position, kind in _TOOTH_TYPES.items():
            names = [name for name in codes.cid4018.dir() if arch in name and side in name and kind in name]
            if len(names) != 1:  # a pydicom whose CID table changed: better to fail at import than to mislabel
                raise RuntimeError(f"CID 4018 has {names} for FDI tooth {10 * quadrant + position}")
            teeth[10 * quadrant + position] = getattr(codes.cid4018, names[0])
    return teeth


#: FDI (ISO 3950) tooth number -> SNOMED CT code of CID 4018, for Primary Anatomic Structure Sequence.
PERMANENT_TEETH = _permanent_teeth()


def _digest(*parts: object) -> int:
    """Stable 64-bit integer from the parts (Python's hash() is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def synthetic_uid(seed: int, split: str, index: int, kind: str) -> UID:
    """A valid, globally unique-looking UID that is a pure function of its arguments."""
    return generate_uid(entropy_srcs=["caries-mim-synth", str(seed), split, str(index), kind])


def write_dicom(
    image: SyntheticRadiograph,
    path: str | os.PathLike,
    *,
    index: int,
    seed: int,
    transfer_syntax: str,
    photometric: str,
    split: str = "unlabeled",
) -> None:
    """Write ``image`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    Args:
        index, seed, split: identify the image; UIDs, patient identifiers and dates derive from them.
        transfer_syntax: "explicit_vr_little_endian", "rle_lossless" or "jpeg2000_lossless" (all lossless).
        photometric: "MONOCHROME2" (stored = ``image.pixels``) or "MONOCHROME1" (stored = 4095 - pixels).
    """
    if transfer_syntax not in TRANSFER_SYNTAX_UIDS:
        raise InvalidArgumentError(
            f"unknown transfer syntax {transfer_syntax!r}; use one of {', '.join(TRANSFER_SYNTAX_UIDS)}"
        )
    if photometric not in PHOTOMETRICS:
        raise InvalidArgumentError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    ds = build_dataset(image, index=index, seed=seed, photometric=photometric, split=split)
    stored = _stored_values(image, photometric)
    ts_uid = TRANSFER_SYNTAX_UIDS[transfer_syntax]
    if ts_uid == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        # compress() would otherwise mint a random SOP Instance UID; ours must stay a function of the seed.
        ds.compress(ts_uid, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)

    with atomic_path(path) as temporary:
        ds.save_as(temporary, enforce_file_format=True)


def _anatomic_region(image: SyntheticRadiograph) -> Code:
    arches = {tooth // 10 in (1, 2) for tooth in image.teeth}  # True: an upper tooth
    if arches == {True}:
        return codes.SCT.Maxilla
    if arches == {False}:
        return codes.SCT.Mandible
    return codes.SCT.JawRegion


def _stored_values(image: SyntheticRadiograph, photometric: str) -> np.ndarray:
    pixels = np.ascontiguousarray(image.pixels, dtype=np.uint16)
    if photometric == "MONOCHROME1":
        return (MAX_STORED - pixels).astype(np.uint16)
    return pixels


def build_dataset(image: SyntheticRadiograph, *, index: int, seed: int, photometric: str, split: str) -> Dataset:
    """The full header (file meta included) without pixel data."""
    sop_uid = synthetic_uid(seed, split, index, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = INTRAORAL_PRESENTATION_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = INTRAORAL_PRESENTATION_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = synthetic_uid(seed, split, index, "study")
    ds.SeriesInstanceUID = synthetic_uid(seed, split, index, "series")

    key = _digest(seed, split, index)
    acquired = dt.datetime(2020, 1, 1, 8, 0) + dt.timedelta(days=key % 1460, minutes=(key >> 12) % 600)
    born = dt.date(1950, 1, 1) + dt.timedelta(days=(key >> 24) % 20000)
    tag = "U" if split == "unlabeled" else "L"
    ds.PatientName = f"SYNTH^PATIENT^{tag}{index:06d}"
    ds.PatientID = f"SYNTH-{seed}-{tag}{index:06d}"
    ds.PatientBirthDate = born.strftime("%Y%m%d")
    ds.PatientSex = ("F", "M")[(key >> 40) % 2]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = acquired.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = acquired.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{index:06d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "Synthetic intra-oral radiograph"
    ds.SeriesDescription = "Bitewing" if image.view == "bitewing" else "Periapical"

    ds.Modality = "IO"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "caries-mim synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.PositionerType = "NONE"
    ds.ImageLaterality = image.laterality
    # Mounted as if facing the patient: rows run toward the feet; columns run anteriorly in a right-side view.
    ds.PatientOrientation = ["A" if image.laterality == "R" else "P", "F"]
    ds.ImagerPixelSpacing = [f"{image.spacing_mm[0]:.6g}", f"{image.spacing_mm[1]:.6g}"]
    ds.DetectorType = "SCINTILLATOR"
    # Intra-oral Image Module: the region in view (CID 4016: a bitewing holds both jaws, a periapical one) and, as
    # sensors' software records them, the teeth in the field (CID 4018, from their FDI numbers).
    ds.AnatomicRegionSequence = [CodedConcept.from_code(_anatomic_region(image))]
    ds.PrimaryAnatomicStructureSequence = [
        CodedConcept.from_code(PERMANENT_TEETH[tooth]) for tooth in sorted(image.teeth)
    ]
    # Acquisition Context Module (Type 2): nothing is known about the acquisition's context, so it is empty.
    ds.AcquisitionContextSequence = []

    ds.Rows, ds.Columns = (int(n) for n in image.pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    # DX Image Module: stored values are logarithmic in the beam intensity (attenuation-like, as a processed
    # presentation image is); in MONOCHROME2 higher values mean less intensity reached the sensor (sign -1),
    # in the inverted MONOCHROME1 file lower ones do (+1), which is what each photometric interpretation displays.
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    # The DX family requires the Presentation LUT Shape; INVERSE is the one MONOCHROME1 must carry.
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    # Mirrored window for inverted values: with x' = 4095 - x, c' = 4096 - c makes the linear window of
    # PS3.3 C.11.2.1.2 give exactly 1 - y, so both files display the same (see module docstring).
    center = image.window_center if photometric == "MONOCHROME2" else MAX_STORED + 1 - image.window_center
    ds.WindowCenter = center
    ds.WindowWidth = image.window_width
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"
    return ds
