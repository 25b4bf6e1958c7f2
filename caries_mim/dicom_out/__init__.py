"""Results as DICOM objects that viewers and PACS understand: a Structured Report of the findings, and for archives
that cannot show SR a Grayscale Softcopy Presentation State (marks over the original) or a Secondary Capture image
(marks burnt in). Write any of them as a Part 10 file with :func:`structured_report_bytes`."""

from caries_mim.dicom_out.presentation_state import caries_presentation_state
from caries_mim.dicom_out.secondary_capture import caries_secondary_capture
from caries_mim.dicom_out.structured_report import (
    DENTAL_CARIES,
    FINDING_CODINGS,
    INNER_THIRD_OF_DENTIN,
    FindingCoding,
    caries_structured_report,
    structured_report_bytes,
)

__all__ = [
    "DENTAL_CARIES",
    "FINDING_CODINGS",
    "INNER_THIRD_OF_DENTIN",
    "FindingCoding",
    "caries_presentation_state",
    "caries_secondary_capture",
    "caries_structured_report",
    "structured_report_bytes",
]
