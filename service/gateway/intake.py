"""What happens to an instance sent to the gateway, by C-STORE or by STOW-RS, before the sender is told "stored".

:func:`receive_instance` parses the header (never the pixels), checks that the instance is a radiograph the
detector analyses and that it is what the request announced, and writes it through the store
(:mod:`service.gateway.store`: file synced, row committed, job queued). Nothing else happens before the answer:
inference runs later, in a job (DIMSE association timeouts are 30-60 s; an HTTP client waits no better).

Its outcome is a PS3.4 status, the vocabulary both protocols answer in: C-STORE returns it as the response's
Status (PS3.4 Annex B.2.3), STOW-RS as the Failure Reason of a FailedSOPSequence item (PS3.18 Annex I):
0x0000 stored; 0xA700 out of resources (the disk, the database); 0xA900 the data set does not match the SOP class or
the request; 0xC000 cannot understand (not a parsable data set, a UID missing); 0x0122 SOP class not supported.

Nothing here logs a patient identifier: log lines carry a short hash of the SOP Instance UID.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
from dataclasses import dataclass

from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from caries_mim.errors import InvalidArgumentError
from caries_mim.io.dicom import parse_dicom
from caries_mim.io.options import DEFAULT_MAX_PIXELS
from service.gateway.store import CatalogKeys, GatewayStore, StoreError

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
#: PS3.18 Annex I: the instance's transfer syntax is not one the gateway decodes (STOW-RS only: C-STORE negotiates it).
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


@dataclass(frozen=True)
class Intake:
    """The outcome of one instance: ``status`` (PS3.4; 0 stored), ``comment`` (why not, one sentence, no
    identifier), the UIDs read (empty when unreadable) and whether a job was queued (False: received before)."""

    status: int
    comment: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    queued: bool = False

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


@functools.cache
def decodable_transfer_syntaxes() -> tuple[str, ...]:
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
    return tuple(sorted(found, key=lambda syntax: (syntax.is_compressed, found.index(syntax))))


def instance_tag(sop_instance_uid: str) -> str:
    """A short, stable stand-in for a SOP Instance UID in logs (the UID itself is not logged)."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:12]


def receive_instance(
    store: GatewayStore,
    data: bytes,
    *,
    source: str,
    stable_after_s: float = 0.0,
    announced_sop_class_uid: str | None = None,
    announced_sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
) -> Intake:
    """Check and store one Part 10 file (its meta header names the transfer syntax).

    Args:
        source: who sent it, for the store and the log (the calling AE title, or ``stow-rs``).
        announced_sop_class_uid, announced_sop_instance_uid: what the C-STORE request announced (None for
            STOW-RS, where the part is the only statement).
        study_instance_uid: the study a STOW-RS request to ``/studies/{study}`` requires (None: any).
    """
    tag = instance_tag(announced_sop_instance_uid or "")
    if announced_sop_class_uid is not None and (refused := _unsupported(announced_sop_class_uid)):
        return _refused(tag, source, *refused)
    try:
        # The reader's parser: it refuses a deflated data set that would inflate past what an image can need
        # (a deflate bomb would otherwise be unpacked in memory here).
        header = parse_dicom(data, max_pixels=DEFAULT_MAX_PIXELS, stop_before_pixels=True)
        sop_class_uid = str(header.get("SOPClassUID", ""))
        sop_instance_uid = str(header.get("SOPInstanceUID", ""))
        transfer_syntax_uid = str(header.file_meta.get("TransferSyntaxUID", ""))
    except Exception:  # the reader's typed errors, and whatever else a malformed data set raises in the parser
        return _refused(tag, source, CANNOT_UNDERSTAND, "the data set cannot be parsed")
    tag = instance_tag(sop_instance_uid)
    identified = {"sop_class_uid": sop_class_uid, "sop_instance_uid": sop_instance_uid}
    if not sop_class_uid or not sop_instance_uid:
        # A truncated file parses as far as it goes: without its identity it is not an instance at all.
        return _refused(tag, source, CANNOT_UNDERSTAND, "the data set has no SOP Class or SOP Instance UID")
    if transfer_syntax_uid not in decodable_transfer_syntaxes():
        message = "the transfer syntax is not one the gateway decodes"
        return _refused(tag, source, TRANSFER_SYNTAX_NOT_SUPPORTED, message, **identified)
    if announced_sop_class_uid is None and (refused := _unsupported(sop_class_uid)):
        return _refused(tag, source, *refused, **identified)
    problem, status = _mismatch(header, announced_sop_class_uid, announced_sop_instance_uid, study_instance_uid)
    if problem:
        return _refused(tag, source, status, problem, **identified)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    identified |= {"study_instance_uid": study, "series_instance_uid": series}
    try:
        _, queued = store.add_instance(
            data,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study,
            series_instance_uid=series,
            transfer_syntax_uid=transfer_syntax_uid,
            source=source,
            stable_after_s=stable_after_s,
            keys=CatalogKeys.from_dataset(header),
        )
    except InvalidArgumentError as exc:
        return _refused(tag, source, CANNOT_UNDERSTAND, exc.message, **identified)
    except StoreError as exc:
        log.error("could not record %s from %s: %s", tag, source, exc)
        return Intake(OUT_OF_RESOURCES, "the gateway could not store the instance; try again later", **identified)
    except OSError as exc:
        log.error("could not store %s from %s: %s", tag, source, errno.errorcode.get(exc.errno, "I/O error"))
        return Intake(OUT_OF_RESOURCES, "the gateway could not store the instance; try again later", **identified)
    log.info("stored %s from %s (%s)", tag, source, "queued" if queued else "received before; job kept")
    return Intake(SUCCESS, queued=queued, **identified)


def _unsupported(sop_class_uid: str) -> tuple[int, str] | None:
    """(status, why) for a SOP class the gateway does not analyse, else None."""
    if sop_class_uid in FOR_PROCESSING_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, "For Processing images are not accepted; send For Presentation"
    if sop_class_uid not in ACCEPTED_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"
    return None


def _refused(tag: str, source: str, status: int, comment: str, **identified: str) -> Intake:
    log.warning("refused %s from %s: %s", tag, source, comment)
    return Intake(status, comment, **identified)


def _mismatch(
    header: Dataset, sop_class: str | None, announced: str | None, study: str | None
) -> tuple[str | None, int]:
    """Why a parsed header is not the instance the request announced (and the status), or (None, 0)."""
    missing = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID") if not header.get(keyword)]
    if missing:
        return f"the data set has no {' or '.join(missing)}", CANNOT_UNDERSTAND
    if sop_class is not None and str(header.get("SOPClassUID", "")) != sop_class:
        return "the data set's SOP Class UID differs from the presentation context's", DATA_SET_DOES_NOT_MATCH
    if announced is not None and str(header.get("SOPInstanceUID", "")) != announced:
        return "the data set's SOP Instance UID differs from the request's", DATA_SET_DOES_NOT_MATCH
    if study is not None and str(header.StudyInstanceUID) != study:
        return "the data set belongs to another study than the request's", DATA_SET_DOES_NOT_MATCH
    if "Rows" not in header or "Columns" not in header:
        return "the data set is not an image (no Rows or Columns)", DATA_SET_DOES_NOT_MATCH
    return None, 0
