"""Errors a user can cause, each with a stable machine-readable ``code``.

The CLI maps every :class:`CariesMimError` to exit status 2 and the service maps ``code`` to an HTTP status in one
table; both show ``message`` to the user. Codes are part of the public contract: never rename one.
"""

from __future__ import annotations


class CariesMimError(Exception):
    """Base class of user-caused errors. ``code`` is stable; ``message`` is one human sentence."""

    code = "caries_mim_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class UnreadableFileError(CariesMimError):
    """The file does not exist or cannot be opened."""

    code = "unreadable_file"


class NotAnImageError(CariesMimError):
    """Neither a DICOM Part 10 file nor a supported image format."""

    code = "not_an_image"


class CorruptHeaderError(CariesMimError):
    """A DICOM or image header that cannot be parsed, or lacks what every image must say (rows, columns)."""

    code = "corrupt_header"


class CorruptPixelDataError(CariesMimError):
    """The header parsed but the pixel data is truncated or cannot be decoded."""

    code = "corrupt_pixel_data"


class NoPixelDataError(CariesMimError):
    """A DICOM object without an image (structured report, presentation state, ...)."""

    code = "no_pixel_data"


class UnsupportedPhotometricError(CariesMimError):
    """Colour or palette images: radiographs are single-channel grayscale."""

    code = "unsupported_photometric"


class MultiFrameError(CariesMimError):
    """More than one frame: the product reads single-frame projection radiographs only."""

    code = "multi_frame"


class UnsupportedModalityError(CariesMimError):
    """The DICOM Modality is not in the configured allow-list."""

    code = "unsupported_modality"


class MissingDecoderError(CariesMimError):
    """No installed pixel-data plugin can decode the file's transfer syntax."""

    code = "missing_decoder"


class ImageTooLargeError(CariesMimError):
    """Rows x Columns over the configured limit (checked before any pixel data is decoded)."""

    code = "image_too_large"


class DecodeTimeoutError(CariesMimError):
    """Decoding one file ran past the wall-time limit of an isolated decoder (the decoder was stopped)."""

    code = "decode_timeout"


class DecoderUnavailableError(CariesMimError):
    """No isolated decoder could take the file: all are busy past the wait limit, or the pool is closed."""

    code = "decoder_unavailable"


class InvalidDatasetError(CariesMimError):
    """An annotation file or data folder that cannot be used (bad schema, missing images, nothing to read)."""

    code = "invalid_dataset"


class InvalidArgumentError(CariesMimError):
    """A command-line argument or configuration value that cannot be used."""

    code = "invalid_argument"


class InvalidConfigError(CariesMimError):
    """A configuration file or ``--set`` override that cannot be used; the message names the key or file."""

    code = "invalid_config"


class InvalidCheckpointError(CariesMimError):
    """A weights file that is missing, truncated, of another kind, or whose shapes do not fit the model."""

    code = "invalid_checkpoint"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most 300 chars:
    the part of a library's error worth putting in one of ours."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def error_class_for(code: str) -> type[CariesMimError] | None:
    """The typed error with ``code``, or None: to re-raise an error that crossed a file or process boundary as
    its code and message (the decode cache, the isolated reader)."""
    pending = [CariesMimError]
    while pending:
        kind = pending.pop()
        if kind.code == code:
            return kind
        pending.extend(kind.__subclasses__())
    return None
