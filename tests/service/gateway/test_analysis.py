"""The gateway's analysis: a stored radiograph in, the caries SR on it out, with UIDs a retried job reproduces."""

from __future__ import annotations

import pydicom
import pytest
import torch

from caries_mim.detection import CariesDetector
from caries_mim.inference import Predictor
from caries_mim.io import read_radiograph
from caries_mim.io.isolation import IsolatedReader
from caries_mim.io.options import ReadOptions
from caries_mim.package import ModelPackage
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.gateway.analysis import CariesReportAnalysis, report_uids
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
    expected = report_uids(source.SOPInstanceUID, IDENTITY, include_below_threshold=True)
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
