"""Fitting an OOD bank through a model adapter: the worker's own path, for any format.

:func:`fit_adapter_bank` runs :meth:`model.adapters.base.ModelAdapter.predict` (exactly what
:class:`worker.segmenter.Segmenter` runs) on the site's training cases and fits a
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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from model.ood import SpectralGate

if TYPE_CHECKING:
    from model.adapters.base import ModelAdapter

__all__ = ["BankCase", "fit_adapter_bank"]


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


def fit_adapter_bank(adapter: ModelAdapter, cases: Iterable[Any], *, c: float = 2.5, progress: bool = False,
                     meta: dict[str, Any] | None = None) -> SpectralGate:
    """The :class:`SpectralGate` of ``adapter`` fitted on ``cases`` (at least two training images),
    through ``adapter.predict``; one case at a time, so ``cases`` may be generated lazily."""
    from model.evaluate import case_group

    items: Iterable[Any] = cases
    if progress:
        from tqdm import tqdm

        items = tqdm(cases, desc="signatures", unit="case")
    sigs, groups, modalities = [], [], set()
    for i, raw in enumerate(items):
        case = _as_case(raw, i)
        pred = adapter.predict(case.image, case.spacing, case.modality)
        sigs.append(np.asarray(pred.signature, dtype=np.float64))
        groups.append(case_group(case))
        modalities.add(str(case.modality).upper())
    if len(set(groups)) < 2:
        raise ValueError(f"a bank needs signatures of at least two training images, got {len(set(groups))}")
    m = {"n": len(sigs), "images": len(set(groups)), **(meta or {}), "inference": adapter.signature_settings(),
         "modalities": sorted(modalities), "model": adapter.record()}
    return SpectralGate.fit(np.stack(sigs), c=c, weights_sha256=adapter.model_sha256(), meta=m,
                            groups=groups if len(set(groups)) < len(groups) else None)
