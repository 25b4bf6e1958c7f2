"""The model package: one self-describing file (``model.cmpkg``) that carries everything needed to predict.

The file is a plain dict readable with ``torch.load(weights_only=True)`` (no pickled classes, so loading an
untrusted file cannot run code)::

    {"format": "caries-mim-model-package", "version": 1,
     "package_version": "1.0.0",
     "detector_config": DetectorConfig.to_dict(),
     "preprocessing": preprocessing_description(config),
     "threshold": 0.42, "target_sensitivity": 0.9,
     "provenance": {...},
     "state_dict": {name: tensor},
     "checksum": {"algorithm": "sha256", "value": "<64 hex>"}}

The checksum (:func:`package_checksum`) covers every other key, weights included, and is verified on every read:
a flipped weight bit or an edited threshold is refused instead of silently predicting something else.
See ``docs/model_package.md`` for the format and its versioning policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from caries_mim.atomic_files import atomic_path
from caries_mim.detection.config import DetectorConfig
from caries_mim.errors import CariesMimError, InvalidArgumentError, InvalidCheckpointError, InvalidConfigError
from caries_mim.models.encoder_file import other_kind, read_weights_file

if TYPE_CHECKING:
    from caries_mim.detection.detector import CariesDetector
    from caries_mim.inference import Predictor

PACKAGE_FORMAT = "caries-mim-model-package"
PACKAGE_FORMAT_VERSION = 1
#: What a package is, for messages about a file that is not one.
PACKAGE_DESCRIPTION = (
    "a caries-mim model package (the model.cmpkg that `caries-mim finetune` writes: weights, config, threshold "
    "and checksum in one file; see docs/model_package.md)"
)
CHECKSUM_ALGORITHM = "sha256"
#: The file name the pipelines give a package.
PACKAGE_FILE_NAME = "model.cmpkg"
#: The shipped models (``caries-mim reference`` builds them): ``models/`` at the repository root, which the Docker
#: images copy to the same place beside the package.
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"
REFERENCE_DETECTOR = SHIPPED_MODELS / "reference_detector.cmpkg"
#: The MIM-pretrained encoder the reference detector was fine-tuned from (what the demo fine-tunes from).
FOUNDATION_ENCODER = SHIPPED_MODELS / "foundation_encoder.pt"
#: Names the resize-pad rules of :func:`caries_mim.detection.preprocessing.prepare_image`; each changes with its rule.
PREPROCESSING_METHOD = "letterbox-long-side-v1"
PHYSICAL_PREPROCESSING_METHOD = "physical-spacing-v1"

_METADATA_KEYS = (
    "format",
    "version",
    "package_version",
    "detector_config",
    "preprocessing",
    "threshold",
    "target_sensitivity",
    "provenance",
)


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A trained detector with everything needed to predict with it.

    Attributes:
        config: the detector's architecture, classes and input geometry.
        state_dict: the :class:`~caries_mim.detection.detector.CariesDetector` weights (CPU tensors).
        threshold: operating threshold in [0, 1] on the detection score; a finding counts when score >= threshold.
        target_sensitivity: the lesion sensitivity in [0, 1] the threshold was chosen for, or None.
        version: the package's own version string (e.g. "1.0.0"), chosen by whoever releases it.
        provenance: free-form plain types (training config, data fingerprint, code version, validation metrics).
    """

    config: DetectorConfig
    state_dict: dict[str, torch.Tensor]
    threshold: float
    target_sensitivity: float | None = None
    version: str = "0.0.0"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, DetectorConfig):
            raise InvalidArgumentError(f"a model package needs a DetectorConfig, got {type(self.config).__name__}")
        _check_fraction("threshold", self.threshold)
        if self.target_sensitivity is not None:
            _check_fraction("target_sensitivity", self.target_sensitivity)
        if not isinstance(self.version, str) or not self.version.strip():
            raise InvalidArgumentError(f"package version must be a non-empty string, got {self.version!r}")
        if not isinstance(self.state_dict, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in self.state_dict.items()
        ):
            raise InvalidArgumentError("a model package state_dict must map names to tensors")
        if not isinstance(self.provenance, dict):
            raise InvalidArgumentError(f"provenance must be a mapping, got {type(self.provenance).__name__}")
        _canonical_json(self.provenance, what="provenance")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.target_sensitivity is not None:
            object.__setattr__(self, "target_sensitivity", float(self.target_sensitivity))
        state = {name: tensor.detach().cpu() for name, tensor in self.state_dict.items()}
        object.__setattr__(self, "state_dict", state)

    @classmethod
    def from_detector(
        cls,
        detector: CariesDetector,
        threshold: float,
        *,
        target_sensitivity: float | None = None,
        version: str = "0.0.0",
        provenance: dict[str, Any] | None = None,
    ) -> ModelPackage:
        """Package a trained detector's config and weights."""
        return cls(
            config=detector.config,
            state_dict=dict(detector.state_dict()),
            threshold=threshold,
            target_sensitivity=target_sensitivity,
            version=version,
            provenance=dict(provenance or {}),
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def preprocessing(self) -> dict[str, Any]:
        return preprocessing_description(self.config)

    @cached_property
    def checksum(self) -> str:
        """SHA-256 (hex) of the package's contents, as its file records it. Computed once (it hashes every weight);
        :func:`read_package` sets it to the value it has just verified."""
        return package_checksum(self._contents())

    def to_payload(self) -> dict[str, Any]:
        """The dict written to the file, checksum included."""
        payload = self._contents()
        payload["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "value": self.checksum}
        return payload

    def _contents(self) -> dict[str, Any]:
        """Everything the file holds but the checksum."""
        return {
            "format": PACKAGE_FORMAT,
            "version": PACKAGE_FORMAT_VERSION,
            "package_version": self.version,
            "detector_config": self.config.to_dict(),
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "target_sensitivity": self.target_sensitivity,
            "provenance": self.provenance,
            "state_dict": self.state_dict,
        }


def preprocessing_description(config: DetectorConfig) -> dict[str, Any]:
    """What :func:`~caries_mim.detection.preprocessing.prepare_image` does to an input, as plain values.

    Stored for readers outside Python; on read it must equal what this code would do, so a package is never
    run with a preprocessing other than the one it was trained with.
    """
    common = {
        "input": "single-channel (H, W) float32 in [0, 1], higher = more attenuating",
        "image_size": config.image_size,
        "interpolation_shrink": "area",
        "interpolation_enlarge": "bilinear",
        "sliding_window": {"roi_size": config.roi_size, "overlap": config.sliding_window_overlap},
        "input_mean": config.encoder.input_mean,
        "input_std": config.encoder.input_std,
        "boxes": "[x0, y0, x1, y1] in pixels of the original image",
    }
    if config.spacing_mm is not None:
        return {
            "method": PHYSICAL_PREPROCESSING_METHOD,
            **common,
            "spacing_mm": config.spacing_mm,
            "assumed_long_side_mm": config.assumed_long_side_mm,
            "resize": (
                "aspect kept; factor = source spacing / spacing_mm, where the source spacing is the mean of the "
                "image's (row, column) spacing, or assumed_long_side_mm / long side in pixels when it has none; "
                "the factor is clamped to [1/16, 16]"
            ),
            "padding": "zeros at bottom and right, to at least roi_size on each side",
        }
    return {
        "method": PREPROCESSING_METHOD,
        **common,
        "max_downscale": config.max_downscale,
        "resize": "aspect kept; long side L -> image_size if L <= image_size * max_downscale, else L / max_downscale",
        "padding": "zeros at bottom and right, to image_size x image_size when the resized image fits",
    }


def shipped_reference_detector() -> Path:
    """The shipped reference detector, what ``serve`` and ``predict`` use when no model is given.

    Raises:
        InvalidConfigError: it is not there (an installation without ``models/``, or before it was built).
    """
    return _shipped(
        REFERENCE_DETECTOR, "no model given and no shipped reference detector", "--model PKG (or set CARIES_MIM_MODEL)"
    )


def shipped_foundation_encoder() -> Path:
    """The shipped MIM-pretrained foundation encoder, what ``caries-mim demo`` fine-tunes from by default.

    Raises:
        InvalidConfigError: it is not there (an installation without ``models/``, or before it was built).
    """
    return _shipped(FOUNDATION_ENCODER, "no shipped foundation encoder", "--encoder ENCODER_PT")


def _shipped(path: Path, missing: str, instead: str) -> Path:
    if not path.is_file():
        raise InvalidConfigError(
            f"{missing} at {path}: pass {instead}, or build it with `make reference-cpu` (about 100 minutes on 2 "
            "CPU cores)"
        )
    return path


def package_checksum(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) over the canonical form of everything in ``payload`` but ``checksum``.

    The hashed bytes are: the canonical JSON (sorted keys, no spaces, ASCII, no NaN) of
    ``{"metadata": {key: payload[key] for key in _METADATA_KEYS}, "tensors": [[name, dtype, shape], ...]}``
    with tensors in sorted name order, then a NUL byte, then each tensor's raw bytes (C order, little-endian
    as stored in memory) in the same order. Dtypes and shapes fix every tensor's length, so the split is
    unambiguous.
    """
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise InvalidArgumentError("a package payload needs a state_dict mapping")
    names = sorted(state)
    index = [[name, str(state[name].dtype), list(state[name].shape)] for name in names]
    metadata = {key: payload.get(key) for key in _METADATA_KEYS}
    digest = hashlib.sha256(_canonical_json({"metadata": metadata, "tensors": index}, what="package metadata"))
    digest.update(b"\0")
    for name in names:
        flat = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_package(package: ModelPackage, path: str | os.PathLike) -> Path:
    """Write ``package`` to ``path`` atomically (a crash never leaves half a file); returns the path."""
    path = Path(path)
    payload = package.to_payload()
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def read_package(path: str | os.PathLike) -> ModelPackage:
    """Read and verify a model package (format, version, checksum, config) without building the detector.

    Raises:
        InvalidCheckpointError: missing file, not a model package, unsupported version, checksum mismatch or an
            unusable config; the one-line message names the file.
    """
    payload = read_weights_file(path, PACKAGE_DESCRIPTION)
    if not isinstance(payload, dict) or payload.get("format") != PACKAGE_FORMAT:
        raise InvalidCheckpointError(f"{path} is not {PACKAGE_DESCRIPTION}{other_kind(payload)}")
    version = payload.get("version")
    if version != PACKAGE_FORMAT_VERSION:
        raise InvalidCheckpointError(
            f"{path}: model package format version {version!r} is not supported (this code reads "
            f"version {PACKAGE_FORMAT_VERSION})"
        )
    missing = [key for key in (*_METADATA_KEYS, "state_dict", "checksum") if key not in payload]
    if missing:
        raise InvalidCheckpointError(f"{path}: model package lacks {', '.join(missing)}")
    checksum = payload["checksum"]
    if not isinstance(checksum, dict) or checksum.get("algorithm") != CHECKSUM_ALGORITHM:
        raise InvalidCheckpointError(f"{path}: model package checksum is not a {CHECKSUM_ALGORITHM} record")
    try:
        actual = package_checksum(payload)
    except (CariesMimError, AttributeError, TypeError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{path}: model package contents are malformed ({exc})") from None
    if actual != checksum.get("value"):
        raise InvalidCheckpointError(f"{path}: checksum mismatch: file corrupt or modified")
    try:
        config = DetectorConfig.from_dict(payload["detector_config"])
        package = ModelPackage(
            config=config,
            state_dict=payload["state_dict"],
            threshold=payload["threshold"],
            target_sensitivity=payload["target_sensitivity"],
            version=payload["package_version"],
            provenance=payload["provenance"],
        )
    except CariesMimError as exc:
        raise InvalidCheckpointError(f"{path}: unusable model package ({exc.message})") from None
    if payload["preprocessing"] != preprocessing_description(config):
        raise InvalidCheckpointError(
            f"{path}: the package's preprocessing differs from what this version of caries-mim does "
            f"(method {payload['preprocessing'].get('method')!r}, "
            f"expected {preprocessing_description(config)['method']!r})"
        )
    # The contents were hashed and verified above: the package keeps that value instead of hashing them again.
    package.__dict__["checksum"] = actual
    return package


def load_package(path: str | os.PathLike, device: str | torch.device | None = None) -> Predictor:
    """Read, verify and load a model package into a ready :class:`~caries_mim.inference.Predictor`.

    Raises:
        InvalidCheckpointError: see :func:`read_package`, or weights that do not fit the stored config.
    """
    from caries_mim.inference import Predictor  # inference builds on this module

    return Predictor(read_package(path), device=device, source=str(path))


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidArgumentError(f"{name} must be a number in [0, 1], got {value!r}")


def _canonical_json(value: Any, *, what: str) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} must be plain JSON types without NaN ({exc})") from None
    return text.encode("ascii")


__all__ = [
    "PACKAGE_FILE_NAME",
    "PACKAGE_FORMAT",
    "PACKAGE_FORMAT_VERSION",
    "ModelPackage",
    "load_package",
    "package_checksum",
    "preprocessing_description",
    "read_package",
    "save_package",
]
