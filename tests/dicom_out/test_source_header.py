"""What every result object copies from its source: checked UIDs and size, no pixels, Type 2 filled, names kept
away from highdicom and given back verbatim."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from caries_mim.dicom_out.source_header import (
    PERSON_NAME_KEYWORDS,
    evidence_header,
    nameless_copy,
    restore_person_names,
    series_laterality,
)
from caries_mim.errors import InvalidArgumentError
from caries_mim.io.dicom import parse_dicom
from tests.dicom_factory import make_dataset, ramp, to_bytes


@pytest.fixture
def source() -> Dataset:
    ds = make_dataset(ramp())
    ds.ReferringPhysicianName = "DRSECRET"
    return parse_dicom(to_bytes(ds))


def test_the_evidence_header_has_no_pixels_and_every_type2_patient_study_attribute(source):
    header = evidence_header(source, (int(source.Rows), int(source.Columns)), result="a test object")
    assert "PixelData" in source
    assert "PixelData" not in header
    assert (header.PatientBirthDate, header.AccessionNumber) == ("", "")
    assert header.SOPInstanceUID == source.SOPInstanceUID
    assert "PatientBirthDate" not in source, "the caller's data set is not changed"


def test_a_missing_uid_is_refused_naming_the_object_being_built(source):
    del source.SeriesInstanceUID
    with pytest.raises(InvalidArgumentError, match="SeriesInstanceUID: a test object can only reference") as raised:
        evidence_header(source, (int(source.Rows), int(source.Columns)), result="a test object")
    assert source.SOPInstanceUID not in raised.value.message


def test_another_image_size_is_refused(source):
    with pytest.raises(InvalidArgumentError, match="10x20"):
        evidence_header(source, (10, 20), result="a test object")


def test_person_names_are_emptied_in_the_copy_and_restored_verbatim(source):
    nameless = nameless_copy(source)
    assert all(nameless[keyword].value == "" for keyword in PERSON_NAME_KEYWORDS)
    assert (source.PatientName, source.ReferringPhysicianName) == ("TEST^PATIENT", "DRSECRET")
    restore_person_names(nameless, source)
    assert (nameless.PatientName, nameless.ReferringPhysicianName) == ("TEST^PATIENT", "DRSECRET")


@pytest.mark.parametrize(
    ("laterality", "image_laterality", "expected"),
    [("L", None, "L"), (None, "R", "R"), (None, "B", ""), (None, None, "")],
    ids=["own", "image", "both sides", "none"],
)
def test_series_laterality_is_r_or_l_or_unknown(laterality, image_laterality, expected):
    ds = Dataset()
    if laterality is not None:
        ds.Laterality = laterality
    if image_laterality is not None:
        ds.ImageLaterality = image_laterality
    assert series_laterality(ds) == expected
