"""Caries findings as a DICOM Structured Report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

What the report says, per reported finding (one TID 1410 "Planar ROI Measurements and Qualitative Evaluations"
group each):

- a Tracking Identifier: a new UID and the text "finding N" (N from 1, in the order of ``Findings.findings``,
  i.e. score descending);
- the Image Region: a closed POLYLINE of 5 points around the box, referencing the source image;
- the Finding type SCT 80967001 "Dental caries"; ``deep_caries`` adds the Finding Site SCT 708579004 "Inner third
  of dentin" (see :data:`FINDING_CODINGS` for why);
- the Algorithm Identification (name, version, manufacturer);
- the detection score as a measurement DCM 122157 "Probability", unit UCUM "1" (no units), value in [0, 1];
- a qualitative evaluation DCM 111056 "Rendering Intent": "Presentation Required" at or above the package's
  operating threshold, "Presentation Optional" below it (CID 6034, the CAD-report way of marking the operating
  point; below-threshold findings are only present with ``include_below_threshold=True``).

When no finding reaches the threshold, one image-level TID 1501 group states "Dental caries: Absent" (SCT 272519000,
CID 241) for the source image: highdicom's ``MeasurementReport`` needs at least one group, and an explicit negative
is what a reader of the report needs anyway.

Coordinates: DICOM SCOORD pixel coordinates are (column, row) with (0, 0) at the top-left corner of the top-left
pixel (its centre is (0.5, 0.5)). Our boxes ``(x0, y0, x1, y1)`` use the same pixel-edge convention with x along
columns, so they go into Graphic Data unchanged: (x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0). Graphic Data is
float32 (FL), so a value read back equals the box to float32 precision.

The SR copies the patient and study modules from the source image, as DICOM requires of a report about that
image (person names verbatim, built so that highdicom never quotes one: see :mod:`caries_mim.dicom_out.source_header`);
nothing here logs, and no error message contains an identifier or a UID.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from highdicom import sr
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from caries_mim.dicom_out.marks import checked_finding
from caries_mim.dicom_out.source_header import evidence_header, nameless_copy, restore_person_names
from caries_mim.errors import InvalidArgumentError

if TYPE_CHECKING:
    from caries_mim.inference import Finding, Findings

#: SNOMED CT "Dental caries (disorder)". Not in pydicom's code dictionary, so it is spelled out here.
DENTAL_CARIES = Code("80967001", "SCT", "Dental caries")
#: SNOMED CT body structure "Inner third of dentin", the Finding Site of the SCT "... extending into inner third of
#: dentin" caries disorders.
INNER_THIRD_OF_DENTIN = Code("708579004", "SCT", "Inner third of dentin")
#: Procedure reported in the Measurement Report (SCT 1290849002).
DENTAL_RADIOGRAPHY = codes.SCT.DentalRadiography

RENDERING_INTENT = codes.DCM.RenderingIntent
PRESENTATION_REQUIRED = codes.DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent
PRESENTATION_OPTIONAL = codes.DCM.PresentationOptionalRenderingDeviceMayPresent


@dataclass(frozen=True)
class FindingCoding:
    """How one class name is coded: the Finding type and, where the class says more (its depth), Finding Sites."""

    finding_type: Code
    finding_sites: tuple[Code, ...] = ()


#: Class name -> coding. SNOMED CT has no plain "deep caries" concept: its depth-specific caries disorders (e.g.
#: 733943001 "Primary active dental caries extending into inner third of dentin") also assert primary vs secondary
#: and active vs arrested, which a radiograph alone cannot tell. So ``deep_caries`` is coded post-coordinated, as
#: exactly the parts those concepts are defined by that we do know: Finding type "Dental caries" plus Finding Site
#: "Inner third of dentin" (DENTEX's "Deep Caries" and the synthetic generator's ``deep_caries`` are lesions in the
#: inner third of dentin, next to the pulp). ``caries`` (enamel to middle dentin) carries no site.
FINDING_CODINGS: Mapping[str, FindingCoding] = {
    "caries": FindingCoding(DENTAL_CARIES),
    "deep_caries": FindingCoding(DENTAL_CARIES, (INNER_THIRD_OF_DENTIN,)),
}


def caries_structured_report(
    source: Dataset,
    findings: Findings,
    *,
    algorithm_name: str,
    algorithm_version: str,
    include_below_threshold: bool = False,
    series_number: int = 900,
    instance_number: int = 1,
    manufacturer: str = "caries-mim",
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> sr.Comprehensive3DSR:
    """A DICOM SR (TID 1500 Measurement Report, see the module docstring) of ``findings`` on ``source``.

    Args:
        source: the header of the image the findings were computed on (pixel data is not needed and not copied),
            e.g. as :func:`caries_mim.io.dicom.parse_dicom` returns it.
        findings: what :meth:`caries_mim.inference.Predictor.predict` returned for that image.
        algorithm_name, algorithm_version: identify the detector (Algorithm Identification, the device observer,
            and the SR's Manufacturer's Model Name / Software Versions).
        include_below_threshold: also report findings under the operating threshold, marked "Presentation
            Optional".
        series_number, instance_number, manufacturer: of the new SR instance (same study as the source).
        sop_instance_uid, series_instance_uid: the new SR's UIDs; None: new random ones. A caller that may build
            the report of one image twice (a job retried after a crash) passes UIDs derived from the source, so
            that a receiver gets the same instance again, not a second report.
    Returns:
        The SR as a pydicom dataset (write it with :func:`structured_report_bytes`).
    Raises:
        InvalidArgumentError: the source lacks a UID the SR must reference, its size differs from
            ``findings.image_shape``, its SOP class is not a standard image class, a finding has a class with no
            coding in :data:`FINDING_CODINGS`, a non-finite box, or a score outside [0, 1].
    """
    header = evidence_header(source, findings.image_shape, result="a DICOM SR")
    if not algorithm_name.strip() or not algorithm_version.strip():
        raise InvalidArgumentError("algorithm name and version must not be empty")
    algorithm = sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version, manufacturer=manufacturer)
    reported = findings.findings if include_below_threshold else findings.above_threshold
    groups: list[sr.PlanarROIMeasurementsAndQualitativeEvaluations | sr.MeasurementsAndQualitativeEvaluations]
    groups = [_finding_group(header, finding, number, algorithm) for number, finding in enumerate(reported, start=1)]
    if not findings.above_threshold:
        groups.append(_no_caries_group(header, algorithm))

    content = sr.MeasurementReport(
        observation_context=sr.ObservationContext(
            observer_device_context=_device_observer(algorithm_name, algorithm_version, manufacturer)
        ),
        procedure_reported=DENTAL_RADIOGRAPHY,
        # No Image Library (TID 1600, optional): highdicom builds its entries from attributes such as Patient
        # Orientation that intra-oral files may lack, and the image is cited by every region and the evidence anyway.
        imaging_measurements=groups,
    )
    report = sr.Comprehensive3DSR(
        evidence=[nameless_copy(header)],
        content=content,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"{algorithm_name} caries findings",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
    )
    restore_person_names(report, header)
    return report


def structured_report_bytes(report: Dataset) -> bytes:
    """``report`` as a DICOM Part 10 file (preamble, file meta information, then the data set)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, report, enforce_file_format=True)
    return buffer.getvalue()


