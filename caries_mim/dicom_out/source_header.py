"""What a result object (SR, presentation state, Secondary Capture) copies from the radiograph it is about.

Each of them is an instance in the source's study that references the source image: DICOM requires it to carry the
source's patient and study modules and to cite the source by its SOP Class, SOP Instance, Study and Series UIDs.
:func:`evidence_header` checks the source has those UIDs and fits the findings, and gives the pixel-free copy of its
header that highdicom builds the instance from; :func:`series_laterality` is the Laterality a derived series inherits.

Person names are kept away from highdicom: it checks each name it copies for a caret and quotes one without (a
single-component name such as "ANONYMOUS" is common) in a UserWarning, i.e. on stderr and in the logs. So a result
object is built from :func:`nameless_copy` of the header and given the names back verbatim by
:func:`restore_person_names`. Nothing here logs, and no error message contains an identifier or a UID.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from caries_mim.errors import InvalidArgumentError

#: The source attributes a result object must reference; without them (a PNG, a stripped header) there is nothing
#: to cite.
REQUIRED_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: The person names highdicom reads from the source when it builds an instance (see the module docstring).
PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")
#: Type 2 patient/study attributes highdicom reads from the evidence unconditionally; missing ones become empty
#: ("unknown"), which is what Type 2 means.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def evidence_header(source: Dataset, image_shape: tuple[int, int], *, result: str) -> Dataset:
    """A pixel-free copy of the ``source`` header that highdicom can cite, after checking it fits the findings.

    Args:
        source: the header of the image the findings were computed on (the caller's data set is not changed).
        image_shape: (rows, columns) the findings were computed on.
        result: what is being built, for the error message (e.g. "a DICOM SR").
    Raises:
        InvalidArgumentError: the source lacks one of :data:`REQUIRED_SOURCE_UIDS`, or its Rows/Columns differ
            from ``image_shape``.
    """
    missing = [keyword for keyword in REQUIRED_SOURCE_UIDS if not _value(source, keyword)]
    if missing:
        raise InvalidArgumentError(
            f"the source image has no {', '.join(missing)}: {result} can only reference a DICOM image that has them"
        )
    rows, columns = _value(source, "Rows"), _value(source, "Columns")
    if rows is not None and columns is not None and (int(rows), int(columns)) != tuple(image_shape):
        raise InvalidArgumentError(
            f"the findings are for a {image_shape[0]}x{image_shape[1]} image but the source image is "
            f"{int(rows)}x{int(columns)} (rows x columns)"
        )
    # Group 0x7FE0 is the pixel data: not needed to cite the image, and copying it would cost memory.
    header = Dataset({tag: element for tag, element in source.items() if tag.group != 0x7FE0})
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def nameless_copy(header: Dataset) -> Dataset:
    """``header`` with the :data:`PERSON_NAME_KEYWORDS` empty, to build an instance from without highdicom quoting a
    name in a warning (the header itself is not changed)."""
    nameless = Dataset({tag: element for tag, element in header.items()})
    for keyword in PERSON_NAME_KEYWORDS:
        if keyword in nameless:
            del nameless[keyword]  # a new element below: the old one may be shared with the caller's data set
            setattr(nameless, keyword, "")
    return nameless


def restore_person_names(instance: Dataset, header: Dataset) -> None:
    """Give an instance built from :func:`nameless_copy` the person names of ``header`` back, verbatim."""
    for keyword in PERSON_NAME_KEYWORDS:
        if keyword in header:
            setattr(instance, keyword, header[keyword].value)


def series_laterality(source: Dataset) -> str:
    """General Series Laterality (Type 2C, R or L) of a series derived from ``source``: the source's own, or its
    Image Laterality where that is R or L (an intra-oral image of one side), else empty ("unknown", which Type 2
    allows; B and U are not values of Laterality)."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = source.get(keyword)
        if value in ("R", "L"):
            return value
    return ""


def _value(ds: Dataset, keyword: str) -> object:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value cannot be referenced either
        return None
    return None if value in (None, "") else value
