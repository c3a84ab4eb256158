"""Why a series is refused: :class:`SeriesError` and its stable reason codes."""

from __future__ import annotations

import struct

from pydicom.errors import InvalidDicomError

__all__ = ["READ_ERRORS", "REASON_CODES", "SeriesError"]

REASON_CODES = frozenset(
    {
        "no_instances",
        "unreadable",
        "mixed_orientation",
        "gantry_tilt",
        "missing_slices",
        "uneven_slices",
        "duplicate_slices",
        "inconsistent_size",
        "mixed_series",
        "too_few_slices",
        "unsupported",
        "bad_spacing",
        "no_frame_of_reference",
        "undecodable_pixels",
    }
)

# Errors pydicom raises for files it cannot parse or decode.
READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error)


class SeriesError(ValueError):
    """A refused series; ``reason_code`` is stable (one of :data:`REASON_CODES`).

    >>> err = SeriesError("gantry_tilt", "slices drift 3.1 mm in-plane")
    >>> err.reason_code, str(err)
    ('gantry_tilt', 'gantry_tilt: slices drift 3.1 mm in-plane')
    """

    def __init__(self, reason_code: str, message: str) -> None:
        if reason_code not in REASON_CODES:
            raise ValueError(f"unknown series reason code {reason_code!r}; expected one of {sorted(REASON_CODES)}")
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message
