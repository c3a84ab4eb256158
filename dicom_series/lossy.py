"""Whether a series' pixels went through lossy compression, from its headers (PS3.3 C.7.6.1.1.5).

An image has been lossy compressed when its Lossy Image Compression (0028,2110) is "01", or when it is
encoded in a lossy transfer syntax (:data:`LOSSY_SYNTAXES`: JPEG Baseline and Extended, JPEG-LS
near-lossless, JPEG 2000 and HTJ2K that allow loss) whatever the attribute says: a sender that forgot
the attribute does not make lossy pixels lossless. Anything derived from such an image carries "01"
and the Method and Ratio of its source (C.7.6.1.1.5: "shall not be changed" once "01").

    >>> from pydicom.dataset import Dataset, FileMetaDataset
    >>> ds = Dataset()
    >>> ds.file_meta = FileMetaDataset()
    >>> ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"
    >>> lossy_source([ds])
    LossySource(instances=1, methods=('ISO_15444_1',), ratios=(), transfer_syntaxes=('1.2.840.10008.1.2.4.91',))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["LOSSY_SYNTAXES", "LossySource", "lossy_source"]

#: transfer syntaxes whose codestreams may have lost information, and the Lossy Image Compression Method
#: (0028,2114) defined term each implies (PS3.3 C.7.6.1.1.5.1)
LOSSY_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}


@dataclass(frozen=True)
class LossySource:
    """What the lossy instances of a series say: how many, and the distinct methods, ratios and
    transfer syntaxes among them, in the order first met."""

    instances: int
    methods: tuple[str, ...]
    ratios: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]

    def evidence(self) -> dict[str, Any]:
        """As the job's evidence records it (``lossy_source``)."""
        return {"instances": self.instances, "methods": list(self.methods), "ratios": list(self.ratios),
                "transfer_syntaxes": list(self.transfer_syntaxes)}


def _values(ds: Dataset, keyword: str) -> list[str]:
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return []
    items = [raw] if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__") else list(raw)
    return [str(v).strip() for v in items if str(v).strip()]


def _add(seen: list[str], values: Iterable[str]) -> None:
    seen.extend(v for v in values if v not in seen)


def lossy_source(headers: Iterable[Dataset]) -> LossySource | None:
    """The lossy instances among ``headers`` (datasets read with their file meta), or None when none is."""
    count = 0
    methods: list[str] = []
    ratios: list[str] = []
    syntaxes: list[str] = []
    for ds in headers:
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        flagged = str(ds.get("LossyImageCompression", "") or "").strip() == "01"
        if not flagged and syntax not in LOSSY_SYNTAXES:
            continue
        count += 1
        own = _values(ds, "LossyImageCompressionMethod")
        _add(methods, own or ([LOSSY_SYNTAXES[syntax]] if syntax in LOSSY_SYNTAXES else []))
        _add(ratios, _values(ds, "LossyImageCompressionRatio"))
        if syntax:
            _add(syntaxes, [syntax])
    if not count:
        return None
    return LossySource(count, tuple(methods), tuple(ratios), tuple(syntaxes))
