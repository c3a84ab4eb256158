"""The named index ranges of the phantom data: which cases train, fill the bank, tune, and are reported.

A phantom case is a pure function of ``(kind, seed, index)`` (:func:`model.data.phantoms.phantom_case`).
Every command that trains, fits a bank, tunes a choice or reports a figure takes its cases from one of
these ranges, so no reported number comes from a case that was looked at while choosing something.

=============  ==============  ====================================================================
range          indices         used for
=============  ==============  ====================================================================
``train``      0 - 999         training images (the first ``TRAIN_SIZES[kind]`` of each kind); the
                               bank is fitted on the same images (the paper's protocol)
``validation`` 1000 - 4999     every tuned choice: the body-crop margin, the signature layer and
                               design, the threshold rule, C, the bank's clinical geometries. Cases
                               1000-1003 (the card's evaluation until version 2) and 1100-1109 (the
                               bank-geometry study) were looked at while tuning and belong here.
``test``       5000 - 8999     reported only (the model card, ``docs/evidence.md``); never looked at
                               while choosing anything
``demo``       10000 -         ``specgate demo`` and screenshots
=============  ==============  ====================================================================

>>> VALIDATION.index(0), TEST.index(3)
(1000, 5003)
>>> split_of(1002)
'validation'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEMO", "SEED", "SPLITS", "TEST", "TRAIN", "VALIDATION", "IndexRange", "split_of"]

#: the seed of every phantom set of the shipped model (training, bank, validation, test)
SEED = 2026


@dataclass(frozen=True)
class IndexRange:
    """A half-open range ``[first, stop)`` of phantom indices with a purpose."""

    name: str
    first: int
    stop: int

    def index(self, i: int) -> int:
        """The ``i``-th index of this range (``ValueError`` past its end)."""
        if not 0 <= int(i) < self.stop - self.first:
            raise ValueError(f"{self.name} range holds {self.stop - self.first} indices, asked for number {i}")
        return self.first + int(i)

    def indices(self, n: int, offset: int = 0) -> list[int]:
        """``n`` indices from ``first + offset``."""
        return [self.index(offset + i) for i in range(int(n))]

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.first <= index < self.stop


TRAIN = IndexRange("train", 0, 1000)
VALIDATION = IndexRange("validation", 1000, 5000)
TEST = IndexRange("test", 5000, 9000)
DEMO = IndexRange("demo", 10_000, 1 << 31)
SPLITS: dict[str, IndexRange] = {r.name: r for r in (TRAIN, VALIDATION, TEST, DEMO)}


def split_of(index: int) -> str:
    """The name of the range ``index`` falls in (``ValueError`` for an index in none)."""
    for r in SPLITS.values():
        if index in r:
            return r.name
    raise ValueError(f"phantom index {index} is in no named range")
