"""The gateway's analysis: a stored radiograph in, the caries SR (and, if chosen, a GSPS and an SC) on it out, with
UIDs a retried job reproduces."""

from __future__ import annotations

import pydicom
import pytest
import torch

from caries_mim.detection import CariesDetector
from caries_mim.errors import InvalidConfigError
from caries_mim.inference import Predictor
from caries_mim.io import read_radiograph
from caries_mim.io.isolation import IsolatedReader
from caries_mim.io.options import ReadOptions
from caries_mim.package import ModelPackage
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.gateway.analysis import (
    RESULT_KIND_DESCRIPTIONS,
    RESULT_KINDS,
    CariesReportAnalysis,
    report_uids,
    result_uids,
)
from service.gateway.store import GatewayStore
from service.gateway.worker import JobRunner
from service.runtime import ModelIdentity
from tests.dciodvfy import dciodvfy_findings
from tests.detection.tiny import tiny_config

IDENTITY = ModelIdentity("caries-mim-test", "0.1.0", "sha256:0123abcd")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(2)
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries")))
    return Predictor(ModelPackage.from_detector(detector, threshold=0.5, version="0.1.0"), device="cpu")


@pytest.fixture
def stored(tmp_path):
    """A store holding one synthetic intra-oral radiograph, as the SCP would have stored it."""
    store = GatewayStore(tmp_path / "gateway")
    path = tmp_path / "radiograph.dcm"
    image = render_indexed(0, "labeled", 4, SynthConfig())
    write_dicom(image, path, index=4, seed=21, transfer_syntax="rle_lossless", photometric="MONOCHROME1")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    store.add_instance(
        path.read_bytes(),
        sop_instance_uid=source.SOPInstanceUID,
        sop_class_uid=source.SOPClassUID,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=source.SeriesInstanceUID,
        transfer_syntax_uid=source.file_meta.TransferSyntaxUID,
        source="MODALITY",
    )
    yield store, source
    store.close()


def test_a_received_radiograph_gets_a_caries_sr_in_its_study(stored, predictor, tmp_path):
    store, source = stored
    analysis = CariesReportAnalysis(predictor, IDENTITY, read_radiograph, include_below_threshold=True)
    JobRunner(store, analysis, owner="gw/worker-0").run_once()
    assert store.job(source.SOPInstanceUID).state == "done"
    (result,) = store.results_for(source.SOPInstanceUID)
    report = pydicom.dcmread(result.path)
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    expected = report_uids(
        source.SOPInstanceUID, IDENTITY, include_below_threshold=True, study_instance_uid=source.StudyInstanceUID
    )
    assert (report.SOPInstanceUID, report.SeriesInstanceUID) == expected
    assert report.StudyInstanceUID == source.StudyInstanceUID
    cited = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert cited.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    errors, _ = dciodvfy_findings(result.path)
    assert errors == []
    # The same image and model analysed again (a retried job) give the same SR instance.
    again = analysis(store.instance(source.SOPInstanceUID))
    assert again[0].sop_instance_uid == report.SOPInstanceUID


def test_a_modality_the_reader_does_not_accept_fails_the_job_with_its_reason(stored, predictor):
    store, source = stored
    analysis = CariesReportAnalysis(predictor, IDENTITY, read_radiograph, ReadOptions(allowed_modalities={"PX"}))
    JobRunner(store, analysis, owner="gw/worker-0").run_once()
    job = store.job(source.SOPInstanceUID)
    assert job.state == "failed"
    assert job.reason == "modality IO is not accepted (allowed: PX)"
    assert store.results_for(source.SOPInstanceUID) == []


def test_the_isolated_reader_decodes_for_the_gateway(stored, predictor):
    store, source = stored
    with IsolatedReader(workers=1) as reader:
        analysis = CariesReportAnalysis(predictor, IDENTITY, reader.read)
        JobRunner(store, analysis, owner="gw/worker-0").run_once()
    assert store.job(source.SOPInstanceUID).state == "done"


def test_report_uids_depend_on_the_source_and_the_model():
    first = report_uids("1.2.3.4", IDENTITY)
    assert report_uids("1.2.3.4", IDENTITY) == first
    assert report_uids("1.2.3.5", IDENTITY)[0] != first[0]
    assert report_uids("1.2.3.5", IDENTITY)[1] == first[1], "one series per model"
    newer = ModelIdentity(IDENTITY.name, "0.2.0", "sha256:feed")
    assert report_uids("1.2.3.4", newer)[0] != first[0]


