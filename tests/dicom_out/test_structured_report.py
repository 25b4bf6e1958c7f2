"""The caries SR: a TID 1500 Measurement Report that reads back with pydicom and highdicom and says what we found."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from caries_mim.dicom_out import caries_structured_report, structured_report_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Finding, Findings
from caries_mim.io.dicom import parse_dicom
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from tests.dciodvfy import dciodvfy_findings
from tests.dicom_factory import make_dataset, ramp, to_bytes
from tests.dicom_out.person_names import check_person_names_kept_and_never_quoted

THRESHOLD = 0.5
DEEP = Finding("deep_caries", 0.91, (100.5, 200.25, 140.0, 236.75), None, True)
SHALLOW_BELOW = Finding("caries", 0.27, (512.0, 300.125, 530.5, 321.0), None, False)

# Concept names of the content items read back (code values).
IMAGING_MEASUREMENTS = "126010"
TRACKING_IDENTIFIER = "112039"
FINDING = "121071"
FINDING_SITE = "363698007"
PROBABILITY = "122157"
RENDERING_INTENT = "111056"
IMAGE_REGION = "111030"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Dataset:
    """A synthetic intra-oral radiograph written as DICOM and parsed the way the service parses uploads."""
    path = tmp_path_factory.mktemp("sr_source") / "source.dcm"
    image = render_indexed(7, "labeled", 0, SynthConfig())
    write_dicom(image, path, index=0, seed=7, transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME2")
    return parse_dicom(path.read_bytes())


def findings_on(source: Dataset, *found: Finding) -> Findings:
    return Findings(
        findings=found,
        threshold=THRESHOLD,
        image_shape=(int(source.Rows), int(source.Columns)),
        spacing_mm=None,
        package_version="0.1.0",
    )


def report_dataset(source: Dataset, findings: Findings, **options) -> Dataset:
    """Build the SR, write it as Part 10 and read it back: tests look at what a receiver gets."""
    report = caries_structured_report(
        source, findings, algorithm_name="caries-mim", algorithm_version="0.1.0+abc123", **options
    )
    return pydicom.dcmread(io.BytesIO(structured_report_bytes(report)))


def code_of(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def groups(report: Dataset) -> list[Dataset]:
    """The measurement groups under "Imaging Measurements"."""
    (container,) = [item for item in report.ContentSequence if code_of(item) == IMAGING_MEASUREMENTS]
    return list(container.ContentSequence)


def items(group: Dataset, concept: str) -> Iterator[Dataset]:
    return (item for item in group.ContentSequence if code_of(item) == concept)


def observation_context(report: Dataset) -> dict[str, Dataset]:
    """The report's observation context items by concept name (observer type, device observer name, UID...)."""
    return {code_of(item): item for item in report.ContentSequence if item.RelationshipType == "HAS OBS CONTEXT"}


def the(group: Dataset, concept: str) -> Dataset:
    (item,) = items(group, concept)
    return item


def test_report_is_a_part10_sr_in_the_source_study_citing_the_source(source):
    data = structured_report_bytes(
        caries_structured_report(
            source, findings_on(source, DEEP), algorithm_name="caries-mim", algorithm_version="0.1.0"
        )
    )
    assert data[128:132] == b"DICM"
    report = pydicom.dcmread(io.BytesIO(data))
    assert report.Modality == "SR"
    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.file_meta.MediaStorageSOPInstanceUID == report.SOPInstanceUID
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    assert report.SOPInstanceUID != source.SOPInstanceUID
    assert (report.SeriesNumber, report.InstanceNumber) == (900, 1)
    assert (report.PatientID, report.PatientName) == (source.PatientID, source.PatientName)
    assert (report.CompletionFlag, report.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "PixelData" not in report
    (study,) = report.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )


