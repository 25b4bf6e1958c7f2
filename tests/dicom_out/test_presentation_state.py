"""The caries GSPS: marks over the original image that a viewer draws, in the source's study, shown as the source
would be shown (windowing, polarity), and valid by the dicom3tools verifier."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, GrayscaleSoftcopyPresentationStateStorage

from caries_mim.dicom_out import caries_presentation_state, structured_report_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Finding, Findings
from caries_mim.io.dicom import parse_dicom
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from tests.dciodvfy import assert_result_verifies
from tests.dicom_factory import make_dataset, ramp, to_bytes
from tests.dicom_out.person_names import check_person_names_kept_and_never_quoted

THRESHOLD = 0.5
DEEP = Finding("deep_caries", 0.91, (100.5, 200.25, 140.0, 236.75), None, True)
SHALLOW = Finding("caries", 0.62, (512.0, 300.125, 530.5, 321.0), None, True)
BELOW = Finding("caries", 0.27, (40.0, 50.0, 60.0, 70.0), None, False)
UIDS = {"sop_instance_uid": "1.2.826.0.1.3680043.8.498.78.1", "series_instance_uid": "1.2.826.0.1.3680043.8.498.78"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Dataset:
    """A synthetic MONOCHROME1 intra-oral radiograph (window, rescale, Presentation LUT Shape INVERSE) as parsed."""
    path = tmp_path_factory.mktemp("gsps_source") / "source.dcm"
    image = render_indexed(7, "labeled", 0, SynthConfig())
    write_dicom(image, path, index=0, seed=7, transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME1")
    return parse_dicom(path.read_bytes(), stop_before_pixels=True)


def findings_on(source: Dataset, *found: Finding) -> Findings:
    return Findings(found, THRESHOLD, (int(source.Rows), int(source.Columns)), None, "0.1.0")


def state_dataset(source: Dataset, findings: Findings, **options) -> Dataset:
    """Build the GSPS, write it as Part 10 and read it back: tests look at what a receiver gets."""
    state = caries_presentation_state(
        source, findings, algorithm_name="caries-mim", algorithm_version="0.1.0+abc123", **options
    )
    return pydicom.dcmread(io.BytesIO(structured_report_bytes(state)))


def marks(state: Dataset) -> list[Dataset]:
    """The annotations that mark findings (every one but the summary's)."""
    return [item for item in state.GraphicAnnotationSequence if item.GraphicLayer != "CAD_SUMMARY"]


def summary(state: Dataset) -> str:
    (item,) = [item for item in state.GraphicAnnotationSequence if item.GraphicLayer == "CAD_SUMMARY"]
    (text,) = item.TextObjectSequence
    return text.UnformattedTextValue


def test_the_state_is_a_part10_gsps_in_the_source_study_referencing_the_source(source):
    data = structured_report_bytes(
        caries_presentation_state(
            source, findings_on(source, DEEP), algorithm_name="caries-mim", algorithm_version="0.1.0"
        )
    )
    assert data[128:132] == b"DICM"
    state = pydicom.dcmread(io.BytesIO(data))
    assert state.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert state.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert state.Modality == "PR"
    assert state.StudyInstanceUID == source.StudyInstanceUID
    assert state.SeriesInstanceUID != source.SeriesInstanceUID
    assert (state.PatientID, state.PatientName) == (source.PatientID, source.PatientName)
    assert (state.SeriesNumber, state.InstanceNumber) == (901, 1)
    assert state.ContentLabel == "CARIES_CAD"
    assert "PixelData" not in state
    (series,) = state.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)


def test_each_finding_at_the_operating_point_is_a_closed_polyline_with_its_caption(source):
    state = state_dataset(source, findings_on(source, DEEP, SHALLOW, BELOW))
    found = marks(state)
    assert len(found) == 2, "one mark per finding at or above the threshold"
    for annotation, finding, number in zip(found, (DEEP, SHALLOW), (1, 2), strict=True):
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        (outline,) = annotation.GraphicObjectSequence
        assert (outline.GraphicType, outline.GraphicAnnotationUnits, outline.GraphicFilled) == (
            "POLYLINE",
            "PIXEL",
            "N",
        )
        x0, y0, x1, y1 = finding.box
        expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        np.testing.assert_allclose(np.reshape(outline.GraphicData, (-1, 2)), expected, atol=1e-3)
        (caption,) = annotation.TextObjectSequence
        assert caption.UnformattedTextValue == f"{finding.label} {finding.score:.2f}"
        np.testing.assert_allclose(caption.AnchorPoint, (x0, y0), atol=1e-3)
        assert outline.TrackingID == caption.TrackingID == f"finding {number}"
        assert outline.TrackingUID == caption.TrackingUID
    assert [annotation.GraphicLayer for annotation in found] == ["DEEP_CARIES", "CARIES"]
    layers = {layer.GraphicLayer: layer for layer in state.GraphicLayerSequence}
    assert set(layers) == {"CAD_SUMMARY", "DEEP_CARIES", "CARIES"}
    assert "GraphicLayerRecommendedDisplayCIELabValue" in layers["CARIES"]
    assert (
        summary(state)
        == "caries-mim 0.1.0+abc123: 2 caries marks at threshold 0.50. CAD marks, not for diagnosis alone."
    )


