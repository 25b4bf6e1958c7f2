"""The Storage SCP against pynetdicom's own SCU: statuses, AE titles, what is stored, and that it keeps serving."""

from __future__ import annotations

import copy
import errno
import logging

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from caries_mim.errors import InvalidArgumentError
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.gateway.scp import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    ScpConfig,
    StorageScp,
    decodable_transfer_syntaxes,
    instance_tag,
)
from service.gateway.store import GatewayStore, StoreError

IO_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.3.1"


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> dict[str, pydicom.Dataset]:
    """One synthetic intra-oral radiograph per transfer syntax the generator writes, read back as files are."""
    folder = tmp_path_factory.mktemp("radiographs")
    image = render_indexed(0, "labeled", 3, SynthConfig())
    found = {}
    for index, syntax in enumerate(("explicit_vr_little_endian", "rle_lossless", "jpeg2000_lossless")):
        path = folder / f"{syntax}.dcm"
        write_dicom(image, path, index=index, seed=11, transfer_syntax=syntax, photometric="MONOCHROME2")
        found[syntax] = pydicom.dcmread(path)
    return found


@pytest.fixture
def gateway(tmp_path):
    store = GatewayStore(tmp_path / "gateway")
    scp = StorageScp(store, ScpConfig(port=0, calling_ae_titles=("MODALITY", "ARCHIVE")))
    scp.start()
    yield scp
    scp.stop()
    store.close()


def associate(scp: StorageScp, dataset: pydicom.Dataset | None = None, *, calling="MODALITY", called="CARIESMIM"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    if dataset is not None:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", scp.port, ae_title=called)


def send(scp: StorageScp, dataset: pydicom.Dataset, **names) -> int:
    association = associate(scp, dataset, **names)
    assert association.is_established
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    return int(status.Status)


def test_echo_and_a_stored_radiograph_in_each_transfer_syntax(gateway, radiographs):
    association = associate(gateway)
    assert association.is_established
    assert association.send_c_echo().Status == SUCCESS
    association.release()
    for syntax, dataset in radiographs.items():
        assert send(gateway, dataset) == SUCCESS, syntax
        stored = gateway.store.instance(dataset.SOPInstanceUID)
        assert stored.transfer_syntax_uid == dataset.file_meta.TransferSyntaxUID
        assert (stored.study_instance_uid, stored.source) == (dataset.StudyInstanceUID, "MODALITY")
        received = pydicom.dcmread(stored.path)
        assert (received.pixel_array == dataset.pixel_array).all(), syntax
        assert gateway.store.job(dataset.SOPInstanceUID).state == "queued"
    assert gateway.store.summary().counts["queued"] == 3


def test_an_instance_sent_twice_is_stored_once_with_one_job(gateway, radiographs):
    dataset = radiographs["explicit_vr_little_endian"]
    assert send(gateway, dataset) == SUCCESS
    assert send(gateway, dataset, calling="ARCHIVE") == SUCCESS
    assert gateway.store.summary().counts["queued"] == 1
    assert gateway.store.instance(dataset.SOPInstanceUID).source == "ARCHIVE"


def test_for_processing_images_are_refused_as_an_unsupported_sop_class(gateway, radiographs, caplog):
    dataset = copy.deepcopy(radiographs["explicit_vr_little_endian"])
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = IO_FOR_PROCESSING
    with caplog.at_level(logging.WARNING, logger="service.gateway.scp"):
        assert send(gateway, dataset) == SOP_CLASS_NOT_SUPPORTED
    assert "For Processing" in caplog.text
    assert dataset.SOPInstanceUID not in caplog.text, "UIDs are logged hashed"
    assert instance_tag(dataset.SOPInstanceUID) in caplog.text
    assert gateway.store.instance(dataset.SOPInstanceUID) is None


@pytest.mark.parametrize(
    ("edit", "status"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), CANNOT_UNDERSTAND),
        (lambda ds: delattr(ds, "Rows"), DATA_SET_DOES_NOT_MATCH),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3/../x"), CANNOT_UNDERSTAND),
    ],
    ids=["no study uid", "not an image", "uid that is a path"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test's own bad UID, as pydicom writes it
def test_bad_instances_get_the_right_status_and_the_gateway_keeps_serving(gateway, radiographs, edit, status):
    bad = copy.deepcopy(radiographs["explicit_vr_little_endian"])
    edit(bad)
    assert send(gateway, bad) == status
    assert gateway.store.instance(bad.SOPInstanceUID) is None
    assert send(gateway, radiographs["rle_lossless"]) == SUCCESS


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), StoreError("the gateway's database failed (disk full)")]
)
def test_a_full_disk_is_out_of_resources(gateway, radiographs, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(gateway.store, "add_instance", full)
    assert send(gateway, radiographs["explicit_vr_little_endian"]) == OUT_OF_RESOURCES


@pytest.mark.parametrize(("calling", "called"), [("STRANGER", "CARIESMIM"), ("MODALITY", "SOMEONEELSE")])
def test_unknown_calling_or_wrong_called_ae_titles_are_rejected_at_association(gateway, calling, called):
    association = associate(gateway, calling=calling, called=called)
    assert association.is_rejected
    assert associate(gateway).is_established  # and the next caller is served


def test_the_reader_decodes_every_transfer_syntax_offered():
    offered = decodable_transfer_syntaxes()
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"):
        assert syntax in offered
    compressed = [pydicom.uid.UID(syntax).is_compressed for syntax in offered]
    assert compressed == sorted(compressed), "uncompressed syntaxes come first"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ae_title": ""}, "is not an AE title"),
        ({"ae_title": "A" * 17}, "is not an AE title"),
        ({"calling_ae_titles": ("OK", "BAD\\TITLE")}, "is not an AE title"),
        ({"port": 70000}, "port must be in"),
        ({"maximum_associations": 0}, "maximum_associations must be >= 1"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ScpConfig(**settings)
