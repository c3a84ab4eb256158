"""Compressed copies of test series, made by real encoders that install here: pydicom's own encoders
(RLE; JPEG-LS through pyjpegls; JPEG 2000 through pylibjpeg-openjpeg) and dcmtk's ``dcmcjpeg`` (JPEG
Lossless Process 14 and SV1, Baseline, Extended), and hostile codestreams built by hand.

No HTJ2K encoder installs here (OpenJPEG decodes HTJ2K but does not write it), so the HTJ2K syntaxes are
exercised by their negotiation and header check only."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from tests.peers import dcmtk_path

__all__ = ["LOSSLESS", "LOSSY", "compress_file", "j2k_header", "rewrap"]

#: transfer syntax -> how to encode it: ("pydicom", keyword arguments) or ("dcmcjpeg", its option)
_ENCODERS: dict[str, tuple[str, object]] = {
    "1.2.840.10008.1.2.5": ("pydicom", {}),
    "1.2.840.10008.1.2.4.80": ("pydicom", {}),
    "1.2.840.10008.1.2.4.90": ("pydicom", {}),
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg", "+e1"),
    "1.2.840.10008.1.2.4.57": ("dcmcjpeg", "+el"),
    "1.2.840.10008.1.2.4.81": ("pydicom", {"jls_error": 3}),
    "1.2.840.10008.1.2.4.91": ("pydicom", {"j2k_cr": [20]}),
    "1.2.840.10008.1.2.4.50": ("dcmcjpeg", "+eb"),
    "1.2.840.10008.1.2.4.51": ("dcmcjpeg", "+ee"),
}
LOSSLESS = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.57")
LOSSY = ("1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


def compress_file(src: Path, syntax: str, dst: Path) -> Path:
    """``src`` (an uncompressed image) encoded in ``syntax``, written to ``dst`` (pydicom's encoders give it
    a new SOP Instance UID, as ``Dataset.compress`` does by default; dcmcjpeg keeps it for lossless)."""
    tool, option = _ENCODERS[syntax]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if tool == "dcmcjpeg":
        subprocess.run([dcmtk_path("dcmcjpeg"), str(option), str(src), str(dst)], check=True, capture_output=True,
                       timeout=60)
        if str(dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) != syntax:
            raise AssertionError(f"dcmcjpeg {option} did not write {syntax}")
        return dst
    ds = dcmread(src)
    assert isinstance(option, dict)
    ds.compress(syntax, **option)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def j2k_header(rows: int, columns: int, *, components: int = 1, depth: int = 16) -> bytes:
    """A JPEG 2000 main header (SOC, SIZ, a COD, a QCD) declaring ``rows`` x ``columns``, then the start
    of a tile and a few bytes: what a hostile peer sends to make a decoder allocate."""
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * components, 0, columns, rows, 0, 0, columns, rows, 0, 0, components)
    siz += bytes([depth - 1, 1, 1]) * components
    cod = bytes.fromhex("ff52000c00000001000504040000")
    qcd = bytes.fromhex("ff5c00044000")
    sot = bytes.fromhex("ff90000a0000000000000001ff93") + b"\x00" * 16
    return b"\xff\x4f\xff\x51" + siz + cod + qcd + sot + b"\xff\xd9"


def rewrap(ds: Dataset, frames: list[bytes], syntax: str) -> Dataset:
    """``ds`` with its pixel data replaced by ``frames`` (one codestream each), encapsulated, in ``syntax``."""
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    return ds