@pytest.mark.parametrize("found", [(), (BELOW,)], ids=["no findings", "only below threshold"])
def test_no_finding_at_the_operating_point_gives_no_mark_and_says_so(source, found):
    state = state_dataset(source, findings_on(source, *found))
    assert marks(state) == []
    assert "no caries mark at threshold 0.50" in summary(state)


def test_a_box_past_the_image_edge_is_clipped_to_it(source):
    rows, columns = int(source.Rows), int(source.Columns)
    edge = Finding("caries", 0.8, (columns - 10.0, rows - 5.0, columns + 0.4, rows + 2.0), None, True)
    (mark,) = marks(state_dataset(source, findings_on(source, edge)))
    points = np.reshape(mark.GraphicObjectSequence[0].GraphicData, (-1, 2))
    assert points[:, 0].max() == columns
    assert points[:, 1].max() == rows


def test_the_source_presentation_is_kept(source):
    """Window, rescale and polarity come from the source, so the image looks as it does without the marks."""
    state = state_dataset(source, findings_on(source, DEEP))
    (voi,) = state.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (float(source.WindowCenter), float(source.WindowWidth))
    assert (float(state.RescaleSlope), float(state.RescaleIntercept)) == (1.0, 0.0)
    assert state.PresentationLUTShape == source.PresentationLUTShape == "INVERSE"


@pytest.mark.parametrize(
    ("photometric", "window", "shape"),
    [("MONOCHROME1", None, "INVERSE"), ("MONOCHROME2", (2048.0, 4096.0), "IDENTITY")],
)
def test_without_a_presentation_lut_shape_the_polarity_follows_the_photometric_interpretation(
    photometric, window, shape
):
    """A presentation state replaces the image's polarity: a MONOCHROME1 image needs INVERSE to look right."""
    plain = parse_dicom(to_bytes(make_dataset(ramp(), photometric=photometric, window=window)))
    assert "PresentationLUTShape" not in plain
    state = state_dataset(plain, findings_on(plain))
    assert state.PresentationLUTShape == shape
    if window is None:
        assert "SoftcopyVOILUTSequence" not in state, "no window in the source: the viewer's default applies"
    else:
        assert float(state.SoftcopyVOILUTSequence[0].WindowCenter) == window[0]


def test_a_state_built_twice_with_the_same_uids_is_the_same_instance(source):
    first, second = (state_dataset(source, findings_on(source, DEEP), **UIDS) for _ in range(2))
    for state in (first, second):
        assert (state.SOPInstanceUID, state.SeriesInstanceUID) == (
            UIDS["sop_instance_uid"],
            UIDS["series_instance_uid"],
        )
    assert marks(first)[0].GraphicObjectSequence[0].TrackingUID == marks(second)[0].GraphicObjectSequence[0].TrackingUID
    assert state_dataset(source, findings_on(source, DEEP)).SOPInstanceUID != UIDS["sop_instance_uid"]


@pytest.mark.parametrize(
    ("header", "found"),
    [("synthetic", (DEEP, SHALLOW, BELOW)), ("synthetic", ()), ("minimal", (DEEP,))],
    ids=["findings", "none", "minimal source header"],
)
def test_the_state_passes_the_dicom3tools_iod_verifier(source, tmp_path, header, found):
    if header == "minimal":  # no Type 2 patient/study attributes, no laterality, no window
        source = parse_dicom(to_bytes(make_dataset(ramp(rows=300, columns=400))))
    state = caries_presentation_state(
        source, findings_on(source, *found), algorithm_name="caries-mim", algorithm_version="0.1.0+abc123"
    )
    assert_result_verifies(state, tmp_path / "state.dcm", minimal_source=header == "minimal")


@pytest.mark.parametrize(
    ("change", "finding", "message"),
    [
        ("SOPInstanceUID", DEEP, "SOPInstanceUID: a presentation state can only reference"),
        ("StudyInstanceUID", DEEP, "StudyInstanceUID"),
        ("colour", DEEP, "not grayscale"),
        (None, Finding("caries", 1.5, (1, 2, 3, 4), None, True), "outside"),
        (None, Finding("caries", 0.9, (1, 2, float("nan"), 4), None, True), "invalid box"),
        (None, Finding("caries", 0.9, (5, 2, 3, 4), None, True), "invalid box"),
    ],
    ids=["no SOP instance UID", "no study UID", "colour source", "score above 1", "nan box", "inverted box"],
)
def test_unusable_findings_or_source_are_refused_without_leaking_identifiers(source, change, finding, message):
    header = copy.deepcopy(source)
    if change == "colour":
        header.SamplesPerPixel = 3
    elif change is not None:
        del header[change]
    with pytest.raises(InvalidArgumentError, match=message) as raised:
        caries_presentation_state(header, findings_on(source, finding), algorithm_name="m", algorithm_version="1")
    for identifier in (source.PatientID, str(source.PatientName), source.SOPInstanceUID, source.StudyInstanceUID):
        assert identifier not in raised.value.message


def test_findings_for_another_image_size_are_refused(source):
    with pytest.raises(InvalidArgumentError, match="10x20"):
        caries_presentation_state(
            source, Findings((DEEP,), THRESHOLD, (10, 20), None, "0.1.0"), algorithm_name="m", algorithm_version="1"
        )


def test_single_component_person_names_are_kept_and_never_quoted_in_warnings_or_logs(recwarn, caplog):
    check_person_names_kept_and_never_quoted(lambda header: state_dataset(header, findings_on(header)), recwarn, caplog)
