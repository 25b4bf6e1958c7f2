"""Results sent back by C-STORE: once per destination, retried with backoff while a destination is down."""

from __future__ import annotations

import socket

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from caries_mim.dicom_out import caries_structured_report, structured_report_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Finding, Findings
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service.gateway.sender import Destination, ResultSender
from service.gateway.store import GatewayStore, ResultFile
from service.gateway.worker import JobRunner
from tests.service.gateway.test_store import Clock, receive


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pacs:
    """A destination: a pynetdicom Storage SCP for SRs that answers ``status`` and records what it stored."""

    def __init__(self, port: int, status: int = 0x0000) -> None:
        self.received: list[str] = []
        self.datasets: list[pydicom.Dataset] = []
        self.status = status
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.status == 0x0000:
            self.received.append(str(event.dataset.SOPInstanceUID))
            self.datasets.append(event.dataset)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def completed(tmp_path):
    """A store with one analysed instance whose caries SR awaits delivery to "pacs"."""
    clock = Clock()
    store = GatewayStore(tmp_path / "gateway", clock=clock)
    path = tmp_path / "source.dcm"
    write_dicom(render_indexed(0, "labeled", 2, SynthConfig()), path, index=2, seed=5,
                transfer_syntax="explicit_vr_little_endian", photometric="MONOCHROME2")  # fmt: skip
    source = pydicom.dcmread(path, stop_before_pixels=True)
    found = Findings((Finding("caries", 0.9, (10, 10, 40, 40), None, True),), 0.5, (source.Rows, source.Columns),
                     None, "0.1.0")  # fmt: skip
    report = caries_structured_report(source, found, algorithm_name="caries-mim", algorithm_version="0.1.0")

    def analyse(instance):
        return [ResultFile(report.SOPInstanceUID, Comprehensive3DSRStorage, structured_report_bytes(report))]

    receive(store, 1, data=path.read_bytes())
    JobRunner(store, analyse, owner="gw/worker-0", destinations=("pacs",)).run_once()
    yield store, clock, str(report.SOPInstanceUID)
    store.close()


def test_a_result_reaches_its_destination_once(completed):
    store, _, report_uid = completed
    pacs = Pacs(free_port())
    try:
        sender = ResultSender(store, {"pacs": Destination("pacs", "PACS", "127.0.0.1", pacs.server.server_address[1])},
                              owner="gw/sender")  # fmt: skip
        delivery, stored = sender.send_once()
        assert stored
        assert delivery.result_sop_instance_uid == report_uid
        assert sender.send_once() is None
    finally:
        pacs.stop()
    assert pacs.received == [report_uid]
    assert store.delivery_counts() == {"pending": 0, "sent": 1}


def test_a_destination_that_is_down_gets_the_result_when_it_comes_back(completed):
    store, clock, report_uid = completed
    port = free_port()
    sender = ResultSender(store, {"pacs": Destination("pacs", "PACS", "127.0.0.1", port)}, owner="gw/sender",
                          backoff_s=(5.0, 20.0), timeout_s=5)  # fmt: skip
    for _ in range(4):  # down: nobody listens on the port
        _, stored = sender.send_once()
        assert not stored
        assert sender.send_once() is None, "not due again before its backoff"
        clock.now += 100
    assert store.delivery_counts() == {"pending": 1, "sent": 0}
    pacs = Pacs(port)
    try:
        _, stored = sender.send_once()
        assert stored
    finally:
        pacs.stop()
    assert pacs.received == [report_uid]


def test_backoff_doubles_up_to_the_longest_wait(completed):
    store, clock, _ = completed
    pacs = Pacs(free_port(), status=0xA700)  # out of resources: refused, try again later
    port = pacs.server.server_address[1]
    sender = ResultSender(store, {"pacs": Destination("pacs", "PACS", "127.0.0.1", port)}, owner="gw/sender",
                          backoff_s=(5.0, 20.0))  # fmt: skip
    try:
        for expected in (5.0, 10.0, 20.0, 20.0):
            _, stored = sender.send_once()
            assert not stored
            clock.now += expected - 0.01
            assert sender.send_once() is None
            clock.now += 0.02
    finally:
        pacs.stop()
    row = store._db.read("SELECT attempts, last_error FROM deliveries")[0]
    assert row == (4, "C-STORE status 0xA700")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("", "PACS", "localhost", 104), "needs a name"),
        (("pacs", "A" * 17, "localhost", 104), "is not an AE title"),
        (("pacs", "PACS", "localhost", 0), "port must be in"),
    ],
)
def test_bad_destinations_are_refused(fields, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Destination(*fields)


def test_the_backoff_stays_finite_after_a_week_of_failures(completed):
    store, _, _ = completed
    sender = ResultSender(store, {}, owner="gw/sender", backoff_s=(5.0, 600.0))
    assert [sender.backoff_delay(n) for n in (0, 1, 2, 7, 2000)] == [5.0, 10.0, 20.0, 600.0, 600.0]
