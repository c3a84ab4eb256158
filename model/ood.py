"""Spectral out-of-distribution gate (Karimi & Gholipour 2023, section III-D), as a signature of content.

The *spectral signature* of an image is computed from a feature map ``F`` (``C`` channels; the paper: the last
decoder map; the shipped SegNet, bank version 3: the first encoder stage, chosen on the validation range by
``specgate model experiment failures``, see :mod:`model.study_inference`):
reshape to ``(voxels, C)``, take the singular values ``s`` (descending), floor them, take ``log(s)`` and
scale that vector to unit L2 norm.

Deviation from the paper: the mean Gram matrix, over the voxels that count
    The paper takes the singular values of ``F`` itself. They are the square roots of the eigenvalues of
    the Gram matrix ``F^T F``, a *sum* over voxels, so they grow with ``sqrt(voxels)``; ``log`` turns that
    into the same constant added to every entry, and scaling to unit length does not remove an added
    constant. The signature then measured the scan's size as well as its content: on the shipped model the
    same liver phantom went from OODM 0.0056 to 0.0070 / 0.0159 / 0.0269 (tau 0.0116) when its feature map
    was tiled 2x / 4x / 10x, and every 512x512 CT was held (OODM 0.083-0.092) while an unseen head MR scored
    lower (0.049-0.052). The paper's stated purpose for the log and the normalisation is "to eliminate
    these effects" (magnitude and dynamic range); we serve it by using the *mean* Gram matrix
    ``F^T F / N``, i.e. the singular values of ``F / sqrt(N)``: a feature map and any tiling of it have the
    same signature (``tests/unit/model/test_ood.py``).

    ``N`` counts *the voxels that count*: the ones inside the body (``mask``), not the air around the
    patient or the zero padding of a larger field of view. Measured on held-out phantoms with the shipped
    weights (OODM / tau; in-plane padding by 30 voxels of air, about three times the area): with the mean
    over all voxels, padding moved in-distribution CTs from 0.15-0.50 to 2.7-3.5 (all held); with the mean
    over a body mask alone, to 0.6-1.9 (instance normalisation inside each window still sees the air);
    with the image cropped to the body's bounding box (+12 mm) before the windows *and* the mean over the
    body mask, padding left the CT signatures unchanged to two decimals (0.17-0.58) while unseen kinds
    stayed at 1.3-8.4. That is what :mod:`model.study_inference` runs, and the bank is fitted through it; the
    model card's table gives OODM / tau of the shipped bank for each kind padded, cropped, tiled and
    re-gridded.

Singular-value floor
    A dead ReLU channel gives a zero singular value and ``log(0) = -inf``. Singular values are therefore
    floored at ``SINGULAR_VALUE_FLOOR * max(s)`` (relative, 1e-6), and at ``TINY`` (absolute, 1e-30) when
    the whole map is zero. The relative floor is also what makes the streaming Gram route
    (:func:`signature_from_gram`) agree with a direct SVD: eigenvalues of ``F^T F`` in float64 carry an
    absolute error of about ``1e-16 * s_max**2``, i.e. singular values below ``~1e-8 * s_max`` are noise
    either way, and both routes map them to the same floor.

The *gate*: ``OODM(x)`` is the Euclidean distance of the signature of ``x`` to its nearest neighbour in the
bank of training signatures. ``tau = mean + c * std`` of the leave-one-out OODMs of the bank (``std`` is
the population standard deviation, ``ddof=0``); ``x`` is OOD when ``OODM(x) > tau``. When the bank holds
several signatures of one training image (the same case re-gridded to several scanner geometries), a
signature's leave-one-out neighbour excludes every signature of its own image (``groups``): otherwise a
case's own copies would be its nearest neighbours and tau would shrink to the re-gridding noise.

The bank records the inference path it was fitted through (``meta["inference"]``, see
:meth:`SpectralGate.check_inference`); a worker that runs another path is refused, as for other weights.
It also records the modalities of its training images (``meta["modalities"]``): a study of a modality the
bank never saw is outside the model's intended use and :meth:`SpectralGate.verdict` holds it whatever its
OODM: a signature can only compare with what the bank holds, and nothing guarantees that an image of an
unseen modality lands far from every one of them (the shipped weights declare no PET spacing, so PET runs at
its native resolution). How far the PET-like phantoms land, at their own grids and at clinical PET
geometries, is measured in the model card's tables (``model/weights/MODEL_CARD.md``, column OODM/tau of
``pt_tumour``), which ``specgate model evaluate`` reports apart from the decisions this rule adds.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> bank = np.stack([spectral_signature(rng.normal(size=(3, 8, 8, 8))) for _ in range(5)])
>>> gate = SpectralGate.fit(bank, c=2.5)
>>> bool(gate.is_ood(bank[0]))
False
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from model._atomic import atomic_write

__all__ = [
    "SINGULAR_VALUE_FLOOR",
    "SPECTRA",
    "TINY",
    "BankMismatchError",
    "OODScorer",
    "SpectralGate",
    "fit_threshold",
    "leave_one_out_oodm",
    "sha256_file",
    "signature_from_gram",
    "signature_from_singular_values",
    "spectral_signature",
]

SINGULAR_VALUE_FLOOR = 1e-6
TINY = 1e-30
BANK_FORMAT = "specgate-spectral-bank"
BANK_VERSION = 3
#: what changed in each bank version (the message for a bank of an older one)
_OLD_VERSIONS = {
    1: "version 1 banks hold sum-Gram signatures that grow with the scan's size",
    2: "version 2 banks were fitted before the signature's design was chosen on the validation range; "
       "the SegNet signature is now the first encoder stage's centred log-spectrum over the body's canvas, "
       "which holds blurred and ghosted MRs the model fails on (specgate model experiment failures)",
}


class BankMismatchError(ValueError):
    """An OOD bank was loaded for weights other than the ones it was fitted with."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (used to tie an OOD bank to the weights it was fitted for)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: how the log-spectrum becomes a signature: ``"mean"`` (the paper's: log, unit L2) or ``"centred"`` (log,
