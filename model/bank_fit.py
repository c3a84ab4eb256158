"""Fitting an OOD bank through a model adapter: the worker's own path, for any format.

:func:`fit_adapter_bank` runs :meth:`model.adapters.base.ModelAdapter.predict` (exactly what
:class:`worker.model_runtime.Segmenter` runs) on the site's training cases and fits a
:class:`model.ood.SpectralGate` on their signatures, as :func:`model.evaluate.fit_bank` does for a bare
SegNet: tau on leave-one-out OODMs where every signature of the same training image is left out
(:func:`model.evaluate.case_group`: a case re-gridded to several scanner geometries is one image). The
bank records what a worker checks before using it: the model's SHA-256 (``ModelAdapter.model_sha256``,
refused by :meth:`~model.ood.SpectralGate.load` for other files), ``adapter.signature_settings()`` as
``meta["inference"]`` (refused by :meth:`~model.ood.SpectralGate.check_inference` for another path), the
modalities seen, and the model's record (format, name, version, layer, labels, every file's hash).

A case is anything with ``image`` (z, y, x, native units), ``spacing`` (z, y, x mm) and ``modality``, and
optionally ``group`` (or ``kind``/``seed``/``index``: a phantom) naming its training image; a plain
``(image, spacing, modality)`` tuple is one image of its own.

For the shipped SegNet through :class:`model.adapters.segnet.SegNetAdapter` the signatures are those of
:func:`model.evaluate.fit_bank` bit for bit (the same production path), so either builds the same bank.

**Re-gridding to the site's scanners** (:class:`Regrids`, ``specgate model fit-ood --like DIR --regrids
N``): a study arrives on the grid of the scanner that made it, and a signature depends on that grid
(the shipped bank is fitted on each phantom at its own grid plus ``BANK_GEOMETRIES`` clinical grids,
:mod:`model.weights.build`). So each training image goes into the bank at its own grid and re-gridded
(:func:`model.data.clinical.regrid_volume`: linear, air outside, the scanner noise of
:func:`~model.data.clinical.regrid`) to ``N`` of the site's geometries of its modality (all of them when
there are fewer), drawn without replacement by a generator seeded with ``(seed, the image's group)``,
which then draws the noise: the same seed and images give the same bank whatever the order of the
folders. All of one image's signatures are one group, so tau's leave-one-out leaves them out together.
``meta["regrids"]`` records the seed, ``N``, the noise and every geometry with how many images used it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from model.ood import SpectralGate

if TYPE_CHECKING:
    from model.adapters.base import ModelAdapter
    from model.data.clinical import ScannerGeometry

__all__ = ["BankCase", "Regrids", "bank_cases", "fit_adapter_bank", "regrid_total"]


class BankCase(NamedTuple):
    """One training case: a volume, its spacing and modality, and the training image it shows."""

    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    group: str | None = None


def _as_case(case: Any, i: int) -> Any:
    if isinstance(case, tuple) and not hasattr(case, "image"):
        if len(case) != 3:
            raise ValueError(f"case {i} must be (image, spacing, modality), got a tuple of {len(case)}")
        return BankCase(case[0], tuple(case[1]), str(case[2]), f"case-{i}")  # type: ignore[arg-type]
    return case


@dataclass(frozen=True)
class Regrids:
    """Which of the site's scanner geometries each training image is re-gridded to (module doc)."""

    geometries: tuple[ScannerGeometry, ...]
    per_image: int
    seed: int = 0
    noise: bool = True

    def __post_init__(self) -> None:
        if self.per_image < 1:
            raise ValueError(f"re-griddings per image must be at least 1, got {self.per_image}")
        if not self.geometries:
            raise ValueError("no scanner geometries to re-grid to")

    def pool(self, modality: str) -> list[int]:
        """Indices of the geometries of ``modality``."""
        return [i for i, g in enumerate(self.geometries) if g.modality == modality.upper()]

    def count(self, modality: str) -> int:
        """How many re-griddings an image of ``modality`` gets."""
        return min(self.per_image, len(self.pool(modality)))

    def rng(self, group: str) -> np.random.Generator:
        """The generator of one training image: seeded by the seed and the image's group name."""
        digest = hashlib.sha256(group.encode("utf-8")).digest()
        return np.random.default_rng([int(self.seed), int.from_bytes(digest[:8], "little")])

    def expand(self, case: Any, group: str, used: Counter[int] | None = None) -> Iterator[BankCase]:
        """``case`` at its own grid, then re-gridded to its :meth:`count` geometries, all in ``group``."""
        from model.data.clinical import regrid_volume

        yield BankCase(case.image, tuple(case.spacing), str(case.modality), group)  # type: ignore[arg-type]
        pool = self.pool(str(case.modality))
        if not pool:
            return
        rng = self.rng(group)
        chosen = rng.choice(len(pool), size=self.count(str(case.modality)), replace=False)
        for k in sorted(int(j) for j in chosen):
            g = self.geometries[pool[k]]
            image = regrid_volume(case.image, case.spacing, str(case.modality), g.geometry, rng, noise=self.noise)
            if used is not None:
                used[pool[k]] += 1
            yield BankCase(image, g.geometry.spacing, str(case.modality), group)

    def record(self, used: Counter[int] | None = None) -> dict[str, Any]:
        """For the bank's meta and the ledger: seed, per image, noise, each geometry and its use count."""
        return {"per_image": self.per_image, "seed": self.seed, "noise": self.noise,
                "geometries": [{**g.to_json(), **({"images": used.get(i, 0)} if used is not None else {})}
                               for i, g in enumerate(self.geometries)]}


