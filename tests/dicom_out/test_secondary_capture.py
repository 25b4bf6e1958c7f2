"""The caries Secondary Capture: the radiograph with the marks burnt in, in the source's study, saying what it is,
and valid by the dicom3tools verifier."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from caries_mim.dicom_out import caries_secondary_capture, structured_report_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Finding, Findings
from caries_mim.io import read_radiograph
from caries_mim.io.dicom import parse_dicom
from caries_mim.io.radiograph import Radiograph
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from caries_mim.visualization import LABEL_COLOURS, to_uint8
from tests.dciodvfy import assert_result_verifies
from tests.dicom_factory import make_dataset, ramp, to_bytes
from tests.dicom_out.person_names import check_person_names_kept_and_never_quoted

THRESHOLD = 0.5
DEEP = Finding("deep_caries", 0.91, (100.5, 200.25, 140.0, 236.75), None, True)
BELOW = Finding("caries", 0.27, (512.0, 300.0, 560.0, 340.0), None, False)
UIDS = {"sop_instance_uid": "1.2.826.0.1.3680043.8.498.79.1", "series_instance_uid": "1.2.826.0.1.3680043.8.498.79"}


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory) -> tuple[Dataset, Radiograph]:
    """A synthetic intra-oral radiograph: its header as parsed and its pixels as read."""
    path = tmp_path_factory.mktemp("sc_source") / "source.dcm"
    image = render_indexed(7, "labeled", 0, SynthConfig())
    write_dicom(image, path, index=0, seed=7, transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME1")
    return parse_dicom(path.read_bytes(), stop_before_pixels=True), read_radiograph(path)


def findings_on(source: Dataset, *found: Finding) -> Findings:
    return Findings(found, THRESHOLD, (int(source.Rows), int(source.Columns)), None, "0.1.0")


def capture_dataset(source: Dataset, pixels: np.ndarray, findings: Findings, **options) -> Dataset:
    """Build the SC, write it as Part 10 and read it back: tests look at what a receiver gets."""
    image = caries_secondary_capture(
        source, pixels, findings, algorithm_name="caries-mim", algorithm_version="0.1.0+abc123", **options
    )
    return pydicom.dcmread(io.BytesIO(structured_report_bytes(image)))


def test_the_capture_is_a_part10_rgb_image_in_the_source_study_deriving_from_the_source(radiograph):
    source, read = radiograph
    capture = capture_dataset(source, read.pixels, findings_on(source, DEEP))
    assert capture.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert capture.SOPClassUID == SecondaryCaptureImageStorage
    assert capture.StudyInstanceUID == source.StudyInstanceUID
    assert capture.SeriesInstanceUID != source.SeriesInstanceUID
    assert (capture.PatientID, capture.PatientName) == (source.PatientID, source.PatientName)
    assert (capture.SeriesNumber, capture.InstanceNumber) == (902, 1)
    assert (capture.PhotometricInterpretation, capture.SamplesPerPixel, capture.BitsAllocated) == ("RGB", 3, 8)
    assert capture.pixel_array.shape == (source.Rows, source.Columns, 3)
    assert capture.pixel_array.dtype == np.uint8
    assert capture.BurnedInAnnotation == "YES"
    assert list(capture.PatientOrientation) == list(source.PatientOrientation)
    (reference,) = capture.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    for text in (capture.SeriesDescription, capture.ImageComments):
        assert "not for diagnosis alone" in text
    assert "CAD" in capture.SeriesDescription
    assert "PixelSpacing" not in capture, "a picture of the findings is not for measuring"


def test_marks_at_the_operating_point_are_burnt_in_and_the_rest_is_the_radiograph(radiograph):
    source, read = radiograph
    pixels = capture_dataset(source, read.pixels, findings_on(source, DEEP, BELOW)).pixel_array
    gray = to_uint8(read.pixels)

    x0, y0, _, y1 = (round(value) for value in DEEP.box)
    assert tuple(pixels[(y0 + y1) // 2, x0]) == LABEL_COLOURS["deep_caries"], "the left edge of the marked box"
    below_x0, below_y0, _, below_y1 = (round(value) for value in BELOW.box)
    row = (below_y0 + below_y1) // 2
    assert tuple(pixels[row, below_x0]) == (gray[row, below_x0],) * 3, "findings under the threshold are not drawn"
    # Far from the marks and the summary line the picture is the radiograph, gray.
    np.testing.assert_array_equal(pixels[-200:, -200:], np.repeat(gray[-200:, -200:, None], 3, axis=2))


@pytest.mark.parametrize("found", [(), (BELOW,)], ids=["no findings", "only below threshold"])
def test_no_finding_at_the_operating_point_draws_no_box_and_says_so(radiograph, found):
    source, read = radiograph
    capture = capture_dataset(source, read.pixels, findings_on(source, *found))
    assert "no caries mark at threshold 0.50" in capture.ImageComments
    pixels = capture.pixel_array.astype(int)
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0
    assert not coloured.any(), "no coloured box; the summary line is white"


def test_a_capture_built_twice_with_the_same_uids_is_the_same_instance(radiograph):
    source, read = radiograph
    first, second = (capture_dataset(source, read.pixels, findings_on(source, DEEP), **UIDS) for _ in range(2))
    for capture in (first, second):
        assert (capture.SOPInstanceUID, capture.SeriesInstanceUID) == (
            UIDS["sop_instance_uid"],
            UIDS["series_instance_uid"],
        )
    np.testing.assert_array_equal(first.pixel_array, second.pixel_array)
    assert capture_dataset(source, read.pixels, findings_on(source, DEEP)).SOPInstanceUID != UIDS["sop_instance_uid"]


@pytest.mark.parametrize("header", ["synthetic", "minimal"], ids=["synthetic source", "minimal source header"])
def test_the_capture_passes_the_dicom3tools_iod_verifier(radiograph, tmp_path, header):
    source, read = radiograph
    pixels = read.pixels
    if header == "minimal":  # no Type 2 patient/study attributes, no orientation, no laterality
        source = parse_dicom(to_bytes(make_dataset(ramp(rows=300, columns=400))))
        pixels = np.linspace(0.0, 1.0, 300 * 400, dtype=np.float32).reshape(300, 400)
    capture = caries_secondary_capture(
        source, pixels, findings_on(source, DEEP), algorithm_name="caries-mim", algorithm_version="0.1.0+abc123"
    )
    assert_result_verifies(capture, tmp_path / "capture.dcm", minimal_source=header == "minimal")


def test_pixels_of_another_size_are_refused(radiograph):
    source, _ = radiograph
    with pytest.raises(InvalidArgumentError, match="pixels are 10x20"):
        caries_secondary_capture(
            source, np.zeros((10, 20), np.float32), findings_on(source), algorithm_name="m", algorithm_version="1"
        )


@pytest.mark.parametrize(
    ("finding", "message"),
    [
        (Finding("caries", 1.5, (1, 2, 3, 4), None, True), "outside"),
        (Finding("caries", 0.9, (1, 2, float("nan"), 4), None, True), "invalid box"),
        (Finding("caries", 0.9, (5, 2, 3, 4), None, True), "invalid box"),
    ],
    ids=["score above 1", "nan box", "inverted box"],
)
def test_unusable_findings_are_refused(radiograph, finding, message):
    source, read = radiograph
    with pytest.raises(InvalidArgumentError, match=message):
        caries_secondary_capture(
            source, read.pixels, findings_on(source, finding), algorithm_name="m", algorithm_version="1"
        )


def test_a_source_without_a_uid_to_cite_is_refused_without_leaking_identifiers(radiograph):
    source, read = radiograph
    header = copy.deepcopy(source)
    del header.SOPInstanceUID
    with pytest.raises(
        InvalidArgumentError, match="SOPInstanceUID: a Secondary Capture image can only reference"
    ) as raised:
        caries_secondary_capture(header, read.pixels, findings_on(source), algorithm_name="m", algorithm_version="1")
    for identifier in (source.PatientID, str(source.PatientName), source.StudyInstanceUID):
        assert identifier not in raised.value.message


def test_single_component_person_names_are_kept_and_never_quoted_in_warnings_or_logs(recwarn, caplog):
    def build(header: Dataset) -> Dataset:
        pixels = np.zeros((int(header.Rows), int(header.Columns)), np.float32)
        return capture_dataset(header, pixels, findings_on(header))

    check_person_names_kept_and_never_quoted(build, recwarn, caplog)
