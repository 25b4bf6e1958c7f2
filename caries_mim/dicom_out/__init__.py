"""Results as DICOM objects that viewers and PACS understand: a Structured Report of the findings."""

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
    "caries_structured_report",
    "structured_report_bytes",
]
