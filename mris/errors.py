"""Typed errors. The CLI maps each to one message and exit code, the service to one
problem+json status. Messages are plain words and never contain a patient identifier."""

from __future__ import annotations


class MrisError(Exception):
    """Base class of every error this package raises on purpose.

    ``http_status`` is the status the service answers with; ``title`` the problem+json title.
    """

    http_status: int = 400
    title: str = "Bad request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class UnreadableDicom(MrisError):
    """The bytes are not a DICOM file we can decode (truncated, corrupt, not DICOM)."""

    title = "Unreadable DICOM"


class UnsupportedDicom(MrisError):
    """A valid DICOM that is not a usable radiograph (no pixels, RGB, multi-frame, 1x1...)."""

    title = "Unsupported DICOM"


class ImageTooLarge(MrisError):
    """The header claims more rows, columns, frames or bytes than the configured limits."""

    http_status = 413
    title = "Image too large"


class NoUsableSpacing(MrisError):
    """No usable pixel spacing in the file and none supplied by the caller."""

    title = "No usable pixel spacing"


class KneeNotFound(MrisError):
    """The localiser found no knee (or the given centre lies outside the image)."""

    http_status = 422
    title = "Knee not found"


class BadParameter(MrisError):
    """A caller option is out of range or malformed (k, knees, keypoints, spacing_mm...)."""

    http_status = 422
    title = "Invalid parameter"


class ManifestError(MrisError):
    """A manifest that is missing, malformed, or has no rows for what was asked."""

    title = "Invalid manifest"


class BundleInvalid(MrisError):
    """A model or index bundle that is incomplete or whose checksums do not match."""

    http_status = 503
    title = "Invalid bundle"


class BundleMismatch(MrisError):
    """An index bundle whose card does not match the loaded encoders."""

    http_status = 503
    title = "Bundle mismatch"


class InvalidThicknessMap(MrisError):
    """A thickness map that is missing, unreadable, not 2-D float, has infinities or is all NaN."""

    title = "Invalid thickness map"


class DecoderCrashed(UnreadableDicom):
    """A decoder worker died on the file (abort, segfault, killed): a corrupt or hostile file."""

    title = "Unreadable DICOM"


class DecodeTimeout(MrisError):
    """Decoding did not finish within the sandbox's deadline (the worker was killed)."""

    http_status = 503
    title = "Decoding timed out"
