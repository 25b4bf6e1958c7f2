"""Caries findings as a Grayscale Softcopy Presentation State (GSPS): marks a viewer draws over the original image.

For archives and viewers that store and show presentation states but not SR: the source image is displayed as it
would be on its own (its windowing, rescale and polarity), with on top of it

- per finding at or above the operating threshold (in the order of ``Findings.findings``, score descending): a
  closed POLYLINE of 5 points around its box and a caption "<label> <score>" (e.g. "deep_caries 0.91") anchored at
  the box's top-left corner, both tracked as "finding N" with a Tracking UID derived from the instance's UID;
- one line of summary text at the top left of the displayed area naming the algorithm, the number of marks and the
  threshold, and that the marks are CAD marks; with no mark, it says so (an explicit negative, as in the SR).

Findings under the threshold are not drawn: a mark is a prompt to look, and the operating threshold is where the
model's prompts were validated. Each class has its own graphic layer (``CARIES``, ``DEEP_CARIES``) with the
recommended display colour of :data:`caries_mim.visualization.LABEL_COLOURS`, so the marks look like the PNG overlay
and a viewer can hide one class; the summary is on ``CAD_SUMMARY``.

Coordinates: GSPS PIXEL units are (column, row) with (0, 0) at the top-left corner of the top-left pixel, the
convention of our ``(x0, y0, x1, y1)`` boxes, so corners go into Graphic Data unchanged. A box reaching past the
image (by rounding in the detector) is clipped to it, as GSPS coordinates must lie on the image.

Presentation: highdicom copies the source's Modality LUT (rescale) and VOI LUT (window centre/width, VOI LUT
Function, or VOI LUT Sequence) when the source has them, else the viewer's default window applies. The Presentation
LUT Shape is the source's own when it has one, else INVERSE for MONOCHROME1 and IDENTITY otherwise: a presentation
state replaces the image's polarity, and highdicom's default (IDENTITY) would show a MONOCHROME1 radiograph
inverted.

Like the SR, the GSPS copies the patient and study modules from the source; nothing here logs, and no error message
contains an identifier or a UID.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation, pr
from highdicom.color import CIELabColor
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from caries_mim.dicom_out.marks import mark_box, summary_text
from caries_mim.dicom_out.source_header import (
    evidence_header,
    nameless_copy,
    restore_person_names,
    series_laterality,
)
from caries_mim.errors import InvalidArgumentError
from caries_mim.visualization import DEFAULT_COLOUR, LABEL_COLOURS

if TYPE_CHECKING:
    from caries_mim.inference import Finding, Findings

#: Content Label (CS, at most 16 capitals, digits, spaces or underscores) of every caries GSPS.
CONTENT_LABEL = "CARIES_CAD"
#: Graphic layer of the summary line; the class layers are named after the class (see :func:`layer_name`).
SUMMARY_LAYER = "CAD_SUMMARY"
#: Where the summary line goes: DISPLAY units (fractions of the displayed area), a strip along the top.
SUMMARY_BOX = (0.01, 0.01, 0.99, 0.05)


def caries_presentation_state(
    source: Dataset,
    findings: Findings,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 901,
    instance_number: int = 1,
    manufacturer: str = "caries-mim",
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> pr.GrayscaleSoftcopyPresentationState:
    """A GSPS (see the module docstring) marking the ``findings`` at the operating point on ``source``.

    Args:
        source: the header of the image the findings were computed on (pixel data is not needed and not copied),
            e.g. as :func:`caries_mim.io.dicom.parse_dicom` returns it; single-sample (grayscale).
        findings: what :meth:`caries_mim.inference.Predictor.predict` returned for that image; boxes in its pixels.
        algorithm_name, algorithm_version: identify the detector (summary text, Content Description, Manufacturer's
            Model Name, Software Versions).
        series_number, instance_number, manufacturer: of the new instance (same study as the source).
        sop_instance_uid, series_instance_uid: the new instance's UIDs; None: new random ones. A caller that may
            build the state of one image twice (a retried job) passes UIDs derived from the source, so a receiver
            gets the same instance again; the marks' Tracking UIDs derive from ``sop_instance_uid``.
    Returns:
        The GSPS as a pydicom dataset (write it with :func:`caries_mim.dicom_out.structured_report_bytes`).
    Raises:
        InvalidArgumentError: the source lacks a UID to reference or its Rows/Columns, is not grayscale, its size
            differs from ``findings.image_shape``, or a finding to mark has a non-finite or inverted box or a score
            outside [0, 1].
    """
    header = evidence_header(source, findings.image_shape, result="a presentation state")
    if "Rows" not in header or "Columns" not in header:
        raise InvalidArgumentError("the source image has no Rows or Columns: a presentation state needs its size")
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise InvalidArgumentError("the source image is not grayscale: a grayscale presentation state cannot show it")
    if "SamplesPerPixel" not in header:  # Type 1 in images, but highdicom reads it even from a stripped header
        header.SamplesPerPixel = 1
    if not algorithm_name.strip() or not algorithm_version.strip():
        raise InvalidArgumentError("algorithm name and version must not be empty")
    sop_instance_uid = sop_instance_uid or generate_uid()
    marked = findings.above_threshold

    layers = {SUMMARY_LAYER: pr.GraphicLayer(SUMMARY_LAYER, order=1, description="CAD summary")}
    annotations = []
    for number, finding in enumerate(marked, start=1):
        name = layer_name(finding.label)
        if name not in layers:
            layers[name] = pr.GraphicLayer(
                name,
                order=len(layers) + 1,
                description=f"{finding.label} marks",
                display_color=CIELabColor.from_rgb(*LABEL_COLOURS.get(finding.label, DEFAULT_COLOUR)),
            )
        annotations.append(_finding_annotation(header, finding, number, layers[name], sop_instance_uid))
    annotations.append(
        pr.GraphicAnnotation(
            referenced_images=[header],
            graphic_layer=layers[SUMMARY_LAYER],
            text_objects=[
                pr.TextObject(
                    summary_text(algorithm_name, algorithm_version, len(marked), findings.threshold),
                    units=pr.AnnotationUnitsValues.DISPLAY,
                    bounding_box=SUMMARY_BOX,
                    text_justification=pr.TextJustificationValues.LEFT,
                )
            ],
        )
    )
    nameless = nameless_copy(header)
    state = pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[nameless],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number=None,
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm_name} caries CAD marks",
        graphic_annotations=annotations,
        graphic_layers=list(layers.values()),
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=_presentation_lut_shape(header)
        ),
        series_description=f"{algorithm_name} caries CAD marks",
    )
    restore_person_names(state, header)
    state.Laterality = series_laterality(header)
    return state


def layer_name(label: str) -> str:
    """The graphic layer of a class: its name as a DICOM Code String (capitals, digits, underscores, at most 16)."""
    return re.sub(r"[^A-Z0-9_]", "_", label.upper())[:16] or "FINDINGS"


def _finding_annotation(
    header: Dataset, finding: Finding, number: int, layer: pr.GraphicLayer, sop_instance_uid: str
) -> pr.GraphicAnnotation:
    x0, y0, x1, y1 = mark_box(finding, number, int(header.Rows), int(header.Columns))
    tracking = {
        "tracking_id": f"finding {number}",
        # Derived, not random: the same instance built again carries the same marks.
        "tracking_uid": generate_uid(entropy_srcs=["caries-mim GSPS mark", sop_instance_uid, str(number)]),
    }
    outline = pr.GraphicObject(
        graphic_type=pr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
        units=pr.AnnotationUnitsValues.PIXEL,
        **tracking,
    )
    caption = pr.TextObject(
        f"{finding.label} {float(finding.score):.2f}",
        units=pr.AnnotationUnitsValues.PIXEL,
        anchor_point=(x0, y0),
        anchor_point_visible=False,
        **tracking,
    )
    return pr.GraphicAnnotation(
        referenced_images=[header], graphic_layer=layer, graphic_objects=[outline], text_objects=[caption]
    )


def _presentation_lut_shape(header: Dataset) -> PresentationLUTShapeValues:
    own = header.get("PresentationLUTShape")
    if own in ("IDENTITY", "INVERSE"):
        return PresentationLUTShapeValues(own)
    if header.get("PhotometricInterpretation") == "MONOCHROME1":
        return PresentationLUTShapeValues.INVERSE
    return PresentationLUTShapeValues.IDENTITY
