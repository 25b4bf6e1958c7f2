"""The gateway's DICOM Storage SCP (pynetdicom): modalities and archives push radiographs here with C-STORE.

What it accepts: Digital Intra-Oral X-Ray, Digital X-Ray and Computed Radiography images For Presentation, in every
transfer syntax the product's reader decodes (uncompressed, deflated, and each compressed one with an installed
decoder: :func:`decodable_transfer_syntaxes`), plus Verification (C-ECHO). The For Processing variants of the first
two are accepted as presentation contexts so that a modality sending them gets an answer it can log, 0x0122 (SOP
Class not supported), rather than a failed association: the detector is trained on display-processed images.

The C-STORE handler does only what must happen before "success": it parses the header (never the pixels), checks
that it is the instance the request announced, and writes it through the store (:mod:`service.gateway.store`:
file synced, row committed, job queued). Inference never runs inside it: association timeouts are 30-60 s.
Statuses (PS3.4 Annex B.2.3): 0x0000 stored; 0xA700 out of resources (the disk); 0xA900 the data set does not match
the SOP class or the request; 0xC000 cannot understand (not a parsable data set, a UID missing); 0x0122 SOP class
not supported. Calling AE titles are checked against a list when one is configured (an unknown one is rejected at
association, "calling AE title not recognized"), and the called AE title must be the gateway's own.

Nothing here logs a patient identifier: log lines carry a short hash of the SOP Instance UID.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import sqlite3
from dataclasses import dataclass, field

from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from caries_mim.errors import CariesMimError, InvalidArgumentError
from caries_mim.io.dicom import parse_dicom
from caries_mim.io.options import DEFAULT_MAX_PIXELS
from service.gateway.store import GatewayStore

log = logging.getLogger(__name__)

#: SOP classes whose instances are analysed.
ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
}
#: SOP classes answered with 0x0122: raw detector data, which the detector was not trained on.
FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122


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


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom knows whose pixel data the reader can decode here (compressed ones only when a
    decoder plugin is installed), uncompressed ones first: the order is the SCP's preference."""
    found = []
    for syntax in uids.AllTransferSyntaxes:
        syntax = uids.UID(syntax)
        if not syntax.is_compressed:
            found.append(syntax)
            continue
        try:
            if get_decoder(syntax).is_available:
                found.append(syntax)
        except NotImplementedError:
            continue
    return sorted(found, key=lambda syntax: (syntax.is_compressed, found.index(syntax)))


def instance_tag(sop_instance_uid: str) -> str:
    """A short, stable stand-in for a SOP Instance UID in logs (the UID itself is not logged)."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:12]


class StorageScp:
    """A running Storage SCP that stores into ``store``; :meth:`start`, then :meth:`stop`."""

    def __init__(self, store: GatewayStore, config: ScpConfig | None = None) -> None:
        self.store = store
        self.config = config or ScpConfig()
        self._server = None

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
        if self._server is not None:
            active = list(self._server.active_associations)
            self._server.shutdown()
            for association in active:
                association.abort()
            for association in active:
                association.join(timeout=self.config.network_timeout_s)
            self._server = None

    def _on_store(self, event: Event) -> Dataset | int:
        sop_class = str(event.context.abstract_syntax)
        announced = str(event.request.AffectedSOPInstanceUID)
        tag = instance_tag(announced)
        calling = event.assoc.requestor.ae_title.strip()
        if sop_class in FOR_PROCESSING_SOP_CLASSES:
            log.warning("refused %s from %s: %s is not analysed", tag, calling, FOR_PROCESSING_SOP_CLASSES[sop_class])
            return _status(SOP_CLASS_NOT_SUPPORTED, "For Processing images are not accepted; send For Presentation")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            return _status(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
        try:
            data = event.encoded_dataset(include_meta=True)
            # The reader's parser: it refuses a deflated data set that would inflate past what an image can need
            # (a deflate bomb would otherwise be unpacked in memory here).
            header = parse_dicom(data, max_pixels=DEFAULT_MAX_PIXELS, stop_before_pixels=True)
        except CariesMimError:
            log.warning("refused %s from %s: the data set cannot be parsed", tag, calling)
            return _status(CANNOT_UNDERSTAND, "the data set cannot be parsed")
        except Exception:  # whatever else a malformed data set raises in the parser
            log.warning("refused %s from %s: the data set cannot be parsed", tag, calling)
            return _status(CANNOT_UNDERSTAND, "the data set cannot be parsed")
        problem, status = _mismatch(header, sop_class, announced)
        if problem:
            log.warning("refused %s from %s: %s", tag, calling, problem)
            return _status(status, problem)
        try:
            _, queued = self.store.add_instance(
                data,
                sop_instance_uid=announced,
                sop_class_uid=sop_class,
                study_instance_uid=str(header.StudyInstanceUID),
                series_instance_uid=str(header.SeriesInstanceUID),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                source=calling,
                stable_after_s=self.config.stable_after_s,
            )
        except InvalidArgumentError as exc:
            log.warning("refused %s from %s: %s", tag, calling, exc.message)
            return _status(CANNOT_UNDERSTAND, exc.message)
        except OSError as exc:
            log.error("could not store %s from %s: %s", tag, calling, errno.errorcode.get(exc.errno, "I/O error"))
            return _status(OUT_OF_RESOURCES, "the gateway could not store the instance; try again later")
        except sqlite3.Error as exc:
            log.error("could not record %s from %s: %s", tag, calling, type(exc).__name__)
            return _status(OUT_OF_RESOURCES, "the gateway could not store the instance; try again later")
        log.info("stored %s from %s (%s)", tag, calling, "queued" if queued else "received before; job kept")
        return SUCCESS


def _mismatch(header: Dataset, sop_class: str, announced: str) -> tuple[str | None, int]:
    """Why a parsed header is not the instance the C-STORE request announced (and the status), or (None, 0)."""
    missing = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID") if not header.get(keyword)]
    if missing:
        return f"the data set has no {' or '.join(missing)}", CANNOT_UNDERSTAND
    if str(header.get("SOPClassUID", "")) != sop_class:
        return "the data set's SOP Class UID differs from the presentation context's", DATA_SET_DOES_NOT_MATCH
    if str(header.get("SOPInstanceUID", "")) != announced:
        return "the data set's SOP Instance UID differs from the request's", DATA_SET_DOES_NOT_MATCH
    if "Rows" not in header or "Columns" not in header:
        return "the data set is not an image (no Rows or Columns)", DATA_SET_DOES_NOT_MATCH
    return None, 0


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: at most 64 characters.
    status.ErrorComment = comment[:64]
    return status
