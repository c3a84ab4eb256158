"""Feeding a Part 10 file's data set to :class:`dicom_node.dataset_stream.DataSetStream` as the network
would: the unit tests of the stream, of its header and of the codestream checks share these."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.filereader import read_file_meta_info

from dicom_node.config import ReceiveLimits
from dicom_node.dataset_stream import DataSetStream


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The data set's bytes (after the preamble and the file meta) and its transfer syntax."""
    meta = read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):], str(meta.TransferSyntaxUID)


def feed(data: bytes, syntax: str, limits: ReceiveLimits | None = None, *, split: int = 0) -> DataSetStream:
    """The whole of ``data``, in pieces of random sizes (seeded by ``split``; 0: one piece), then
    :meth:`~DataSetStream.finish`."""
    stream = DataSetStream(syntax, limits or ReceiveLimits())
    rng = np.random.default_rng(split)
    pos = 0
    while pos < len(data):
        n = len(data) if split == 0 else int(rng.integers(1, 40))
        stream.feed(memoryview(data)[pos:pos + n])
        pos += n
    stream.finish()
    return stream