def test_each_finding_is_a_closed_polyline_around_its_box_on_the_source_image(source):
    report = report_dataset(source, findings_on(source, DEEP, SHALLOW_BELOW), include_below_threshold=True)
    found = groups(report)
    assert len(found) == 2
    for group, finding in zip(found, (DEEP, SHALLOW_BELOW), strict=True):
        region = the(group, IMAGE_REGION)
        assert region.GraphicType == "POLYLINE"
        x0, y0, x1, y1 = finding.box
        expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        np.testing.assert_allclose(np.reshape(region.GraphicData, (-1, 2)), expected, atol=1e-3)
        (image,) = region.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_findings_carry_caries_codes_depth_scores_and_operating_point(source):
    report = report_dataset(source, findings_on(source, DEEP, SHALLOW_BELOW), include_below_threshold=True)
    deep, shallow = groups(report)

    for group, number in ((deep, 1), (shallow, 2)):
        finding_type = the(group, FINDING).ConceptCodeSequence[0]
        assert (finding_type.CodeValue, finding_type.CodingSchemeDesignator) == ("80967001", "SCT")
        assert the(group, TRACKING_IDENTIFIER).TextValue == f"finding {number}"
    site = the(deep, FINDING_SITE).ConceptCodeSequence[0]
    assert (site.CodeValue, site.CodingSchemeDesignator, site.CodeMeaning) == (
        "708579004",
        "SCT",
        "Inner third of dentin",
    )
    assert list(items(shallow, FINDING_SITE)) == []

    for group, finding in ((deep, DEEP), (shallow, SHALLOW_BELOW)):
        value = the(group, PROBABILITY).MeasuredValueSequence[0]
        assert value.FloatingPointValue == pytest.approx(finding.score, abs=1e-12)
        assert float(value.NumericValue) == pytest.approx(finding.score, abs=1e-6)
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert the(deep, RENDERING_INTENT).ConceptCodeSequence[0].CodeValue == "111150"  # presentation required
    assert the(shallow, RENDERING_INTENT).ConceptCodeSequence[0].CodeValue == "111151"  # presentation optional


def test_below_threshold_findings_are_left_out_by_default(source):
    report = report_dataset(source, findings_on(source, DEEP, SHALLOW_BELOW))
    (only,) = groups(report)
    assert the(only, TRACKING_IDENTIFIER).TextValue == "finding 1"
    np.testing.assert_allclose(np.reshape(the(only, IMAGE_REGION).GraphicData, (-1, 2))[0], DEEP.box[:2], atol=1e-3)


@pytest.mark.parametrize("found", [(), (SHALLOW_BELOW,)], ids=["no findings", "only below threshold"])
def test_no_finding_at_the_operating_point_gives_a_readable_sr_that_says_caries_absent(source, found):
    data = structured_report_bytes(
        caries_structured_report(
            source, findings_on(source, *found), algorithm_name="caries-mim", algorithm_version="1"
        )
    )
    report = pydicom.dcmread(io.BytesIO(data))
    (statement,) = groups(report)
    assert list(items(statement, IMAGE_REGION)) == []
    (evaluation,) = items(statement, "80967001")
    assert evaluation.ConceptCodeSequence[0].CodeValue == "272519000"  # SCT Absent
    assert statement.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    parsed = highdicom.sr.srread(io.BytesIO(data))
    assert parsed.content.get_planar_roi_measurement_groups() == []
    assert len(parsed.content.get_image_measurement_groups()) == 1


@pytest.mark.parametrize("found", [(DEEP, SHALLOW_BELOW), ()], ids=["findings", "none"])
def test_the_report_passes_the_dicom3tools_iod_verifier(source, tmp_path, found):
    report = caries_structured_report(
        source,
        findings_on(source, *found),
        algorithm_name="caries-mim",
        algorithm_version="0.1.0+abc123",
        include_below_threshold=True,
    )
    path = tmp_path / "report.dcm"
    path.write_bytes(structured_report_bytes(report))
    errors, warnings = dciodvfy_findings(path)
    assert errors == []
    assert warnings == []


def test_highdicom_reads_the_report_back(source):
    report = caries_structured_report(
        source,
        findings_on(source, DEEP, SHALLOW_BELOW),
        algorithm_name="caries-mim",
        algorithm_version="0.1.0",
        include_below_threshold=True,
    )
    parsed = highdicom.sr.srread(io.BytesIO(structured_report_bytes(report)))
    assert isinstance(parsed, highdicom.sr.Comprehensive3DSR)
    read_groups = parsed.content.get_planar_roi_measurement_groups()
    assert [group.tracking_identifier for group in read_groups] == ["finding 1", "finding 2"]
    assert read_groups[0].finding_type.value == "80967001"
    assert [site.value.value for site in read_groups[0].finding_sites] == ["708579004"]
    assert read_groups[0].reference_type.value == "111030"  # image region
    (probability,) = read_groups[0].get_measurements()
    assert probability.value == pytest.approx(DEEP.score)
    (intent,) = read_groups[1].get_qualitative_evaluations()
    assert (intent.name.value, intent.value.value) == ("111056", "111151")  # rendering intent: optional
    roi = read_groups[1].roi
    np.testing.assert_allclose(roi.value[0], SHALLOW_BELOW.box[:2], atol=1e-3)


