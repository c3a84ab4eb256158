"""Spectral out-of-distribution gate (Karimi & Gholipour 2023, section III-D).

The *spectral signature* of an image is computed from the last decoder feature map ``F`` (``C`` channels):
reshape to ``(voxels, C)``, take the singular values ``s`` (descending), floor them, take ``log(s)`` and
scale that vector to unit L2 norm.

Singular-value floor
    A dead ReLU channel gives a zero singular value and ``log(0) = -inf``. Singular values are therefore
    floored at ``SINGULAR_VALUE_FLOOR * max(s)`` (relative, 1e-6), and at ``TINY`` (absolute, 1e-30) when
    the whole map is zero. The relative floor is also what makes the streaming Gram route
    (:func:`signature_from_gram`) agree with a direct SVD: eigenvalues of ``F^T F`` in float64 carry an
    absolute error of about ``1e-16 * s_max**2``, i.e. singular values below ``~1e-8 * s_max`` are noise
    either way, and both routes map them to the same floor.

The *gate*: ``OODM(x)`` is the Euclidean distance of the signature of ``x`` to its nearest neighbour in the
bank of training signatures. ``tau = mean + c * std`` of the leave-one-out OODMs of the bank (``std`` is
the population standard deviation, ``ddof=0``); ``x`` is OOD when ``OODM(x) > tau``.

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
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "SINGULAR_VALUE_FLOOR",
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
BANK_VERSION = 1


class BankMismatchError(ValueError):
    """An OOD bank was loaded for weights other than the ones it was fitted with."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (used to tie an OOD bank to the weights it was fitted for)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def signature_from_singular_values(s: np.ndarray) -> np.ndarray:
    """Floor, log, unit-L2: the last three steps of the spectral signature."""
    s = np.sort(np.asarray(s, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("no singular values")
    floor = max(float(s[0]) * SINGULAR_VALUE_FLOOR, TINY)
    log_s = np.log(np.maximum(s, floor))
    norm = float(np.linalg.norm(log_s))
    if norm == 0.0:  # every singular value exactly 1: any unit vector is as good; keep it defined
        return np.full_like(log_s, 1.0 / np.sqrt(log_s.size))
    return log_s / norm


def spectral_signature(features: Any) -> np.ndarray:
    """Signature of a ``(C, *spatial)`` feature map (NumPy array or torch tensor) by direct SVD.

    Returns a 1-D float64 NumPy array of length ``C``.
    """
    if hasattr(features, "detach"):  # torch.Tensor, without importing torch here
        features = features.detach().float().cpu().numpy()
    f = np.asarray(features)
    if f.ndim < 2:
        raise ValueError(f"features must be (C, *spatial), got shape {f.shape}")
    mat = f.reshape(f.shape[0], -1).T.astype(np.float64)  # (voxels, C)
    s = np.linalg.svd(mat, compute_uv=False)
    if s.size < f.shape[0]:  # fewer voxels than channels: the missing singular values are zero
        s = np.concatenate([s, np.zeros(f.shape[0] - s.size)])
    return signature_from_singular_values(s)


def signature_from_gram(gram: np.ndarray) -> np.ndarray:
    """Signature from the ``C x C`` Gram matrix ``F^T F`` (its eigenvalues are the squared singular values)."""
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square, got shape {g.shape}")
    eig = np.linalg.eigvalsh((g + g.T) / 2.0)
    return signature_from_singular_values(np.sqrt(np.clip(eig, 0.0, None)))


def leave_one_out_oodm(bank: np.ndarray) -> np.ndarray:
    """For each bank signature, the distance to its nearest *other* bank signature."""
    b = np.asarray(bank, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] < 2:
        raise ValueError(f"need a (n >= 2, C) bank of signatures, got shape {b.shape}")
    d = np.linalg.norm(b[:, None, :] - b[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def fit_threshold(train_scores: np.ndarray, c: float) -> float:
    """Eq. (2): ``mean + c * std`` (population std) of the training scores."""
    s = np.asarray(train_scores, dtype=np.float64)
    return float(s.mean() + c * s.std())


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
    ) -> SpectralGate:
        bank = np.asarray(signatures, dtype=np.float64)
        if bank.ndim != 2 or bank.shape[0] < 2:
            raise ValueError(f"need at least two training signatures as (n, C), got shape {bank.shape}")
        if not np.all(np.isfinite(bank)):
            raise ValueError("training signatures contain non-finite values")
        tau = fit_threshold(leave_one_out_oodm(bank), c)
        return cls(bank, tau, c, weights_sha256, meta)

    def observe(self, result: Any) -> np.ndarray:
        return np.asarray(result.signature, dtype=np.float64)

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
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, bank=self.bank, header=np.array(json.dumps(header, sort_keys=True)))
        os.replace(tmp, p)

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
