"""The gateway's DICOM Storage SCP (pynetdicom): modalities and archives push radiographs here with C-STORE.

What it accepts: Digital Intra-Oral X-Ray, Digital X-Ray and Computed Radiography images For Presentation, in every
transfer syntax the product's reader decodes (uncompressed, deflated, and each compressed one with an installed
decoder: :func:`decodable_transfer_syntaxes`), plus Verification (C-ECHO). The For Processing variants of the first
two are accepted as presentation contexts so that a modality sending them gets an answer it can log, 0x0122 (SOP
Class not supported), rather than a failed association: the detector is trained on display-processed images.

The C-STORE handler does only what must happen before "success", :func:`service.gateway.intake.receive_instance`
(header checked, file synced, row committed, job queued), and answers its PS3.4 status (0x0000, 0xA700, 0xA900,
0xC000, 0x0122: see that module). Inference never runs inside it: association timeouts are 30-60 s. Calling AE
titles are checked against a list when one is configured (an unknown one is rejected at association, "calling AE
title not recognized"), and the called AE title must be the gateway's own.

Nothing here logs a patient identifier: log lines carry a short hash of the SOP Instance UID.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from caries_mim.errors import InvalidArgumentError
from service.gateway.intake import (  # noqa: F401 - the statuses are part of this module's interface
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH,
    FOR_PROCESSING_SOP_CLASSES,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    decodable_transfer_syntaxes,
    instance_tag,
    receive_instance,
)
from service.gateway.store import GatewayStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScpConfig:
    """The Storage SCP's network settings.

    Attributes:
        ae_title: the gateway's AE title (the called AE title associations must name).
        host, port: where it listens (port 0: any free port, see :attr:`StorageScp.port`).
        calling_ae_titles: the AE titles allowed to associate; empty: any.
        maximum_pdu_size: largest P-DATA PDU received (bytes; 0: unlimited).
        maximum_associations: associations served at once; more are rejected (transient, "local limit exceeded").
        acse_timeout_s, dimse_timeout_s, network_timeout_s: pynetdicom's timeouts.
        stable_after_s: the study-stability wait given to the store (0: analyse each instance at once).
    """

    ae_title: str = "CARIESMIM"
    host: str = "127.0.0.1"
    port: int = 11112
    calling_ae_titles: tuple[str, ...] = ()
    maximum_pdu_size: int = 64 * 1024
    maximum_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    stable_after_s: float = 0.0
    transfer_syntaxes: tuple[str, ...] = field(default_factory=lambda: tuple(decodable_transfer_syntaxes()))

    def __post_init__(self) -> None:
        for title in (self.ae_title, *self.calling_ae_titles):
            if not is_ae_title(title):
                raise InvalidArgumentError(f"{title!r} is not an AE title (1-16 ASCII characters, no backslash)")
        if not 0 <= self.port <= 65535:
            raise InvalidArgumentError(f"port must be in [0, 65535], got {self.port}")
        if self.maximum_associations < 1:
            raise InvalidArgumentError(f"maximum_associations must be >= 1, got {self.maximum_associations}")
        if not self.stable_after_s >= 0:
            raise InvalidArgumentError(f"stable_after_s must be >= 0, got {self.stable_after_s}")


def is_ae_title(title: str) -> bool:
    """Whether ``title`` can be a DICOM AE title: 1-16 ASCII characters once trimmed, no backslash."""
    return 0 < len(title.strip()) <= 16 and "\\" not in title and title.isascii()


class StorageScp:
    """A running Storage SCP that stores into ``store``; :meth:`start`, then :meth:`stop`."""

    def __init__(self, store: GatewayStore, config: ScpConfig | None = None) -> None:
        self.store = store
        self.config = config or ScpConfig()
        self._server = None
        self._stopping = threading.Lock()

    def _application_entity(self) -> AE:
        config = self.config
        ae = AE(ae_title=config.ae_title)
        ae.require_called_aet = True
        if config.calling_ae_titles:
            ae.require_calling_aet = list(config.calling_ae_titles)
        ae.maximum_pdu_size = config.maximum_pdu_size
        ae.maximum_associations = config.maximum_associations
        ae.acse_timeout = config.acse_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        ae.network_timeout = config.network_timeout_s
        for sop_class in (*ACCEPTED_SOP_CLASSES, *FOR_PROCESSING_SOP_CLASSES):
            ae.add_supported_context(sop_class, list(config.transfer_syntaxes))
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        """Listen (in pynetdicom's threads) until :meth:`stop`."""
        if self._server is not None:
            return
        self._server = self._application_entity().start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)],
        )
        log.info("storage SCP %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when configured with 0)."""
        if self._server is None:
            raise RuntimeError("the storage SCP is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening, abort the associations in progress and wait for their threads (a C-STORE cut short is
        not answered "success", so its sender will send it again)."""
        with self._stopping:  # a second caller (the gateway's stop after the signal's) waits for the first
            if self._server is None:
                return
            active = list(self._server.active_associations)
            self._server.shutdown()
            for association in active:
                association.abort()
            for association in active:
                association.join(timeout=self.config.network_timeout_s)
            self._server = None

    def _on_store(self, event: Event) -> Dataset | int:
        # The meta header is built from the presentation context: the file is stored as it was sent.
        intake = receive_instance(
            self.store,
            event.encoded_dataset(include_meta=True),
            source=event.assoc.requestor.ae_title.strip(),
            stable_after_s=self.config.stable_after_s,
            announced_sop_class_uid=str(event.context.abstract_syntax),
            announced_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        )
        return SUCCESS if intake.stored else _status(intake.status, intake.comment)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: at most 64 characters.
    status.ErrorComment = comment[:64]
    return status
