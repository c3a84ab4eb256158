"""Synthetic DICOM studies for the demo, the benchmarks and the end-to-end tests: the writer lives in
:mod:`model.data.series_writer` (the evaluation sets use it too); this name is kept for callers here."""

from model.data.series_writer import SyntheticSeries, write_series

__all__ = ["SyntheticSeries", "write_series"]
