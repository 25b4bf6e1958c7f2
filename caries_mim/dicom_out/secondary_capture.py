"""Caries findings burnt into a copy of the radiograph: a Secondary Capture (SC) image for archives that show images
and nothing else (no SR, no presentation states).

The picture is what :func:`caries_mim.visualization.draw_findings` draws (the PNG overlay of the service): the
radiograph as the reader normalized it for display (bright = more attenuating, after the source's windowing), with
a box and a "<label> <score>" caption per finding at or above the operating threshold, in the class's colour, plus
one summary line at the top left saying what the marks are (or that there are none). Findings under the threshold
are not drawn, as in the presentation state (:mod:`caries_mim.dicom_out.presentation_state`).

The instance is in the source's study (patient and study copied from it) in a series of its own, RGB 8 bits,
Burned In Annotation YES, and says in its Series Description, Image Comments and Derivation Description that it is
a CAD overlay not to be diagnosed from alone; its Source Image Sequence references the source image. It carries no
Pixel Spacing: it is a picture of the findings, and measurements belong on the original image.

Like the SR, nothing here logs, and no error message contains an identifier or a UID.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from PIL import ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from caries_mim.dicom_out.marks import mark_box, summary_text
from caries_mim.dicom_out.source_header import (
    evidence_header,
    nameless_copy,
    restore_person_names,
    series_laterality,
)
from caries_mim.errors import InvalidArgumentError
from caries_mim.visualization import DEFAULT_COLOUR, draw_findings

if TYPE_CHECKING:
    from caries_mim.inference import Findings

#: Series Description (LO, at most 64 characters) of every caries SC: what a PACS shows in its series list.
SERIES_DESCRIPTION = "Caries CAD overlay (not for diagnosis alone)"
#: Purpose of Reference of the source image (CID 7202).
SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation
#: highdicom requires a patient orientation for a PATIENT image; it is replaced by the source's own (see below).
_ORIENTATION_PLACEHOLDER = ("A", "F")


def caries_secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    findings: Findings,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 902,
    instance_number: int = 1,
    manufacturer: str = "caries-mim",
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> SCImage:
    """An SC image (see the module docstring) of ``pixels`` with the ``findings`` at the operating point burnt in.

    Args:
        source: the header of the image the findings were computed on (its pixel data is not used), e.g. as
            :func:`caries_mim.io.dicom.parse_dicom` returns it.
        pixels: (H, W) float in [0, 1], bright = more attenuating: that image as read (``Radiograph.pixels``).
        findings: what :meth:`caries_mim.inference.Predictor.predict` returned for it; boxes in its pixels.
        algorithm_name, algorithm_version: identify the detector (summary line, comments, Manufacturer's Model
            Name, Software Versions).
        series_number, instance_number, manufacturer: of the new instance (same study as the source).
        sop_instance_uid, series_instance_uid: the new instance's UIDs; None: new random ones. A caller that may
            build the image of one source twice (a retried job) passes UIDs derived from the source.
    Returns:
        The SC image as a pydicom dataset, (H, W, 3) uint8 RGB pixels, Explicit VR Little Endian (write it with
        :func:`caries_mim.dicom_out.structured_report_bytes`).
    Raises:
        InvalidArgumentError: the source lacks a UID to reference, ``pixels`` or the source differ in size from
            ``findings.image_shape``, or a finding to mark has a non-finite or inverted box or a score outside
            [0, 1].
    """
    header = evidence_header(source, findings.image_shape, result="a Secondary Capture image")
    pixels = np.asarray(pixels)
    if pixels.shape != tuple(findings.image_shape):
        raise InvalidArgumentError(
            f"the findings are for a {findings.image_shape[0]}x{findings.image_shape[1]} image but the pixels are "
            f"{'x'.join(str(size) for size in pixels.shape)}"
        )
    if not algorithm_name.strip() or not algorithm_version.strip():
        raise InvalidArgumentError("algorithm name and version must not be empty")
    marked = findings.above_threshold
    rows, columns = findings.image_shape
    boxes = [mark_box(finding, number, rows, columns) for number, finding in enumerate(marked, start=1)]
    picture = draw_findings(
        pixels,
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        [finding.label for finding in marked],
        [float(finding.score) for finding in marked],
    )
    summary = summary_text(algorithm_name, algorithm_version, len(marked), findings.threshold)
    ImageDraw.Draw(picture).text((4, 4), summary, fill=DEFAULT_COLOUR)

    nameless = nameless_copy(header)
    image = SCImage.from_ref_dataset(
        nameless,
        np.asarray(picture),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=_ORIENTATION_PLACEHOLDER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
    )
    image.copy_patient_and_study_information(nameless)  # also Study Description etc., as the GSPS has them
    restore_person_names(image, header)
    # The pixels are the source's, unrotated: its orientation holds exactly, and without one it is "unknown" (Type 2).
    image.PatientOrientation = header.get("PatientOrientation", "")
    image.Laterality = series_laterality(header)
    # Rendered from an image by software on a workstation, not captured from a video or film (highdicom's "DI").
    image.ConversionType = "WSD"
    image.BurnedInAnnotation = "YES"
    image.ImageComments = f"CAD overlay: {summary} Read the original image; these marks are prompts, not a diagnosis."
    image.DerivationDescription = (
        "Source image as displayed, with the caries detections at the operating threshold drawn in (boxes, labels, "
        "scores)"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(SOURCE_PURPOSE)]
    image.SourceImageSequence = [reference]
    return image
