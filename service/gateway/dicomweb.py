"""The gateway's DICOMweb routes (PS3.18): STOW-RS in, QIDO-RS search and WADO-RS retrieve out.

- **STOW-RS** ``POST /dicomweb/studies[/{study}]`` takes ``multipart/related; type="application/dicom"`` (parameters
  quoted or not, a preamble or none, chunked or not). Each part goes through the same intake as a C-STORE
  (:func:`service.gateway.intake.receive_instance`: checked, on disk and queued before it counts as stored), as it
  streams in. The answer is the Store Instances Response (``application/dicom+json``, PS3.18 10.5.3): each stored
  instance in ReferencedSOPSequence with its RetrieveURL, each refused one in FailedSOPSequence with its Failure
  Reason (the PS3.4 status, Annex I), and the HTTP status of table 10.5.3-1: 200 all stored, 202 some stored,
  409 none stored, 400 a malformed request, 415 another media type (408 a stalled body, 413 a part too large, 503
  too many stores at once).
- **QIDO-RS** ``GET /dicomweb/studies``, ``.../series``, ``.../instances`` at each level and relationally
  (``/dicomweb/series``, ``/dicomweb/instances``, ``/studies/{study}/instances``): matching on the catalog's keys
  (UIDs by value or list, StudyDate and StudyTime by range, Modality by wildcard, numbers by value), ``limit``,
  ``offset`` (in the database; at most :data:`MAX_SEARCH_RESULTS` per answer, with a Warning when more match),
  ``includefield``. The gateway indexes no patient attribute: its answers hold none either, and a search by one is
  refused (400), not silently ignored. No match: 200 with ``[]`` (CP-2473).
- **WADO-RS** ``GET`` a study, series or instance as ``multipart/related; type="application/dicom"``: the Accept
  offers by q value; a file as stored to a client accepting its syntax or ``*``, uncompressed little-endian files
  re-encoded between Explicit and Implicit VR (Explicit being the default); compressed files are never decoded here
  (untrusted pixel data is decoded in isolated workers only), so another syntax for them is 406, decided before the
  answer starts. Its ``/metadata`` as DICOM JSON (top-level bulk data by BulkDataURI), and ``/bulk/{tag}`` for those
  values.

Everything held is retrievable: the radiographs received (C-STORE or STOW-RS) and the results made from them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from caries_mim.errors import InvalidArgumentError
from service.errors import ServiceError
from service.gateway.intake import CANNOT_UNDERSTAND, receive_instance
from service.gateway.multipart import MediaType, PartTooLargeError, new_boundary, read_parts, write_parts
from service.gateway.store import (
    CATALOG_COLUMNS,
    CatalogCondition,
    CatalogEntry,
    CatalogGroup,
    GatewayStore,
    is_uid,
)

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
PREFIX = "/dicomweb"

#: STOW-RS Failure Reasons besides the PS3.4 statuses the intake answers (PS3.18 Annex I).
PROCESSING_FAILURE = 0x0110
#: The most results one QIDO-RS answer holds; more are paged with limit and offset (a Warning header says so).
MAX_SEARCH_RESULTS = 1000
#: The largest STOW-RS part (one instance) accepted; a bitewing is 2-5 MB, a panoramic up to ~50 MB uncompressed.
MAX_PART_BYTES = 256 * 1024 * 1024

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")
#: Query parameters that are not matching keys (PS3.18 8.3.4).
_CONTROL_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


def dicomweb_router(
    store: GatewayStore,
    *,
    stable_after_s: float = 0.0,
    public_url: str | None = None,
    max_concurrent_stores: int = 4,
    store_timeout_s: float = 600.0,
) -> APIRouter:
    """The DICOMweb routes on ``store`` (mounted under :data:`PREFIX`).

    Args:
        stable_after_s: the study-stability wait given to the instances stored.
        public_url: the gateway's address as clients reach it (``https://pacs-gw.example.org``), for the retrieve
            URLs in answers; None: taken from each request (its Host header and the port it came in on).
        max_concurrent_stores: STOW-RS requests received at once (each holds at most one part in memory, up to
            :data:`MAX_PART_BYTES`); one more gets 503 with Retry-After at once.
        store_timeout_s: a STOW-RS body still arriving this long after the request started is cut short (the parts
            stored by then stay stored and are answered): a stalled client cannot hold a slot for ever.
    """
    router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])
    stores_in_progress = [0]  # on the event loop only: no lock needed

    def _base_url(request: Request) -> str:
        return (public_url.rstrip("/") if public_url else _request_origin(request)) + PREFIX

    async def stow(request: Request, study: str | None) -> Response:
        media = MediaType.parse(request.headers.get("content-type", ""))
        if media.name != "multipart/related":
            raise ServiceError(415, "unsupported_media_type", f"STOW-RS takes multipart/related, not {media.name!r}")
        part_type = media.parameters.get("type", DICOM).lower()
        if part_type != DICOM:
            raise ServiceError(
                415, "unsupported_media_type", f"only type={DICOM} instances are accepted, not {part_type!r}"
            )
        if stores_in_progress[0] >= max_concurrent_stores:
            raise ServiceError(
                503, "busy", f"{stores_in_progress[0]} stores are in progress; retry shortly", {"Retry-After": "5"}
            )
        stores_in_progress[0] += 1
        stored, failed = [], []
        try:
            body = _before_deadline(request.stream(), store_timeout_s)
            async for part in read_parts(body, media.parameters.get("boundary", ""), max_part_bytes=MAX_PART_BYTES):
                if part.media_type.name not in (DICOM, ""):
                    failed.append(_failure(None, CANNOT_UNDERSTAND))
                    continue
                intake = await run_in_threadpool(
                    receive_instance,
                    store,
                    part.content,
                    source="stow-rs",
                    stable_after_s=stable_after_s,
                    study_instance_uid=study,
                )
                if intake.stored:
                    stored.append(intake)
                else:
                    failed.append(_failure(intake, intake.status))
        except ClientDisconnect:
            # Nobody is left to answer: what was stored stays stored, and a client sending again finds it.
            log.warning("STOW-RS: the client disconnected after %d stored part(s)", len(stored))
            return Response(status_code=400)
        except (InvalidArgumentError, asyncio.TimeoutError) as exc:
            timed_out = not isinstance(exc, InvalidArgumentError)
            problem = f"the body did not arrive within {store_timeout_s:g} s" if timed_out else exc.message
            if not stored:
                status, code = (408, "upload_timeout") if timed_out else (400, "bad_request")
                if isinstance(exc, PartTooLargeError):
                    status, code = 413, "payload_too_large"
                # The rest of a refused body is not read: the connection closes after the answer.
                raise ServiceError(status, code, problem, {"Connection": "close"} if status != 400 else None) from None
            # Parts already stored stay stored: the client must learn which, so answer them and the problem.
            log.warning("STOW-RS body cut short after %d stored part(s): %s", len(stored), problem)
            failed.append(_failure(None, PROCESSING_FAILURE))
        finally:
            stores_in_progress[0] -= 1
        if not stored and not failed:
            raise ServiceError(400, "bad_request", "the request holds no instance")
        base = _base_url(request)
        answer = Dataset()
        if study is not None:
            answer.RetrieveURL = f"{base}/studies/{study}"
        if failed:
            answer.FailedSOPSequence = failed
        if stored:
            answer.ReferencedSOPSequence = [_reference(intake, base) for intake in stored]
        status = 200 if not failed else 202 if stored else 409
        log.info("STOW-RS: %d stored, %d refused", len(stored), len(failed))
        return Response(_json(answer.to_json_dict()), status_code=status, media_type=DICOM_JSON)

    @router.post("/studies", summary="STOW-RS: store instances")
    async def store_instances(request: Request) -> Response:
        return await stow(request, None)

    @router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
    async def store_study_instances(study: str, request: Request) -> Response:
        return await stow(request, study)

    async def search(request: Request, level: str, fixed: dict[str, str]) -> Response:
        _check_json_accepted(request.headers.get("accept", ""))
        query = _parse_query(request.query_params.multi_items(), fixed)
        # One more than asked for: whether to say that the answer is cut (PS3.18 8.3.4.4's Warning).
        limit = min(query.limit if query.limit is not None else MAX_SEARCH_RESULTS, MAX_SEARCH_RESULTS)
        if level == "instance":
            found = await run_in_threadpool(
                store.search_catalog, query.conditions, limit=limit + 1, offset=query.offset
            )
        else:
            found = await run_in_threadpool(
                store.catalog_groups, level, query.conditions, limit=limit + 1, offset=query.offset
            )
        base = _base_url(request)
        answers = [_search_answer(level, item, base) for item in found[:limit]]
        headers = None
        if len(found) > limit and (query.limit is None or query.limit > MAX_SEARCH_RESULTS):
            headers = {"Warning": f'299 caries-mim "at most {MAX_SEARCH_RESULTS} results; page with limit and offset"'}
        return Response(_json(answers), media_type=DICOM_JSON, headers=headers)

    for path, level, names in (
        ("/studies", "study", ()),
        ("/series", "series", ()),
        ("/instances", "instance", ()),
        ("/studies/{StudyInstanceUID}/series", "series", ("StudyInstanceUID",)),
        ("/studies/{StudyInstanceUID}/instances", "instance", ("StudyInstanceUID",)),
        ("/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}/instances", "instance",
         ("StudyInstanceUID", "SeriesInstanceUID")),
    ):  # fmt: skip
        router.add_api_route(
            path, _endpoint(search, names, level), methods=["GET"], summary=f"QIDO-RS: search at the {level} level"
        )

    async def retrieve(request: Request, fixed: dict[str, str]) -> Response:
        acceptable = _acceptable_syntaxes(request.headers.get("accept", ""))
        entries = await run_in_threadpool(store.search_catalog, _fixed_conditions(fixed))
        if not entries:
            raise ServiceError(404, "not_found", "no such study, series or instance here")
        # Every file's syntax is settled before the answer starts: a 406 cannot follow a 200.
        targets = [_chosen_syntax(entry.transfer_syntax_uid, acceptable) for entry in entries]
        boundary = new_boundary()

        def files():
            for entry, target in zip(entries, targets, strict=True):
                syntax = target or entry.transfer_syntax_uid
                yield f'{DICOM}; transfer-syntax="{syntax}"', _encoded(entry, target)

        # Each file is read (and re-encoded when asked) as the previous one is being sent, in Starlette's thread
        # pool (a synchronous iterator).
        return StreamingResponse(
            write_parts(files(), boundary),
            media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
        )

    async def metadata(request: Request, fixed: dict[str, str]) -> Response:
        entries = await run_in_threadpool(store.search_catalog, _fixed_conditions(fixed))
        if not entries:
            raise ServiceError(404, "not_found", "no such study, series or instance here")
        base = _base_url(request)
        documents = await run_in_threadpool(lambda: [_metadata(entry, base) for entry in entries])
        return Response(_json(documents), media_type=DICOM_JSON)

    study_path = "/studies/{StudyInstanceUID}"
    series_path = study_path + "/series/{SeriesInstanceUID}"
    instance_path = series_path + "/instances/{SOPInstanceUID}"
    for path, names in (
        (study_path, ("StudyInstanceUID",)),
        (series_path, ("StudyInstanceUID", "SeriesInstanceUID")),
        (instance_path, ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")),
    ):
        router.add_api_route(path, _endpoint(retrieve, names), methods=["GET"], summary="WADO-RS: retrieve instances")
        router.add_api_route(
            path + "/metadata", _endpoint(metadata, names), methods=["GET"], summary="WADO-RS: retrieve metadata"
        )

    @router.get(instance_path + "/bulk/{tag}", summary="WADO-RS: retrieve a bulk data value")
    async def bulk(StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str, tag: str) -> Response:  # noqa: N803
        fixed = {"StudyInstanceUID": StudyInstanceUID, "SeriesInstanceUID": SeriesInstanceUID}
        fixed["SOPInstanceUID"] = SOPInstanceUID
        entries = await run_in_threadpool(store.search_catalog, _fixed_conditions(fixed))
        value = None if not entries else await run_in_threadpool(_bulk_value, entries[0].path, tag)
        if value is None:
            raise ServiceError(404, "not_found", "no such instance or bulk data element here")
        boundary = new_boundary()
        body = await run_in_threadpool(lambda: b"".join(write_parts([("application/octet-stream", value)], boundary)))
        return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')

    return router


async def _before_deadline(chunks: AsyncIterator[bytes], timeout_s: float) -> AsyncIterator[bytes]:
    """``chunks`` until ``timeout_s`` from now; then asyncio.TimeoutError (a body that stalls or trickles)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    iterator = chunks.__aiter__()
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            yield await asyncio.wait_for(iterator.__anext__(), max(remaining, 0.0))
        except StopAsyncIteration:
            return


def _endpoint(handler: Callable, names: tuple[str, ...], *arguments) -> Callable:
    """A route endpoint calling ``handler(request, *arguments, fixed)``, ``fixed`` the path's UIDs by keyword."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, *arguments, {name: request.path_params[name] for name in names})

    return endpoint


class _Query:
    def __init__(self) -> None:
        self.conditions: list[CatalogCondition] = []
        self.limit: int | None = None
        self.offset = 0


def _parse_query(items: list[tuple[str, str]], fixed: dict[str, str]) -> _Query:
    """QIDO-RS query parameters as catalog conditions (PS3.18 8.3.4); ``fixed`` are the path's UIDs.

    Raises:
        ServiceError: 400 naming the parameter that cannot be used.
    """
    query = _Query()
    query.conditions = _fixed_conditions(fixed)
    for name, value in items:
        lowered = name.lower()
        if lowered in _CONTROL_PARAMETERS:
            if lowered in ("limit", "offset"):
                if not value.isdigit():
                    raise ServiceError(400, "bad_request", f"{name} must be a non-negative integer, got {value!r}")
                setattr(query, lowered, int(value))
            continue
        keyword = _keyword(name)
        if keyword not in CATALOG_COLUMNS:
            raise ServiceError(
                400,
                "bad_request",
                f"{name} is not a searchable attribute here (searchable: {', '.join(CATALOG_COLUMNS)}); "
                "the gateway indexes no patient attribute",
            )
        if not value:
            continue  # universal matching: the attribute is merely asked for in the answer
        try:
            query.conditions.append(_condition(keyword, value))
        except InvalidArgumentError as exc:
            raise ServiceError(400, "bad_request", exc.message) from None
    return query


def _keyword(name: str) -> str:
    """A query parameter's attribute: a keyword (``StudyDate``) or a tag in hex (``00080020``); a sequence path
    (``0040A730.0040A040``) is not searchable here."""
    if len(name) == 8:
        try:
            return keyword_for_tag(int(name, 16)) or name
        except ValueError:
            return name
    if name == "ModalitiesInStudy":
        return "Modality"
    return name


_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: IS values are 32-bit signed integers (PS3.5 6.2).
_IS_RANGE = range(-(2**31), 2**31)


def _condition(keyword: str, value: str) -> CatalogCondition:
    """One query parameter's matching rule (PS3.18 8.3.4.6, PS3.4 C.2.2.2).

    Raises:
        InvalidArgumentError: a value its attribute cannot take (a date that is not YYYYMMDD, a UID with a dash...).
    """
    if keyword in ("StudyDate", "StudyTime"):
        pattern = _DATE if keyword == "StudyDate" else _TIME
        low, dash, high = value.partition("-")
        bounds = [bound.strip() for bound in ((low, high) if dash else (value,))]
        if not any(bounds) or not all(pattern.fullmatch(bound) for bound in bounds if bound):
            raise InvalidArgumentError(
                f"{keyword} takes {'YYYYMMDD' if keyword == 'StudyDate' else 'HHMMSS'} or a range A-B, got {value!r}"
            )
        if dash:
            return CatalogCondition(keyword, "range", tuple(bounds))
        return CatalogCondition(keyword, "equal", tuple(bounds))
    values = tuple(piece.strip() for piece in value.replace("\\", ",").split(",") if piece.strip())
    if not values:
        raise InvalidArgumentError(f"{keyword} has no value to match in {value!r}")
    if keyword in ("SeriesNumber", "InstanceNumber"):
        try:
            numbers = tuple(int(piece) for piece in values)
        except ValueError:
            raise InvalidArgumentError(f"{keyword} must be an integer, got {value!r}") from None
        if any(number not in _IS_RANGE for number in numbers):
            raise InvalidArgumentError(f"{keyword} must be a 32-bit integer, got {value!r}")
        return CatalogCondition(keyword, "equal", numbers)
    if keyword in _UID_KEYWORDS and not all(is_uid(piece) for piece in values):
        raise InvalidArgumentError(f"{keyword} takes UIDs (digits and dots, a list separated by commas), got {value!r}")
    if keyword == "Modality" and any(mark in value for mark in "*?"):
        return CatalogCondition(keyword, "wildcard", (value,))
    return CatalogCondition(keyword, "equal", values)


def _fixed_conditions(fixed: dict[str, str]) -> list[CatalogCondition]:
    return [CatalogCondition(keyword, "equal", (uid,)) for keyword, uid in fixed.items()]


def _search_answer(level: str, found: CatalogGroup | CatalogEntry, base: str) -> dict:
    """One QIDO-RS answer item: a study or series (a :class:`CatalogGroup`) or an instance."""
    answer = Dataset()
    answer.StudyInstanceUID = found.study_instance_uid
    study_url = f"{base}/studies/{found.study_instance_uid}"
    if level == "study":
        answer.StudyDate = found.study_date
        answer.StudyTime = found.study_time
        answer.ModalitiesInStudy = found.modalities
        answer.NumberOfStudyRelatedSeries = found.series
        answer.NumberOfStudyRelatedInstances = found.instances
        answer.RetrieveURL = study_url
        return answer.to_json_dict()
    if level == "series":
        answer.SeriesInstanceUID = found.uid
        answer.Modality = found.modality
        if found.series_number is not None:
            answer.SeriesNumber = found.series_number
        answer.NumberOfSeriesRelatedInstances = found.instances
        answer.RetrieveURL = f"{study_url}/series/{found.uid}"
        return answer.to_json_dict()
    answer.SeriesInstanceUID = found.keys.series_instance_uid
    answer.Modality = found.keys.modality
    answer.SOPClassUID = found.sop_class_uid
    answer.SOPInstanceUID = found.sop_instance_uid
    if found.keys.instance_number is not None:
        answer.InstanceNumber = found.keys.instance_number
    answer.RetrieveURL = f"{study_url}/series/{found.keys.series_instance_uid}/instances/{found.sop_instance_uid}"
    return answer.to_json_dict()


def _check_json_accepted(accept: str) -> None:
    """QIDO-RS answers DICOM JSON only: 406 when the Accept header excludes it (``application/dicom+xml``)."""
    if not accept.strip():
        return
    for offer in accept.split(","):
        media = MediaType.parse(offer)
        if _quality(media) > 0 and media.name in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return
    raise ServiceError(406, "not_acceptable", f"search results are {DICOM_JSON} only, not {accept!r}")


def _quality(media: MediaType) -> float:
    try:
        return float(media.parameters.get("q", "1"))
    except ValueError:
        return 0.0


#: The transfer syntaxes WADO-RS converts between: little-endian uncompressed ones re-encode element by element.
#: Compressed files are never decoded here (the gateway decodes untrusted pixel data only in isolated workers, for
#: the analysis): they are sent as stored, to a client that accepts their syntax or ``*``.
_CONVERTIBLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _acceptable_syntaxes(accept: str) -> list[str]:
    """The transfer syntaxes a WADO-RS Accept header allows, most preferred first (by q, then order): UIDs, or
    ``*`` for "as stored". A DICOM offer without a transfer-syntax parameter means Explicit VR Little Endian
    (PS3.18 8.7.3.5.2); offers with q=0 are left out.

    Raises:
        ServiceError: 406 when no offer is ``multipart/related; type="application/dicom"`` (or a wildcard).
    """
    if not accept.strip():
        return [ExplicitVRLittleEndian]
    offers = []
    for position, offer in enumerate(accept.split(",")):
        media = MediaType.parse(offer)
        inner = media.parameters.get("type", "").lower()
        quality = _quality(media)
        if quality <= 0 or media.name not in ("multipart/related", "multipart/*", "*/*"):
            continue
        if inner not in ("", DICOM, "application/*"):
            continue
        offers.append((-quality, position, media.parameters.get("transfer-syntax", ExplicitVRLittleEndian).strip()))
    if not offers:
        raise ServiceError(
            406, "not_acceptable", f'instances are sent as multipart/related; type="{DICOM}", not {accept!r}'
        )
    return [syntax for _, _, syntax in sorted(offers)]


def _chosen_syntax(stored: str, acceptable: list[str]) -> str | None:
    """The syntax to send a file stored in ``stored`` in: None for as stored, else an uncompressed one.

    Raises:
        ServiceError: 406 when no acceptable syntax is the stored one or one it converts to.
    """
    for syntax in acceptable:
        if syntax in ("*", stored):
            return None
        if syntax in _CONVERTIBLE and stored in _CONVERTIBLE:
            return syntax
    raise ServiceError(
        406,
        "not_acceptable",
        f"an instance is stored as {UID(stored).name}, which the gateway sends as it is: ask for "
        f"transfer-syntax=* or transfer-syntax={stored}",
    )


def _encoded(entry: CatalogEntry, target: str | None) -> bytes:
    """The stored file, or (``target`` given) the same uncompressed instance re-encoded in ``target``."""
    data = entry.path.read_bytes()
    if target is None or target == entry.transfer_syntax_uid:
        return data
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = target
    out = io.BytesIO()
    dataset.save_as(out, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return out.getvalue()


#: Values at or above this size are left out of metadata, replaced by a BulkDataURI (PS3.18 F.2.2).
BULK_DATA_THRESHOLD = 1024


#: Value representations whose large values go by BulkDataURI in metadata.
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def _metadata(entry: CatalogEntry, base: str) -> dict:
    """An instance's DICOM JSON (PS3.18 F.2), its large binary top-level values by BulkDataURI (nested ones, an icon
    in a sequence, stay inline: a URI names a top-level tag). Values that are not what their VR says (a DS with a
    decimal comma) are left out rather than failing the whole answer."""
    dataset = pydicom.dcmread(entry.path)
    instance_url = (
        f"{base}/studies/{entry.study_instance_uid}/series/{entry.keys.series_instance_uid}"
        f"/instances/{entry.sop_instance_uid}"
    )
    bulk = {}
    for element in list(dataset):
        if element.VR in _BULK_VRS and element.value is not None and len(element.value) >= BULK_DATA_THRESHOLD:
            bulk[f"{element.tag:08X}"] = {"vr": element.VR, "BulkDataURI": f"{instance_url}/bulk/{element.tag:08X}"}
            del dataset[element.tag]
    document = dataset.to_json_dict(bulk_data_threshold=2**62, suppress_invalid_tags=True)
    document.update(bulk)
    # The transfer syntax is in the file meta, which to_json_dict leaves out; clients need it to decode bulk data.
    document["00020010"] = {"vr": "UI", "Value": [entry.transfer_syntax_uid]}
    return document


def _bulk_value(path: Path, tag: str) -> bytes | None:
    """The raw value of a top-level element (``tag`` in hex), as stored; None when absent or not a tag."""
    if len(tag) != 8:
        return None
    try:
        number = Tag(int(tag, 16))
    except (ValueError, OverflowError):
        return None
    dataset = pydicom.dcmread(path)
    if number not in dataset:
        return None
    value = dataset[number].value
    return value if isinstance(value, bytes) else None


def _failure(intake, reason: int) -> Dataset:
    item = Dataset()
    if intake is not None and intake.sop_class_uid:
        item.ReferencedSOPClassUID = intake.sop_class_uid
    if intake is not None and intake.sop_instance_uid:
        item.ReferencedSOPInstanceUID = intake.sop_instance_uid
    item.FailureReason = reason
    return item


def _reference(intake, base: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = intake.sop_class_uid
    item.ReferencedSOPInstanceUID = intake.sop_instance_uid
    item.RetrieveURL = (
        f"{base}/studies/{intake.study_instance_uid}/series/{intake.series_instance_uid}"
        f"/instances/{intake.sop_instance_uid}"
    )
    return item


def _request_origin(request: Request) -> str:
    """``scheme://host:port`` of a request. The Host header may lack the port (dicomweb-client leaves it out on
    purpose): then the port the request came in on is added, unless it is the scheme's default."""
    scheme = request.url.scheme
    host = request.headers.get("host", "") or (request.scope.get("server") or ("localhost", None))[0]
    if not host.rsplit("]", 1)[-1].count(":") and request.scope.get("server"):
        port = request.scope["server"][1]
        if port and (scheme, port) not in (("http", 80), ("https", 443)):
            host = f"{host}:{port}"
    return f"{scheme}://{host}"


def _json(document) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
