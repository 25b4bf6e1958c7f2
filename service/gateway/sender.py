"""Sends the gateway's results back by C-STORE (pynetdicom SCU), with retries, until each destination has them.

Each result is queued once per destination when its job completes (:meth:`GatewayStore.complete`); a sender claims
due deliveries under a lease, sends the file, and marks it sent on a success or warning status (PS3.4 B.2.3: 0x0000;
0xB000, 0xB006, 0xB007 stored with a coercion or a warning). Anything else (association refused or unreachable, a
failure status) is retried later with exponential backoff, without an upper count: a destination that is down gets
its results when it comes back. The results keep their SOP Instance UIDs, so a result sent again (a sender killed
between the send and its record) is the same instance to the receiver, not a second report.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

from caries_mim.errors import InvalidArgumentError
from service.gateway.intake import instance_tag
from service.gateway.loop import repeat_until_stopped
from service.gateway.scp import is_ae_title
from service.gateway.store import Delivery, GatewayStore

log = logging.getLogger(__name__)

#: C-STORE statuses after which the receiver holds the instance.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM node (AE title, host, port) under a name used in the store and the logs."""

    name: str
    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise InvalidArgumentError("a destination needs a name")
        if not is_ae_title(self.ae_title):
            raise InvalidArgumentError(f"destination {self.name}: {self.ae_title!r} is not an AE title")
        if not 0 < self.port <= 65535:
            raise InvalidArgumentError(f"destination {self.name}: port must be in [1, 65535], got {self.port}")


class ResultSender:
    """Sends due deliveries to their destinations as ``owner``, calling as ``calling_ae_title``.

    Args:
        backoff_s: (first, longest) wait after a failed attempt; it doubles with each failure up to the longest.
        timeout_s: pynetdicom's ACSE, DIMSE and network timeouts for one send.
    """

    def __init__(
        self,
        store: GatewayStore,
        destinations: dict[str, Destination],
        *,
        calling_ae_title: str = "CARIESMIM",
        owner: str,
        lease_s: float = 120.0,
        backoff_s: tuple[float, float] = (5.0, 600.0),
        timeout_s: float = 30.0,
    ) -> None:
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise InvalidArgumentError(f"backoff_s must be (first, longest) with 0 < first <= longest, got {backoff_s}")
        self.store = store
        self.destinations = destinations
        self.calling_ae_title = calling_ae_title
        self.owner = owner
        self.lease_s = lease_s
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    def send_once(self) -> tuple[Delivery, bool] | None:
        """Claim and attempt one due delivery: (the delivery, whether it was stored), or None when none is due."""
        delivery = self.store.claim_delivery(self.owner, self.lease_s)
        if delivery is None:
            return None
        tag = instance_tag(delivery.result_sop_instance_uid)
        destination = self.destinations.get(delivery.destination)
        error = self._send(delivery, destination) if destination else "the destination is no longer configured"
        if error is None:
            self.store.delivered(delivery, self.owner)
            log.info("sent %s to %s", tag, delivery.destination)
            return delivery, True
        delay = self.backoff_delay(delivery.attempts)
        self.store.retry_later(delivery, self.owner, error, delay)
        log.warning("could not send %s to %s (%s); next try in %.0f s", tag, delivery.destination, error, delay)
        return delivery, False

    def backoff_delay(self, failed_attempts: int) -> float:
        """Seconds to wait after a delivery's failed attempt number ``failed_attempts + 1``: the first wait,
        doubled each time, at most the longest."""
        # The exponent is capped: 2**1024 overflows a float, and a week-long outage reaches that many attempts.
        return min(self.backoff_s[0] * 2 ** min(failed_attempts, 40), self.backoff_s[1])

    def run(self, stop: threading.Event, *, idle_s: float = 1.0, error_pause_s: float = 5.0) -> None:
        """Send until ``stop`` is set, waiting ``idle_s`` whenever nothing is due; an error of the store itself is
        logged and retried after ``error_pause_s`` (the sender never dies of one)."""
        repeat_until_stopped(
            self.send_once, stop, name=f"result sender {self.owner}", idle_s=idle_s, error_pause_s=error_pause_s
        )

    def _send(self, delivery: Delivery, destination: Destination) -> str | None:
        """None when the destination stored the result, else why not (one short phrase, no identifiers)."""
        try:
            dataset = pydicom.dcmread(delivery.path)
        except (OSError, InvalidDicomError) as exc:
            return f"the result file cannot be read ({type(exc).__name__})"
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        # Without it a host that never answers holds the (single) sender for the system's TCP timeout.
        ae.connection_timeout = self.timeout_s
        # The file's own transfer syntax, and Implicit VR Little Endian, the one every SCP must accept (pynetdicom
        # re-encodes an uncompressed data set to it).
        syntaxes = list(dict.fromkeys([dataset.file_meta.TransferSyntaxUID, ImplicitVRLittleEndian]))
        ae.add_requested_context(dataset.SOPClassUID, syntaxes)
        association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not association.is_established:
            return "association rejected" if association.is_rejected else "destination unreachable"
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
        code = int(status.Status) if "Status" in status else None
        if code in STORED_STATUSES:
            return None
        return "no C-STORE response" if code is None else f"C-STORE status 0x{code:04X}"
