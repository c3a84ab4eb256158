"""What the headers of a series say: the accepted SOP classes, and one :class:`Plane` per 2D image.

Headers are read without pixel data (``stop_before_pixels``); every missing or malformed value becomes a
:class:`~dicom_series.errors.SeriesError` that names the file (never a patient name or ID).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, iter_pixels

from .errors import READ_ERRORS, SeriesError

__all__ = [
    "MULTI_FRAME_SOP_CLASSES",
    "SINGLE_FRAME_SOP_CLASSES",
    "Instance",
    "Plane",
    "check_pixel_format",
    "iter_decoded",
    "planes_of",
    "read_instance",
    "value",
]

SINGLE_FRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
MULTI_FRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}


@dataclass
class Plane:
    """One 2D plane of the series (a single-frame instance, or one frame), as described by its header."""

    source: int  # index into the list of instances
    frame_number: int | None  # 1-based; None for a single-frame instance
    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient
    orientation: np.ndarray  # ImageOrientationPatient (6)
    pixel_spacing: np.ndarray  # (2,)
    rows: int
    cols: int
    slope: float
    intercept: float


@dataclass
class Instance:
    """One file of the series: its header (no pixel data) and whether it is multi-frame."""

    path: Path
    header: Dataset
    multiframe: bool

    @property
    def frames(self) -> int:
        return int(self.header.NumberOfFrames) if self.multiframe else 1


def value(ds: Dataset, keyword: str, where: str, *, required: bool = True, default: Any = None) -> Any:
    """``ds.<keyword>``; a missing (when ``required``) or unparsable value is ``unreadable``."""
    try:
        if keyword not in ds or ds[keyword].value is None or ds[keyword].value == "":
            if required:
                raise SeriesError("unreadable", f"{where}: missing {keyword}")
            return default
        return ds[keyword].value
    except SeriesError:
        raise
    except READ_ERRORS as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} ({exc})") from exc


def _floats(ds: Dataset, keyword: str, n: int, where: str) -> np.ndarray:
    raw = value(ds, keyword, where)
    try:
        items = [raw] if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__") else list(raw)
        values = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} {raw!r}") from exc
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise SeriesError("unreadable", f"{where}: {keyword} must be {n} finite numbers, got {list(values)}")
    return values


def _float(ds: Dataset | None, keyword: str, where: str, default: float) -> float:
    if ds is None:
        return default
    raw = value(ds, keyword, where, required=False)
    if raw is None:
        return default
    try:
        number = float(raw)
    except (TypeError, ValueError) as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} {raw!r}") from exc
    if not math.isfinite(number):
        raise SeriesError("unreadable", f"{where}: {keyword} is not finite ({raw!r})")
    return number


def read_instance(path: Path) -> Instance:
    """The header of one file; refused unless it is a CT, MR or PET image (single- or multi-frame)."""
    where = path.name
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except READ_ERRORS as exc:
        raise SeriesError("unreadable", f"{where}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    sop_class = str(value(ds, "SOPClassUID", where))
    if sop_class in SINGLE_FRAME_SOP_CLASSES:
        return Instance(path=path, header=ds, multiframe=False)
    if sop_class in MULTI_FRAME_SOP_CLASSES:
        return Instance(path=path, header=ds, multiframe=True)
    raise SeriesError("unsupported", f"{where}: SOP Class {sop_class} is not a CT, MR or PET image")


def _pixel_spacing(ds: Dataset, where: str) -> np.ndarray:
    """PixelSpacing (row, column) in mm; missing or unreadable is ``bad_spacing``: no grid without it."""
    try:
        return _floats(ds, "PixelSpacing", 2, where)
    except SeriesError as exc:
        raise SeriesError("bad_spacing", exc.message) from exc


def check_pixel_format(ds: Dataset, where: str) -> None:
    """Refuse colour, a Modality LUT and transfer syntaxes no installed decoder reads (``unsupported``)."""
    samples = int(value(ds, "SamplesPerPixel", where))
    photometric = str(value(ds, "PhotometricInterpretation", where))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(
            "unsupported",
            f"{where}: colour images are not supported (SamplesPerPixel={samples}, "
            f"PhotometricInterpretation={photometric})",
        )
    if "ModalityLUTSequence" in ds:
        raise SeriesError("unsupported", f"{where}: a Modality LUT Sequence is not supported, only rescale")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        raise SeriesError("unreadable", f"{where}: no TransferSyntaxUID in the file meta information")
    try:
        available = get_decoder(tsyntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise SeriesError(
            "unsupported", f"{where}: cannot decode transfer syntax {tsyntax} ({getattr(tsyntax, 'name', '')})"
        )


def planes_of(index: int, inst: Instance) -> list[Plane]:
    """The planes of instance ``index``: one for a single-frame image, one per frame otherwise."""
    where = inst.path.name
    check_pixel_format(inst.header, where)
    if inst.multiframe:
        return _multiframe_planes(index, inst.header, where)
    return [_classic_plane(index, inst.header, where)]


def _classic_plane(index: int, ds: Dataset, where: str) -> Plane:
    return Plane(
        source=index,
        frame_number=None,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(value(ds, "SOPInstanceUID", where)),
        position=_floats(ds, "ImagePositionPatient", 3, where),
        orientation=_floats(ds, "ImageOrientationPatient", 6, where),
        pixel_spacing=_pixel_spacing(ds, where),
        rows=int(value(ds, "Rows", where)),
        cols=int(value(ds, "Columns", where)),
        slope=_float(ds, "RescaleSlope", where, 1.0),
        intercept=_float(ds, "RescaleIntercept", where, 0.0),
    )


def _group(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for fg in (per_frame, shared):
        if fg is not None and sequence in fg and len(fg[sequence].value) > 0:
            return fg[sequence].value[0]
    return None


def _multiframe_planes(index: int, ds: Dataset, where: str) -> list[Plane]:
    n = int(value(ds, "NumberOfFrames", where))
    shared_seq = value(ds, "SharedFunctionalGroupsSequence", where)
    per_frame_seq = value(ds, "PerFrameFunctionalGroupsSequence", where)
    shared = shared_seq[0] if len(shared_seq) else None
    if len(per_frame_seq) != n:
        raise SeriesError(
            "unreadable",
            f"{where}: NumberOfFrames is {n} but PerFrameFunctionalGroupsSequence has {len(per_frame_seq)} items",
        )
    rows, cols = int(value(ds, "Rows", where)), int(value(ds, "Columns", where))
    sop_instance_uid = str(value(ds, "SOPInstanceUID", where))
    planes = []
    for f, item in enumerate(per_frame_seq):
        fwhere = f"{where} frame {f + 1}"
        groups = {}
        for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
            group = _group(item, shared, seq)
            if group is None:
                raise SeriesError("unreadable", f"{fwhere}: no {seq} in the functional groups")
            groups[seq] = group
        transform = _group(item, shared, "PixelValueTransformationSequence")
        planes.append(
            Plane(
                source=index,
                frame_number=f + 1,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=sop_instance_uid,
                position=_floats(groups["PlanePositionSequence"], "ImagePositionPatient", 3, fwhere),
                orientation=_floats(groups["PlaneOrientationSequence"], "ImageOrientationPatient", 6, fwhere),
                pixel_spacing=_pixel_spacing(groups["PixelMeasuresSequence"], fwhere),
                rows=rows,
                cols=cols,
                slope=_float(transform, "RescaleSlope", fwhere, 1.0),
                intercept=_float(transform, "RescaleIntercept", fwhere, 0.0),
            )
        )
    return planes


#: the one decoder plugin used per compressed transfer syntax. pydicom otherwise tries every installed
#: plugin until one returns pixels, and a lenient one hides a strict one's refusal: pylibjpeg's libjpeg
#: returns an image for a JPEG-LS codestream whose scan data is garbage, which pyjpegls (CharLS) refuses.
DECODING_PLUGINS: dict[str, str] = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70"), "pylibjpeg"),  # libjpeg
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "pyjpegls"),  # CharLS
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"), "pylibjpeg"),  # OpenJPEG
    "1.2.840.10008.1.2.5": "pydicom",  # RLE
}
_EOI = b"\xff\xd9"  # JPEG, JPEG-LS: End of Image; JPEG 2000: End of Codestream (the same two bytes)


def _check_ends(ds: Dataset, tsyntax: str, where: str) -> None:
    """Every frame of a JPEG-family or JPEG 2000 codestream ends with its end marker (FFD9, then at most
    the one byte of padding an odd length needs): a codestream cut short is refused here, since libjpeg
    decodes the lines it has and returns the rest as zeros, without an error."""
    if tsyntax not in DECODING_PLUGINS or tsyntax == "1.2.840.10008.1.2.5":
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        end = frame[-2:]
        if end != _EOI and frame[-1:] == b"\x00":  # the pad byte of an odd-length codestream
            end = frame[-3:-1]
        if end != _EOI:
            raise SeriesError("undecodable_pixels",
                              f"{where}: frame {index + 1}'s codestream ends with {end.hex() or 'nothing'}, not its end "
                              "marker FFD9 (cut short)")


def iter_decoded(inst: Instance) -> Iterator[np.ndarray]:
    """Decoded frames of one file, one at a time, through pydicom's pixel handlers with the one decoder
    plugin of the file's transfer syntax (:data:`DECODING_PLUGINS`). A failure is ``undecodable_pixels``
    for a compressed (encapsulated) syntax: a codestream cut short (no end marker) or one its decoder
    refuses (the plugins raise ``RuntimeError`` or ``ValueError``); ``unreadable`` for native pixel data
    (a file cut short)."""
    where, count = inst.path.name, 0
    tsyntax = getattr(getattr(inst.header, "file_meta", None), "TransferSyntaxUID", None)
    encapsulated = tsyntax is not None and tsyntax.is_encapsulated
    reason = "undecodable_pixels" if encapsulated else "unreadable"
    try:
        source: Path | Dataset = inst.path
        if encapsulated:  # read once (compressed: small), checked, then decoded from memory
            source = pydicom.dcmread(inst.path)
            _check_ends(source, str(tsyntax), where)
        for frame in iter_pixels(source, decoding_plugin=DECODING_PLUGINS.get(str(tsyntax), "")):
            count += 1
            yield frame
    except SeriesError:
        raise
    except (AttributeError, RuntimeError, *READ_ERRORS) as exc:
        raise SeriesError(reason, f"{where}: cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    if count != inst.frames:
        raise SeriesError(reason, f"{where}: {count} frame(s) decoded, {inst.frames} expected")
