"""Every setting of the service in one pydantic settings class: command-line flags and ``CARIES_MIM_*`` variables.

Environment variables use the ``CARIES_MIM_`` prefix and the field name in capitals, e.g.
``CARIES_MIM_MODEL=/models/model.cmpkg``, ``CARIES_MIM_API_KEYS=key1,key2``, ``CARIES_MIM_MAX_BATCH_SIZE=8``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from caries_mim.errors import InvalidConfigError
from caries_mim.io.options import DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS
from service.errors import describe_validation_errors


class ServiceSettings(BaseSettings):
    """Settings of one service process.

    Attributes:
        model: path of the model package (``model.cmpkg``) loaded at start-up.
        host, port: where uvicorn listens. A host other than loopback needs API keys, or ``insecure``.
        workers: uvicorn worker processes (each loads its own copy of the model).
        device: "cpu", "cuda", "cuda:N", or None for CUDA when available.
        api_keys: accepted ``Authorization: Bearer`` keys; empty means no authentication (loopback only).
        api_keys_file: a file with one key per line (blank lines and ``#`` comments ignored), added to ``api_keys``.
        insecure: allow binding a non-loopback address without keys.
        max_upload_bytes: largest request body; larger ones get 413 while they stream in.
        max_concurrent_uploads: prediction uploads being received, parsed and decoded at once; one more gets 503
            with Retry-After at once (its body is never parsed). With the queue, this bounds the memory requests
            hold: see docs/service.md, "Limits".
        upload_timeout_s: an upload whose body has not fully arrived this long after the request started gets 408
            (a slow or stalled client cannot hold an upload slot for ever).
        decode_workers: worker processes that decode uploads (``caries_mim.io.isolation``): a decoder that
            crashes, hangs or exhausts memory costs that request only. 0 decodes in the server process (trusted
            input only: a crashing decoder then takes the process down).
        decode_timeout_s: wall-time limit of one decode; past it the worker is killed and the request gets 504.
        decode_memory_mb: memory one decode may allocate; past it the request gets 422 ``image_too_large``.
        max_pixels: largest image (rows x columns) decoded; larger ones get 422 before their pixels are decoded.
        modalities: DICOM modalities accepted.
        allow_non_dicom: accept PNG, JPEG, TIFF, ... besides DICOM.
        max_batch_size: most requests run through the model together.
        window_batch_size: sliding windows per forward pass; None: 64 on a GPU (a micro-batch's windows in a few
            passes), the package's own value on a CPU.
        max_batch_wait_ms: how long the first request of a batch waits for others to join it. 0 (the default)
            never delays a request: a batch is whatever queued while the previous one ran, so batches grow with
            the load and a lone request pays nothing. A few ms can fill GPU batches better at moderate load.
        queue_size: requests waiting for the model; one more gets 503 with Retry-After.
        request_timeout_s: a request still waiting for its result after this gets 504.
        stall_timeout_s: a model batch running longer than this makes ``/healthz`` answer 503, so that an
            orchestrator restarts a process whose model hangs (a stuck GPU kernel, a deadlock); it must exceed the
            slowest batch (a full batch of panoramics on a CPU).
        retry_after_s: the Retry-After a 503 suggests.
        model_name: the name the API reports for the model.
        log_level: level of the JSON logs on stderr.
    """

    model_config = SettingsConfigDict(env_prefix="CARIES_MIM_", extra="ignore")

    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    device: str | None = None
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    insecure: bool = False
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_concurrent_uploads: int = Field(32, ge=1)
    upload_timeout_s: float = Field(60.0, gt=0.0)
    decode_workers: int = Field(2, ge=0)
    decode_timeout_s: float = Field(20.0, gt=0.0)
    decode_memory_mb: int = Field(2048, ge=64)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    modalities: Annotated[list[str], NoDecode] = Field(default_factory=lambda: sorted(DEFAULT_ALLOWED_MODALITIES))
    allow_non_dicom: bool = True
    max_batch_size: int = Field(8, ge=1)
    window_batch_size: int | None = Field(None, ge=1)
    max_batch_wait_ms: float = Field(0.0, ge=0.0)
    queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(60.0, gt=0.0)
    stall_timeout_s: float = Field(300.0, gt=0.0)
    retry_after_s: int = Field(1, ge=1)
    model_name: str = "caries-mim caries detector"
    log_level: str = "INFO"

    @field_validator("api_keys", "modalities", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """An environment variable gives "a,b,c"; a list stays a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> ServiceSettings:
        """Settings from command-line values (which win) over ``CARIES_MIM_*`` variables.

        Raises:
            InvalidConfigError: a value of the wrong type or out of range, from either source, named.
        """
        try:
            return cls(**flags)
        except ValidationError as exc:
            raise InvalidConfigError(
                "invalid service settings (flags or CARIES_MIM_* variables): "
                + describe_validation_errors(exc.errors())
            ) from None

    def accepted_keys(self) -> frozenset[str]:
        """``api_keys`` plus the keys in ``api_keys_file``.

        Raises:
            InvalidConfigError: the key file cannot be read.
        """
        return read_api_keys(self.api_keys, self.api_keys_file)

    def check_bind_security(self) -> None:
        """Refuse to listen beyond this machine without API keys, unless ``insecure`` says so deliberately.

        Raises:
            InvalidConfigError: a non-loopback host, no keys, and not ``insecure``.
        """
        if self.insecure or self.accepted_keys() or is_loopback(self.host):
            return
        raise InvalidConfigError(
            f"refusing to listen on {self.host} without API keys: set CARIES_MIM_API_KEYS or "
            "CARIES_MIM_API_KEYS_FILE (--api-keys-file), or pass --insecure to serve unauthenticated"
        )


def read_api_keys(keys: list[str] | tuple[str, ...], keys_file: Path | None) -> frozenset[str]:
    """``keys`` plus those in ``keys_file`` (one per line; blank lines and ``#`` comments ignored).

    Raises:
        InvalidConfigError: the key file cannot be read.
    """
    accepted = {key.strip() for key in keys if key.strip()}
    if keys_file is not None:
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InvalidConfigError(f"api_keys_file {keys_file}: cannot be read ({exc.strerror})") from None
        accepted.update(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    return frozenset(accepted)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
