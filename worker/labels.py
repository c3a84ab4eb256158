"""What every DICOM object we produce says about itself: which model made it, what the OOD gate saw, and
how the result was released. Shared by :mod:`worker.dicom_seg`, :mod:`worker.sr` and :mod:`worker.kos`.

The three records are small and frozen, validated where they are built (the bad value in the message),
and turned into the short texts a PACS shows: a Series Description of at most 64 characters, a Content
Label (CS: upper case, at most 16), a Content Description with the gate's verdict. A model whose card says
it is not for clinical use marks every object with :data:`NOT_FOR_CLINICAL_USE`, at the front of the
Series Description (where a truncating PACS list still shows it) and in Image Comments (SEG) or a TEXT
content item (SR, KOS), as MONAI Deploy's App SDK marks its SEG and SR.

    >>> model = ModelIdentity("specgate-unet", "1.2.0", "3f" * 32)
    >>> series_description("Phantom organ", model, Release("gate"))
    'NOT FOR CLINICAL USE: Phantom organ, specgate-unet 1.2.0, gate'
    >>> content_label(GateEvidence(oodm=0.031, tau=0.052, c=2.5, is_ood=False))
    'GATE_PASS'
    >>> content_description(GateEvidence(oodm=0.031, tau=0.052, c=2.5, is_ood=False))
    'OODM 0.031 <= tau 0.052: in distribution'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

__all__ = ["GateEvidence", "ModelIdentity", "NOT_FOR_CLINICAL_USE", "Release", "content_description",
           "content_label", "person_name", "readable_name", "release_phrase", "series_description",
           "verdict_phrase"]

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

_LO_MAX = 64  # VR LO (Series Description, Content Description, Segment Description)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GATE_REASONS = {"oodm_above_tau", "modality_not_in_bank"}


@dataclass(frozen=True)
class ModelIdentity:
    """The model that drew the result. ``clinical_use=False`` (the default): every object is visibly
    marked :data:`NOT_FOR_CLINICAL_USE`."""

    name: str
    version: str
    weights_sha256: str
    clinical_use: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError(f"model name and version must not be empty, got {self.name!r}, {self.version!r}")
        if not _SHA256.fullmatch(self.weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}")


@dataclass(frozen=True)
class GateEvidence:
    """What the OOD gate measured: the score (OODM), its threshold tau, the calibration constant C that
    set tau (None when unknown), the verdict, and why it held (``"oodm_above_tau"`` or
    ``"modality_not_in_bank"``; None when it released)."""

    oodm: float
    tau: float
    c: float | None
    is_ood: bool
    gate_reason: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("oodm", self.oodm), ("tau", self.tau), ("c", self.c)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{what} must be a finite number, got {value!r}")
        if self.gate_reason is not None and self.gate_reason not in _GATE_REASONS:
            raise ValueError(f"gate_reason must be one of {sorted(_GATE_REASONS)} or None, got {self.gate_reason!r}")
        if self.gate_reason is not None and not self.is_ood:
            raise ValueError(f"gate_reason {self.gate_reason!r} given for an in-distribution result")


@dataclass(frozen=True)
class Release:
    """How the result left specgate: released by the OOD gate, or approved by a radiologist (who, when)."""

    how: Literal["gate", "approved"]
    reviewer: str | None = None
    decided_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.how not in ("gate", "approved"):
            raise ValueError(f"release how must be 'gate' or 'approved', got {self.how!r}")
        if self.how == "approved" and not (self.reviewer and self.reviewer.strip()):
            raise ValueError(f"an approved release needs the reviewer's name, got {self.reviewer!r}")
        if self.how == "gate" and self.reviewer is not None:
            raise ValueError(f"a release by the gate has no reviewer, got {self.reviewer!r}")
        if self.reviewer is not None and ("\\" in self.reviewer or "=" in self.reviewer or len(self.reviewer) > 64):
            raise ValueError(f"reviewer must be a name of at most 64 characters without a backslash or '=' "
                             f"(a DICOM PN), got {self.reviewer!r}")

    @property
    def reviewer_pn(self) -> str | None:
        """The reviewer as a DICOM PN: a one-word user name gets the trailing caret that marks it as a
        family name (PS3.5 6.2.1.2), so readers do not take it for a malformed name.

        >>> Release("approved", reviewer="ajones").reviewer_pn
        'ajones^'
        >>> Release("approved", reviewer="Jones^Anna").reviewer_pn
        'Jones^Anna'
        """
        return None if self.reviewer is None else person_name(self.reviewer)

    @property
    def reviewer_text(self) -> str | None:
        """The reviewer as people write names: a DICOM PN ``Family^Given`` becomes ``Given Family``.

        >>> Release("approved", reviewer="Jones^Anna").reviewer_text
        'Anna Jones'
        """
        return None if self.reviewer is None else readable_name(self.reviewer)


def person_name(name: str) -> str:
    """``name`` as a DICOM PN: one word (a user name) gets the trailing caret of a family name.

    >>> person_name("ajones"), person_name("Jones^Anna")
    ('ajones^', 'Jones^Anna')
    """
    return name if "^" in name else f"{name}^"


def readable_name(name: str) -> str:
    """A PN as people write names: ``Family^Given`` becomes ``Given Family``.

    >>> readable_name("Jones^Anna"), readable_name("ajones")
    ('Anna Jones', 'ajones')
    """
    family, _, rest = name.partition("^")
    given = rest.split("^")[0]
    return " ".join(p for p in (given, family) if p).strip() or name


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with "..."."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def release_phrase(release: Release) -> str:
    """``"gate"`` or ``"approved by NAME"``.

    >>> release_phrase(Release("approved", reviewer="dr.jones"))
    'approved by dr.jones'
    """
    return "gate" if release.how == "gate" else f"approved by {release.reviewer_text}"


def series_description(what: str, model: ModelIdentity, release: Release) -> str:
    """At most 64 characters: ``[NOT FOR CLINICAL USE: ]WHAT, MODEL VERSION, gate|approved by NAME``.

    The marker, the model version and the words "gate" / "approved by" are never cut. Where the whole does
    not fit, the longest of segment label, model name and reviewer name is shortened, one character at a
    time, the cut marked with ".":

    >>> approved = Release("approved", reviewer="Jones^Anna")
    >>> series_description("Phantom organ", ModelIdentity("specgate-unet", "1.0", "0" * 64), approved)
    'NOT FOR CLINICAL USE: Phanto., specga. 1.0, approved by Anna Jo.'
    """
    prefix = "" if model.clinical_use else f"{NOT_FOR_CLINICAL_USE}: "
    names = {"what": what, "model": model.name, "reviewer": release.reviewer_text or ""}
    cut = dict.fromkeys(names, False)

    def text() -> str:
        shown = {k: v + ("." if cut[k] else "") for k, v in names.items()}
        how = "gate" if release.how == "gate" else f"approved by {shown['reviewer']}"
        return f"{prefix}{shown['what']}, {shown['model']} {model.version}, {how}"

    while len(text()) > _LO_MAX:
        longest = max((k for k in names if len(names[k]) > 1), key=lambda k: len(names[k]), default=None)
        if longest is None:  # only an absurd model version can get here
            return _clip(text(), _LO_MAX)
        names[longest] = names[longest][:-1].rstrip()
        cut[longest] = True
    return text()


def verdict_phrase(evidence: GateEvidence) -> str:
    """The gate's verdict in words: ``"in distribution"``, ``"out of distribution"``, ``"modality not
    in the gate's bank"``."""
    if not evidence.is_ood:
        return "in distribution"
    if evidence.gate_reason == "modality_not_in_bank":
        return "modality not in the gate's bank"
    return "out of distribution"


def content_label(evidence: GateEvidence) -> str:
    """The gate's verdict as a Content Label (CS: upper case, digits, underscore; at most 16)."""
    if not evidence.is_ood:
        return "GATE_PASS"
    return "GATE_NO_BANK" if evidence.gate_reason == "modality_not_in_bank" else "GATE_OOD"


def content_description(evidence: GateEvidence) -> str:
    """OODM against tau, and the verdict, in at most 64 characters."""
    sign = ">" if evidence.oodm > evidence.tau else "<="
    return _clip(f"OODM {evidence.oodm:.4g} {sign} tau {evidence.tau:.4g}: {verdict_phrase(evidence)}", _LO_MAX)

