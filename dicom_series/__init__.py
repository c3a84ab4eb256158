"""DICOM series -> volume with its patient geometry: the one loader the worker and ``model.data`` share.

Classic single-frame CT / MR / PET images and one multi-frame Enhanced (or Legacy Converted Enhanced)
CT / MR / PET instance per series are read. Anything that cannot be placed on a regular grid is refused
with a :class:`SeriesError` whose ``reason_code`` is one of :data:`REASON_CODES`; messages name the
offending values (UIDs, positions, sizes), never patient names or IDs.

Axes: ``Volume.array[z, y, x]``: z follows the slice normal (row cosine x column cosine), y the column
cosine (down the rows), x the row cosine (along a row). ``Volume.affine`` maps the index ``(z, y, x, 1)``
to patient coordinates (x, y, z) in mm.

A leaf package: it imports numpy and pydicom, nothing of specgate's.
"""

from .errors import REASON_CODES, SeriesError
from .headers import MULTI_FRAME_SOP_CLASSES, SINGLE_FRAME_SOP_CLASSES
from .loader import SliceRef, Volume, find_series, load_series
from .lossy import LOSSY_SYNTAXES, LossySource, lossy_source

__all__ = [
    "LOSSY_SYNTAXES",
    "LossySource",
    "MULTI_FRAME_SOP_CLASSES",
    "REASON_CODES",
    "SINGLE_FRAME_SOP_CLASSES",
    "SeriesError",
    "SliceRef",
    "Volume",
    "find_series",
    "load_series",
    "lossy_source",
]