def test_result_uids_differ_by_kind_and_the_series_by_study():
    """A series belongs to one study in DICOM: the same model's results in two studies are two series."""
    sop_uids = {result_uids(kind, "1.2.3.4", IDENTITY, study_instance_uid="1.2.9")[0] for kind in RESULT_KINDS}
    assert len(sop_uids) == len(RESULT_KINDS)
    for kind in RESULT_KINDS:
        in_study = result_uids(kind, "1.2.3.4", IDENTITY, study_instance_uid="1.2.9")
        assert result_uids(kind, "1.2.3.4", IDENTITY, study_instance_uid="1.2.9") == in_study
        assert result_uids(kind, "1.2.3.5", IDENTITY, study_instance_uid="1.2.9")[1] == in_study[1]
        assert result_uids(kind, "1.2.3.5", IDENTITY, study_instance_uid="1.2.8")[1] != in_study[1]
    # The SR's instance UID is the one report_uids always gave; below-threshold findings change only the SR's.
    assert result_uids("sr", "1.2.3.4", IDENTITY, study_instance_uid="1.2.9")[0] == report_uids("1.2.3.4", IDENTITY)[0]
    for kind, changes in (("sr", True), ("gsps", False), ("sc", False)):
        plain = result_uids(kind, "1.2.3.4", IDENTITY)
        assert (result_uids(kind, "1.2.3.4", IDENTITY, include_below_threshold=True) != plain) == changes


def test_every_result_kind_is_named_and_described_in_one_line():
    assert RESULT_KINDS == ("sr", "gsps", "sc")
    assert tuple(RESULT_KIND_DESCRIPTIONS) == RESULT_KINDS
    for description in RESULT_KIND_DESCRIPTIONS.values():
        assert description
        assert "\n" not in description


def test_all_results_of_a_radiograph_are_kept_valid_and_reproduced(stored, predictor):
    store, source = stored
    analysis = CariesReportAnalysis(predictor, IDENTITY, read_radiograph, outputs=("sc", "gsps", "sr"))
    JobRunner(store, analysis, owner="gw/worker-0").run_once()
    assert store.job(source.SOPInstanceUID).state == "done"
    results = {pydicom.dcmread(result.path).SOPClassUID: result for result in store.results_for(source.SOPInstanceUID)}
    assert set(results) == {
        pydicom.uid.Comprehensive3DSRStorage,
        pydicom.uid.GrayscaleSoftcopyPresentationStateStorage,
        pydicom.uid.SecondaryCaptureImageStorage,
    }
    for kind, sop_class in (
        ("sr", pydicom.uid.Comprehensive3DSRStorage),
        ("gsps", pydicom.uid.GrayscaleSoftcopyPresentationStateStorage),
        ("sc", pydicom.uid.SecondaryCaptureImageStorage),
    ):
        result = pydicom.dcmread(results[sop_class].path)
        expected = result_uids(kind, source.SOPInstanceUID, IDENTITY, study_instance_uid=source.StudyInstanceUID)
        assert (result.SOPInstanceUID, result.SeriesInstanceUID) == expected
        assert result.StudyInstanceUID == source.StudyInstanceUID
        errors, _ = dciodvfy_findings(results[sop_class].path)
        assert errors == [], kind
    state = pydicom.dcmread(results[pydicom.uid.GrayscaleSoftcopyPresentationStateStorage].path)
    assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    capture = pydicom.dcmread(results[pydicom.uid.SecondaryCaptureImageStorage].path)
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert capture.pixel_array.shape == (source.Rows, source.Columns, 3)
    # Run again (a retried job): the same instances, in the order of RESULT_KINDS.
    again = analysis(store.instance(source.SOPInstanceUID))
    assert [result.sop_instance_uid for result in again] == [
        result_uids(kind, source.SOPInstanceUID, IDENTITY, study_instance_uid=source.StudyInstanceUID)[0]
        for kind in RESULT_KINDS
    ]
    assert [result.sop_class_uid for result in again] == [
        pydicom.uid.Comprehensive3DSRStorage,
        pydicom.uid.GrayscaleSoftcopyPresentationStateStorage,
        pydicom.uid.SecondaryCaptureImageStorage,
    ]


def test_an_overlay_alone_can_be_chosen(stored, predictor):
    store, source = stored
    analysis = CariesReportAnalysis(predictor, IDENTITY, read_radiograph, outputs=frozenset({"gsps"}))
    (result,) = analysis(store.instance(source.SOPInstanceUID))
    assert result.sop_class_uid == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage


@pytest.mark.parametrize(
    ("outputs", "message"),
    [(("sr", "pdf"), "unknown gateway output 'pdf'; choose from sr, gsps, sc"), ((), "no gateway output chosen")],
    ids=["unknown", "none"],
)
def test_an_unknown_or_empty_choice_of_outputs_is_a_config_error(predictor, outputs, message):
    with pytest.raises(InvalidConfigError, match=message):
        CariesReportAnalysis(predictor, IDENTITY, read_radiograph, outputs=outputs)