def test_device_observer_and_header_name_the_algorithm(source):
    first, second = (
        report_dataset(source, findings_on(source, DEEP), manufacturer="Acme Dental AI", series_number=12)
        for _ in range(2)
    )
    assert (first.Manufacturer, first.ManufacturerModelName, first.SoftwareVersions) == (
        "Acme Dental AI",
        "caries-mim",
        "0.1.0+abc123",
    )
    assert first.SeriesNumber == 12
    observer = observation_context(first)
    assert observer["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # observer type: device
    assert observer["121013"].TextValue == "caries-mim"  # device observer name
    assert observer["121014"].TextValue == "Acme Dental AI"
    procedure = next(item for item in first.ContentSequence if code_of(item) == "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == "1290849002"  # dental radiography
    # The same algorithm version is the same device; every report is a new instance.
    assert observer["121012"].UID == observation_context(second)["121012"].UID  # device observer UID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_source_without_patient_and_study_type2_attributes_still_gives_an_sr():
    """Real files often lack Type 2 attributes (birth date, accession number...); highdicom reads them blindly."""
    source = parse_dicom(to_bytes(make_dataset(ramp())))
    assert "PatientBirthDate" not in source
    report = report_dataset(source, findings_on(source, DEEP))
    assert report.PatientBirthDate == ""
    assert report.PatientID == source.PatientID
    assert "PatientBirthDate" not in source  # the caller's dataset is not modified


def test_single_component_person_names_are_kept_and_never_quoted_in_warnings_or_logs(recwarn, caplog):
    check_person_names_kept_and_never_quoted(
        lambda header: report_dataset(header, findings_on(header, DEEP)), recwarn, caplog
    )


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_source_without_a_uid_to_cite_is_refused_without_leaking_identifiers(source, keyword):
    header = copy.deepcopy(source)  # Dataset(source) would share, and change, the module's source
    del header[keyword]
    with pytest.raises(InvalidArgumentError, match=keyword) as raised:
        caries_structured_report(header, findings_on(source, DEEP), algorithm_name="caries-mim", algorithm_version="1")
    for identifier in (source.PatientID, str(source.PatientName), source.SOPInstanceUID, source.StudyInstanceUID):
        assert identifier not in raised.value.message


@pytest.mark.parametrize(
    ("finding", "image_shape", "sop_class", "message"),
    [
        (Finding("impacted_tooth", 0.9, (1, 2, 3, 4), None, True), None, None, "impacted_tooth"),
        (Finding("caries", 1.5, (1, 2, 3, 4), None, True), None, None, "outside"),
        (Finding("caries", float("nan"), (1, 2, 3, 4), None, True), None, None, "outside"),
        (Finding("caries", 0.9, (1, 2, float("inf"), 4), None, True), None, None, "invalid box"),
        (Finding("caries", 0.9, (5, 2, 3, 4), None, True), None, None, "invalid box"),
        (DEEP, (10, 20), None, "10x20"),
        (DEEP, None, "1.2.3.4.5", "SOP Class"),
    ],
    ids=["unknown class", "score above 1", "nan score", "infinite box", "inverted box", "other size", "private class"],
)
def test_unusable_findings_or_source_are_refused(source, finding, image_shape, sop_class, message):
    header = copy.deepcopy(source)
    if sop_class is not None:
        header.SOPClassUID = sop_class
    findings = findings_on(source, finding)
    if image_shape is not None:
        findings = Findings((finding,), THRESHOLD, image_shape, None, "0.1.0")
    with pytest.raises(InvalidArgumentError, match=message):
        caries_structured_report(header, findings, algorithm_name="caries-mim", algorithm_version="1")


def test_a_report_built_twice_with_the_same_uids_is_the_same_instance(source):
    """A job retried after a crash rebuilds its report: with UIDs derived from the source, a receiver gets the same
    SOP instance again rather than a second report."""
    uids = {"sop_instance_uid": "1.2.826.0.1.3680043.8.498.77.1", "series_instance_uid": "1.2.826.0.1.3680043.8.498.77"}
    first, second = (report_dataset(source, findings_on(source, DEEP), **uids) for _ in range(2))
    for report in (first, second):
        assert (report.SOPInstanceUID, report.SeriesInstanceUID) == (
            uids["sop_instance_uid"],
            uids["series_instance_uid"],
        )
    assert report_dataset(source, findings_on(source, DEEP)).SOPInstanceUID != uids["sop_instance_uid"]