#: minus its mean, unit L2: the same for a feature map multiplied by any gain)
SPECTRA = ("mean", "centred")


def _check_spectrum(spectrum: str) -> None:
    if spectrum not in SPECTRA:
        raise ValueError(f"unknown spectrum {spectrum!r} (known: {', '.join(SPECTRA)})")


def signature_from_singular_values(s: np.ndarray, spectrum: str = "mean") -> np.ndarray:
    """Floor, log, (centre,) unit-L2: the last steps of the spectral signature.

    ``spectrum="centred"`` subtracts the mean of the log-spectrum before the scaling: a global gain
    ``g`` of the feature map adds ``log g`` to every entry, which the centring removes (the paper's
    scaling to unit length alone does not remove an added constant).
    """
    _check_spectrum(spectrum)
    s = np.sort(np.asarray(s, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("no singular values")
    floor = max(float(s[0]) * SINGULAR_VALUE_FLOOR, TINY)
    log_s = np.log(np.maximum(s, floor))
    if spectrum == "centred":
        log_s = log_s - log_s.mean()
    norm = float(np.linalg.norm(log_s))
    if norm == 0.0:  # every singular value exactly 1: any unit vector is as good; keep it defined
        return np.full_like(log_s, 1.0 / np.sqrt(log_s.size))
    return log_s / norm


def spectral_signature(features: Any, mask: np.ndarray | None = None, spectrum: str = "mean") -> np.ndarray:
    """Signature of a ``(C, *spatial)`` feature map (NumPy array or torch tensor) by direct SVD.

    The singular values are those of ``F / sqrt(N)`` over the voxels where ``mask`` (``spatial``-shaped,
    boolean; default: all voxels) is true: the mean Gram matrix, so a map and its tiling agree.
    Returns a 1-D float64 NumPy array of length ``C``.
    """
    if hasattr(features, "detach"):  # torch.Tensor, without importing torch here
        features = features.detach().float().cpu().numpy()
    f = np.asarray(features)
    if f.ndim < 2:
        raise ValueError(f"features must be (C, *spatial), got shape {f.shape}")
    mat = f.reshape(f.shape[0], -1).T.astype(np.float64)  # (voxels, C)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != f.shape[1:]:
            raise ValueError(f"mask has shape {m.shape}, the feature map's voxels are {f.shape[1:]}")
        mat = mat[m.ravel()]
    if mat.shape[0] == 0:
        raise ValueError("the mask selects no voxel")
    s = np.linalg.svd(mat / np.sqrt(mat.shape[0]), compute_uv=False)
    if s.size < f.shape[0]:  # fewer voxels than channels: the missing singular values are zero
        s = np.concatenate([s, np.zeros(f.shape[0] - s.size)])
    return signature_from_singular_values(s, spectrum)


def signature_from_gram(gram: np.ndarray, n_voxels: int, spectrum: str = "mean") -> np.ndarray:
    """Signature from the ``C x C`` Gram matrix ``F^T F`` summed over ``n_voxels`` voxels.

    The eigenvalues of the mean Gram ``F^T F / n_voxels`` are the squared singular values of
    ``F / sqrt(n_voxels)`` (what :func:`spectral_signature` takes).
    """
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square, got shape {g.shape}")
    if int(n_voxels) < 1:
        raise ValueError(f"n_voxels must be >= 1, got {n_voxels}")
    g = g / float(n_voxels)
    eig = np.linalg.eigvalsh((g + g.T) / 2.0)
    return signature_from_singular_values(np.sqrt(np.clip(eig, 0.0, None)), spectrum)


def leave_one_out_oodm(bank: np.ndarray, groups: Any = None) -> np.ndarray:
    """For each bank signature, the distance to its nearest bank signature of *another* image.

    ``groups`` (one label per signature, e.g. the training case it came from) leaves out every signature
    of the same group; by default each signature is its own group.
    """
    b = np.asarray(bank, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] < 2:
        raise ValueError(f"need a (n >= 2, C) bank of signatures, got shape {b.shape}")
    d = np.linalg.norm(b[:, None, :] - b[None, :, :], axis=-1)
    if groups is None:
        np.fill_diagonal(d, np.inf)
    else:
        g = np.asarray(groups)
        if g.shape != (b.shape[0],):
            raise ValueError(f"groups must have one label per signature ({b.shape[0]}), got shape {g.shape}")
        if len(set(g.tolist())) < 2:
            raise ValueError("groups must name at least two different images")
        d[g[:, None] == g[None, :]] = np.inf
    return d.min(axis=1)


def fit_threshold(train_scores: np.ndarray, c: float) -> float:
    """Eq. (2): ``mean + c * std`` (population std) of the training scores."""
    s = np.asarray(train_scores, dtype=np.float64)
    return float(s.mean() + c * s.std())


def _canon(v: Any) -> Any:
    """JSON-comparable form (tuples and lists alike, floats rounded to 1e-6)."""
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, float):
        return round(v, 6)
    return v


class OODScorer(ABC):
    """Common interface of the spectral gate and the baselines.

    Each scorer turns an *observation* into a scalar score (higher = more out-of-distribution) and flags
    ``score > tau``. ``observe(result)`` extracts the observation it needs from an
    :class:`model.infer.InferenceResult`, so callers can treat every scorer alike::

        scorer.is_ood(scorer.observe(result))
    """

    name: ClassVar[str]
    tau: float

    @abstractmethod
    def observe(self, result: Any) -> Any:
        """The observation this scorer needs, taken from an inference result."""

    @abstractmethod
    def score(self, observation: Any) -> float:
        """The OOD score; higher means further from the training data."""

    def is_ood(self, observation: Any) -> bool:
        return bool(self.score(observation) > self.tau)


class SpectralGate(OODScorer):
    """Nearest-neighbour distance of spectral signatures, thresholded by Eq. (2).

    Build with :meth:`fit` or :meth:`load`; the constructor only stores what it is given.
    """

    name: ClassVar[str] = "spectral"

    def __init__(
        self,
        bank: np.ndarray,
        tau: float,
        c: float,
        weights_sha256: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.bank = np.asarray(bank, dtype=np.float64)
        self.tau = float(tau)
        self.c = float(c)
        self.weights_sha256 = weights_sha256
        self.meta = dict(meta or {})

    @classmethod
    def fit(
        cls,
        signatures: np.ndarray,
        c: float = 2.5,
        weights_sha256: str | None = None,
        meta: dict[str, Any] | None = None,
        groups: Any = None,
    ) -> SpectralGate:
        """Fit tau on leave-one-out OODMs; ``groups`` as in :func:`leave_one_out_oodm`."""
        bank = np.asarray(signatures, dtype=np.float64)
        if bank.ndim != 2 or bank.shape[0] < 2:
            raise ValueError(f"need at least two training signatures as (n, C), got shape {bank.shape}")
        if not np.all(np.isfinite(bank)):
            raise ValueError("training signatures contain non-finite values")
        loo = leave_one_out_oodm(bank, groups)
        m = dict(meta or {})
        m.setdefault("loo_oodm", [round(float(v), 6) for v in loo])
        return cls(bank, fit_threshold(loo, c), c, weights_sha256, m)

    @property
    def inference(self) -> dict[str, Any] | None:
        """The inference path the bank was fitted through (``meta["inference"]``), if recorded."""
        inf = self.meta.get("inference")
        return dict(inf) if isinstance(inf, dict) else None

    def check_inference(self, settings: dict[str, Any], source: str = "the worker") -> None:
        """Refuse to score signatures made by another inference path than the bank's.

        ``settings`` is what :meth:`model.study_inference.InferenceSettings.signature_settings` returns; every key
        the bank also records must be equal. Raises :class:`BankMismatchError` naming each difference.
        """
        fitted = self.inference
        if fitted is None:
            raise BankMismatchError(
                "the OOD bank does not record the inference path it was fitted through; refit it with "
                "`specgate model fit-ood`")
        diffs = [f"{k}: bank {fitted.get(k)!r}, {source} {v!r}" for k, v in sorted(settings.items())
                 if _canon(fitted.get(k)) != _canon(v)]
        if diffs:
            raise BankMismatchError(
                "the OOD bank was fitted through another inference path than " + source + " runs ("
                + "; ".join(diffs) + "); run with the bank's settings or refit it with `specgate model fit-ood`")

    def observe(self, result: Any) -> np.ndarray:
        return np.asarray(result.signature, dtype=np.float64)

    @property
    def modalities(self) -> frozenset[str] | None:
        """Modalities of the bank's training images (``meta["modalities"]``), when recorded."""
        m = self.meta.get("modalities")
        return frozenset(str(x).upper() for x in m) if isinstance(m, list) else None

    def verdict(self, signature: np.ndarray, modality: str | None = None) -> tuple[float, bool, str | None]:
        """``(oodm, is_ood, reason)``: OOD when ``oodm > tau`` (``"oodm_above_tau"``) or when ``modality``
        is not among the bank's (``"modality_not_in_bank"``); ``reason`` is None for in distribution."""
        oodm = self.score(signature)
        if oodm > self.tau:
            return oodm, True, "oodm_above_tau"
        known = self.modalities
        if modality is not None and known is not None and modality.upper() not in known:
            return oodm, True, "modality_not_in_bank"
        return oodm, False, None

    @property
    def loo_oodm(self) -> np.ndarray:
        """The bank's own OODM distribution: each training signature's distance to its nearest other
        (recorded at fit time; computed here for a bank saved without it)."""
        recorded = self.meta.get("loo_oodm")
        if isinstance(recorded, list) and len(recorded) == self.bank.shape[0]:
            return np.asarray(recorded, dtype=np.float64)
        return leave_one_out_oodm(self.bank)

    def percentile(self, oodm: float) -> float:
        """Percent of the bank's own OODMs at or below ``oodm`` (where a study falls on the training data's
        distribution: 50 is a typical training image, 100 is beyond every one of them)."""
        loo = self.loo_oodm
        return float(100.0 * np.count_nonzero(loo <= oodm) / max(len(loo), 1))

    def score(self, signature: np.ndarray) -> float:
        s = np.asarray(signature, dtype=np.float64).ravel()
        if s.shape[0] != self.bank.shape[1]:
            raise ValueError(f"signature has length {s.shape[0]}, the bank has {self.bank.shape[1]}")
        return float(np.min(np.linalg.norm(self.bank - s[None, :], axis=1)))

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a versioned ``.npz`` file (no pickles)."""
        header = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "tau": self.tau,
            "c": self.c,
            "weights_sha256": self.weights_sha256,
            "meta": self.meta,
        }
        text = np.array(json.dumps(header, sort_keys=True))
        atomic_write(path, lambda fh: np.savez(fh, bank=self.bank, header=text))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], weights_sha256: str | None = None
    ) -> SpectralGate:
        """Read a bank; with ``weights_sha256`` given, refuse a bank fitted for other weights."""
        with np.load(path, allow_pickle=False) as z:
            try:
                header = json.loads(str(z["header"]))
                bank = np.array(z["bank"], dtype=np.float64)
            except KeyError as exc:
                raise ValueError(f"{path} is not a specgate OOD bank (missing {exc})") from None
        if header.get("format") != BANK_FORMAT:
            raise ValueError(f"{path} is not a specgate OOD bank (format {header.get('format')!r})")
        if header.get("version") in _OLD_VERSIONS:
            raise ValueError(
                f"{path}: OOD bank version {header.get('version')} is no longer supported "
                f"({_OLD_VERSIONS[header['version']]}); refit it with `specgate model fit-ood`")
        if header.get("version") != BANK_VERSION:
            raise ValueError(
                f"{path}: OOD bank version {header.get('version')!r} is not supported (expected {BANK_VERSION})"
            )
        recorded = header.get("weights_sha256")
        if weights_sha256 is not None and recorded != weights_sha256:
            raise BankMismatchError(
                f"OOD bank {path} was fitted for weights with SHA-256 {recorded}, "
                f"but the loaded weights have SHA-256 {weights_sha256}; refit it with "
                "`specgate model fit-ood` for these weights"
            )
        return cls(bank, header["tau"], header["c"], recorded, header.get("meta"))