def _device_observer(name: str, version: str, manufacturer: str) -> sr.ObserverContext:
    # The same algorithm version always gets the same Device Observer UID, so reports from it can be grouped.
    uid = generate_uid(entropy_srcs=["caries-mim device observer", manufacturer, name, version])
    return sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=uid, name=name, manufacturer_name=manufacturer, model_name=f"{name} {version}"
        ),
    )


def _finding_group(
    header: Dataset, finding: Finding, number: int, algorithm: sr.AlgorithmIdentification
) -> sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    coding = FINDING_CODINGS.get(finding.label)
    if coding is None:
        raise InvalidArgumentError(
            f"no DICOM code for the class {finding.label!r}; SR output supports {', '.join(sorted(FINDING_CODINGS))}"
        )
    score, (x0, y0, x1, y1) = checked_finding(finding, number)
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    try:
        region = sr.ImageRegion(
            graphic_type=sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=sr.SourceImageForRegion.from_source_image(header),
        )
    except KeyError as exc:  # highdicom looks the SOP class up in its table of IODs
        raise InvalidArgumentError("the source image's SOP Class is not a standard DICOM image class") from exc
    return sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=generate_uid(), identifier=f"finding {number}"),
        referenced_region=region,
        finding_type=coding.finding_type,
        finding_sites=[sr.FindingSite(site) for site in coding.finding_sites] or None,
        algorithm_id=algorithm,
        measurements=[sr.Measurement(name=codes.DCM.Probability, value=score, unit=codes.UCUM.NoUnits)],
        qualitative_evaluations=[
            sr.QualitativeEvaluation(
                RENDERING_INTENT, PRESENTATION_REQUIRED if finding.above_threshold else PRESENTATION_OPTIONAL
            )
        ],
    )


def _no_caries_group(
    header: Dataset, algorithm: sr.AlgorithmIdentification
) -> sr.MeasurementsAndQualitativeEvaluations:
    return sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=generate_uid(), identifier="no caries found"),
        finding_type=DENTAL_CARIES,
        algorithm_id=algorithm,
        qualitative_evaluations=[sr.QualitativeEvaluation(DENTAL_CARIES, codes.SCT.Absent)],
        source_images=[sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )
