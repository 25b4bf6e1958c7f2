"""The gateway's DICOMweb routes (PS3.18): STOW-RS in, QIDO-RS search and WADO-RS retrieve out.

- **STOW-RS** ``POST /dicomweb/studies[/{study}]`` takes ``multipart/related; type="application/dicom"`` (parameters
  quoted or not, a preamble or none, chunked or not). Each part goes through the same intake as a C-STORE
  (:func:`service.gateway.intake.receive_instance`: checked, on disk and queued before it counts as stored), as it
  streams in. The answer is the Store Instances Response (``application/dicom+json``, PS3.18 10.5.3): each stored
  instance in ReferencedSOPSequence with its RetrieveURL, each refused one in FailedSOPSequence with its Failure
  Reason (the PS3.4 status, Annex I), and the HTTP status of table 10.5.3-1: 200 all stored, 202 some stored,
  409 none stored, 400 a malformed request, 415 another media type.
- **QIDO-RS** ``GET /dicomweb/studies``, ``.../series``, ``.../instances`` at each level and relationally
  (``/dicomweb/series``, ``/dicomweb/instances``, ``/studies/{study}/instances``): matching on the catalog's keys
  (UIDs by value or list, StudyDate and StudyTime by range, Modality by wildcard, numbers by value), ``limit``,
  ``offset``, ``includefield``. The gateway indexes no patient attribute: its answers hold none either, and a
  search by one is refused (400), not silently ignored. No match: 200 with ``[]`` (CP-2473).
- **WADO-RS** ``GET`` a study, series or instance as ``multipart/related; type="application/dicom"`` (the files as
  stored with ``transfer-syntax=*``; otherwise Explicit VR Little Endian, the default, or another uncompressed
  syntax, decompressing when needed; a compressed syntax other than the stored one is 406), its ``/metadata`` as
  DICOM JSON (bulk data by BulkDataURI), and ``/bulk/{tag}`` for those values.

Everything held is retrievable: the radiographs received (C-STORE or STOW-RS) and the results made from them.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool

from caries_mim.errors import InvalidArgumentError
from service.errors import ServiceError
from service.gateway.intake import receive_instance
from service.gateway.multipart import MediaType, PartTooLargeError, new_boundary, read_parts, write_parts
from service.gateway.store import CATALOG_COLUMNS, CatalogCondition, CatalogEntry, GatewayStore

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
PREFIX = "/dicomweb"

#: STOW-RS Failure Reasons besides the PS3.4 statuses the intake answers (PS3.18 Annex I).
PROCESSING_FAILURE = 0x0110
#: The largest STOW-RS part (one instance) accepted; a bitewing is 2-5 MB, a panoramic up to ~50 MB uncompressed.
MAX_PART_BYTES = 256 * 1024 * 1024

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")
#: Query parameters that are not matching keys (PS3.18 8.3.4).
_CONTROL_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


def dicomweb_router(store: GatewayStore, *, stable_after_s: float = 0.0, public_url: str | None = None) -> APIRouter:
    """The DICOMweb routes on ``store`` (mounted under :data:`PREFIX`).

    Args:
        stable_after_s: the study-stability wait given to the instances stored.
        public_url: the gateway's address as clients reach it (``https://pacs-gw.example.org``), for the retrieve
            URLs in answers; None: taken from each request (its Host header and the port it came in on).
    """
    router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])

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
        stored, failed = [], []
        try:
            async for part in read_parts(
                request.stream(), media.parameters.get("boundary", ""), max_part_bytes=MAX_PART_BYTES
            ):
                if part.media_type.name not in (DICOM, ""):
                    failed.append(_failure(None, 0xC000))
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
        except InvalidArgumentError as exc:
            if not stored:
                too_large = isinstance(exc, PartTooLargeError)
                raise ServiceError(413 if too_large else 400, "payload_too_large" if too_large else "bad_request",
                                   exc.message) from None  # fmt: skip
            # Parts already stored stay stored: the client must learn which, so answer them and the problem.
            log.warning("STOW-RS body cut short after %d stored part(s): %s", len(stored), exc.message)
            failed.append(_failure(None, PROCESSING_FAILURE))
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
        query = _parse_query(request.query_params.multi_items(), fixed)
        entries = await run_in_threadpool(store.search_catalog, query.conditions)
        found = await run_in_threadpool(_summaries, level, entries, store)
        found = found[query.offset :] if query.limit is None else found[query.offset : query.offset + query.limit]
        base = _base_url(request)
        return Response(_json([_search_answer(level, item, base) for item in found]), media_type=DICOM_JSON)

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
        target = _target_transfer_syntax(request.headers.get("accept", ""))
        entries = await run_in_threadpool(store.search_catalog, _fixed_conditions(fixed))
        if not entries:
            raise ServiceError(404, "not_found", "no such study, series or instance here")
        boundary = new_boundary()

        def files():
            for entry in entries:
                yield DICOM, _encoded(entry, target)

        # Each file is read (and transcoded when asked) as the previous one is being sent.
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
        body = b"".join(write_parts([("application/octet-stream", value)], boundary))
        return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')

    return router


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


def _condition(keyword: str, value: str) -> CatalogCondition:
    if keyword in ("StudyDate", "StudyTime") and "-" in value:
        low, _, high = value.partition("-")
        return CatalogCondition(keyword, "range", (low.strip(), high.strip()))
    values = tuple(piece.strip() for piece in value.replace("\\", ",").split(",") if piece.strip())
    if keyword in ("SeriesNumber", "InstanceNumber"):
        try:
            values = tuple(int(piece) for piece in values)
        except ValueError:
            raise InvalidArgumentError(f"{keyword} must be an integer, got {value!r}") from None
    if keyword == "Modality" and any(mark in value for mark in "*?"):
        return CatalogCondition(keyword, "wildcard", (value,))
    return CatalogCondition(keyword, "equal", values)


def _fixed_conditions(fixed: dict[str, str]) -> list[CatalogCondition]:
    return [CatalogCondition(keyword, "equal", (uid,)) for keyword, uid in fixed.items()]


def _summaries(level: str, entries: list[CatalogEntry], store: GatewayStore) -> list[dict]:
    """The matching studies, series or instances, each with its attributes and counts. Counts cover the whole study
    or series, not only the entries that matched (ModalitiesInStudy=SR still counts the radiographs)."""
    if level == "instance":
        return [{"entry": entry} for entry in entries]
    key = "study_instance_uid" if level == "study" else "series_instance_uid"
    matched: dict[str, CatalogEntry] = {}
    for entry in entries:
        group = entry.study_instance_uid if level == "study" else entry.keys.series_instance_uid
        matched.setdefault(group, entry)
    summaries = []
    for group, first in matched.items():
        keyword = "StudyInstanceUID" if level == "study" else "SeriesInstanceUID"
        members = store.search_catalog([CatalogCondition(keyword, "equal", (group,))])
        series = defaultdict(int)
        for member in members:
            series[member.keys.series_instance_uid] += 1
        summaries.append(
            {
                "entry": first,
                "instances": len(members),
                "series": len(series),
                "modalities": sorted({member.keys.modality for member in members if member.keys.modality}),
                key: group,
            }
        )
    return summaries


def _search_answer(level: str, found: dict, base: str) -> dict:
    entry: CatalogEntry = found["entry"]
    answer = Dataset()
    answer.StudyInstanceUID = entry.study_instance_uid
    study_url = f"{base}/studies/{entry.study_instance_uid}"
    if level == "study":
        answer.StudyDate = entry.keys.study_date
        answer.StudyTime = entry.keys.study_time
        answer.ModalitiesInStudy = found["modalities"]
        answer.NumberOfStudyRelatedSeries = found["series"]
        answer.NumberOfStudyRelatedInstances = found["instances"]
        answer.RetrieveURL = study_url
        return answer.to_json_dict()
    answer.SeriesInstanceUID = entry.keys.series_instance_uid
    answer.Modality = entry.keys.modality
    series_url = f"{study_url}/series/{entry.keys.series_instance_uid}"
    if level == "series":
        if entry.keys.series_number is not None:
            answer.SeriesNumber = entry.keys.series_number
        answer.NumberOfSeriesRelatedInstances = found["instances"]
        answer.RetrieveURL = series_url
        return answer.to_json_dict()
    answer.SOPClassUID = entry.sop_class_uid
    answer.SOPInstanceUID = entry.sop_instance_uid
    if entry.keys.instance_number is not None:
        answer.InstanceNumber = entry.keys.instance_number
    answer.RetrieveURL = f"{series_url}/instances/{entry.sop_instance_uid}"
    return answer.to_json_dict()


#: Uncompressed transfer syntaxes WADO-RS can convert any stored file to.
_CONVERTIBLE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _target_transfer_syntax(accept: str) -> str | None:
    """The transfer syntax asked for by a WADO-RS Accept header: None for "as stored" (``transfer-syntax=*``),
    else a UID (Explicit VR Little Endian when not named, PS3.18 8.7.3.5.2).

    Raises:
        ServiceError: 406 for media types other than DICOM, or a compressed syntax (not transcoded here).
    """
    if not accept.strip() or accept.strip() == "*/*":
        return ExplicitVRLittleEndian
    acceptable = []
    for offer in accept.split(","):
        media = MediaType.parse(offer)
        inner = media.parameters.get("type", "").lower()
        if media.name in ("multipart/related", "multipart/*", "*/*") and inner in ("", DICOM, "application/*"):
            syntax = media.parameters.get("transfer-syntax", ExplicitVRLittleEndian).strip()
            if syntax == "*":
                return None
            if syntax in _CONVERTIBLE:
                acceptable.append(syntax)
            continue
    if acceptable:
        return acceptable[0]
    raise ServiceError(
        406,
        "not_acceptable",
        f'instances are sent as multipart/related; type="{DICOM}" with transfer-syntax=* (as stored) or an '
        f"uncompressed one ({', '.join(sorted(_CONVERTIBLE))}); not {accept!r}",
    )


def _encoded(entry: CatalogEntry, target: str | None) -> bytes:
    """The stored file, or the same instance in the ``target`` transfer syntax (uncompressed)."""
    data = entry.path.read_bytes()
    if target is None or target == entry.transfer_syntax_uid:
        return data
    dataset = pydicom.dcmread(io.BytesIO(data))
    if UID(entry.transfer_syntax_uid).is_compressed:
        dataset.decompress()
    out = io.BytesIO()
    dataset.file_meta.TransferSyntaxUID = target
    dataset.save_as(out, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return out.getvalue()


#: Values at or above this size are left out of metadata, replaced by a BulkDataURI (PS3.18 F.2.2).
BULK_DATA_THRESHOLD = 1024


def _metadata(entry: CatalogEntry, base: str) -> dict:
    dataset = pydicom.dcmread(entry.path)
    instance_url = (
        f"{base}/studies/{entry.study_instance_uid}/series/{entry.keys.series_instance_uid}"
        f"/instances/{entry.sop_instance_uid}"
    )

    def bulk_uri(element) -> str:
        return f"{instance_url}/bulk/{element.tag:08X}"

    document = dataset.to_json_dict(bulk_data_threshold=BULK_DATA_THRESHOLD, bulk_data_element_handler=bulk_uri)
    # The transfer syntax is in the file meta, which to_json_dict leaves out; clients need it to decode bulk data.
    document["00020010"] = {"vr": "UI", "Value": [entry.transfer_syntax_uid]}
    return document


def _bulk_value(path: Path, tag: str) -> bytes | None:
    """The raw value of a top-level element (``tag`` in hex), as stored; None when absent or not a tag."""
    try:
        number = Tag(int(tag, 16))
    except ValueError:
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