def regrid_total(modalities: Sequence[str], regrids: Regrids | None) -> int:
    """Signatures a fit makes from images of ``modalities``: each one, plus its re-griddings."""
    return sum(1 + (regrids.count(m) if regrids is not None else 0) for m in modalities)


def bank_cases(cases: Iterable[Any], regrids: Regrids | None, used: Counter[int] | None = None) -> Iterator[Any]:
    """Every case of ``cases`` (a plain ``(image, spacing, modality)`` tuple as a :class:`BankCase`), each
    followed by its re-griddings when ``regrids`` (counted in ``used``): what a bank is fitted on, by
    :func:`fit_adapter_bank` and by :func:`model.evaluate.fit_bank` alike."""
    from model.evaluate import case_group

    for i, raw in enumerate(cases):
        case = _as_case(raw, i)
        if regrids is None:
            yield case
        else:
            yield from regrids.expand(case, case_group(case), used)


def fit_adapter_bank(adapter: ModelAdapter, cases: Iterable[Any], *, c: float = 2.5, progress: bool = False,
                     meta: dict[str, Any] | None = None, regrids: Regrids | None = None,
                     total: int | None = None) -> SpectralGate:
    """The :class:`SpectralGate` of ``adapter`` fitted on ``cases`` (at least two training images),
    through ``adapter.predict``; one case at a time, so ``cases`` may be generated lazily.

    ``regrids``: each case also re-gridded to the site's scanner geometries (module doc). ``total``: the
    number of signatures, for the progress bar (default: ``len(cases)`` when there are no re-griddings).
    """
    from model.evaluate import case_group

    used: Counter[int] = Counter()
    items: Iterable[Any] = bank_cases(cases, regrids, used)
    if progress:
        from tqdm import tqdm

        if total is None and regrids is None and isinstance(cases, Sized):
            total = len(cases)
        items = tqdm(items, desc="signatures", unit="signature", total=total)
    sigs, groups, modalities = [], [], set()
    for case in items:
        pred = adapter.predict(case.image, case.spacing, case.modality)
        sigs.append(np.asarray(pred.signature, dtype=np.float64))
        groups.append(case_group(case))
        modalities.add(str(case.modality).upper())
        del case, pred  # a re-gridded clinical CT is 300 MB: never two alive besides the source
    if len(set(groups)) < 2:
        raise ValueError(f"a bank needs signatures of at least two training images, got {len(set(groups))}")
    m = {"n": len(sigs), "images": len(set(groups)), **(meta or {}), "inference": adapter.signature_settings(),
         "modalities": sorted(modalities), "model": adapter.record()}
    if regrids is not None:
        m["regrids"] = regrids.record(used)
    return SpectralGate.fit(np.stack(sigs), c=c, weights_sha256=adapter.model_sha256(), meta=m,
                            groups=groups if len(set(groups)) < len(groups) else None)
