"""The DICOM Basic Application Level Confidentiality Profile (PS3.15 Annex E) applied through pydicom's
``deid``, with UIDs and patient identity replaced by a keyed, deterministic pseudonymisation.

Where each piece comes from:

- **the attribute list** is the standard's Table E.1-1 (edition 2026c) as the ``dicom-anonymizer`` package
  ships it, one list per action code (D, Z, X, U and the combined Z/D, X/Z, X/D, X/Z/D, X/Z/U*), 655
  attributes plus the repeating curve and overlay groups. ``deid`` ships no Annex E recipe: its default
  ``deid.dicom`` is one site's recipe (it removes every attribute whose name holds "UID", SOP Class UID
  included, and every date), so the recipe is generated here from the table (:func:`annex_e_recipe`);
- **the engine** is ``deid``'s :class:`~deid.dicom.parser.DicomParser` running that recipe over every
  element, nested sequence items included (a SEG's Referenced Series Sequence and per-frame Source Image
  Sequence), with private attributes removed;
- **the combined codes** are resolved to the action that is valid for every IOD: Z/D, X/D and X/Z/D to D
  (a dummy value: a Type 1 attribute keeps a value), X/Z to Z, X/Z/U* to U; a sequence under U (Source
  Image, Referenced Image: a SEG's per-frame references) is kept with every UID in it replaced, a
  sequence under D is emptied;
- **UIDs** (U) are HMAC-SHA-256 of the original under the export's key, as ``2.25.<128-bit integer>``: the
  same original UID maps to the same new one in every image and in the SEG that references it, and nobody
  without the key can map back. The key is drawn at random for each export and never written
  (:meth:`Pseudonyms.random`), unless the site keeps one in a file to make successive exports agree
  (:meth:`Pseudonyms.from_file`);
- **patient identity**: Patient's Name and Patient ID (Z and Z/D: "a zero-length or a dummy value") become
  one pseudonym per patient, ``SG`` + 16 hex digits of the HMAC of the original ID and its issuer, so that
  a patient's studies stay together in a training split (a study without a Patient ID: a patient of its own);
- **dates and times** (the table's DA, DT and TM attributes), one of PS3.15's options:
  ``shift`` (Retain Longitudinal Temporal Information with Modified Dates Option, E.3.6): every date and
  time moved back by one offset per patient (whole days plus a number of seconds, both from the HMAC of
  the pseudonym's source), a date and its time (``StudyDate``/``StudyTime``, any ``...Date``/``...Time``
  pair of one data set) as one instant; ``remove``: the profile's own action (Z empty, X removed, D a dummy);
- **clean descriptors** (E.3.11) is not applied: descriptors (Series Description, Study Description, ...)
  are removed as the basic profile says.

The result carries Patient Identity Removed ``YES``, De-identification Method and its code sequence
(113100 basic profile, 113107 modified dates; or 113100 alone) and Longitudinal Temporal Information
Modified (``MODIFIED`` / ``REMOVED``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

__all__ = ["ANNEX_E_EDITION", "DateOption", "Profile", "Pseudonyms", "annex_e_actions", "annex_e_masks",
           "annex_e_recipe", "deidentify", "patient_key"]

ANNEX_E_EDITION = "2026c"
DateOption = Literal["shift", "remove"]

# the table's combined codes, resolved to one action valid in every IOD (module docstring)
_RESOLVE = {"D": "D", "Z": "Z", "X": "X", "U": "U", "K": "K",
            "Z_D": "D", "X_Z": "Z", "X_D": "D", "X_Z_D": "D", "X_Z_U_STAR": "U"}
_TIME_VRS = ("DA", "DT", "TM")
_DUMMY_DATE, _DUMMY_TIME = "19000101", "000000.00"


def _table() -> Any:
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c

    return dicomfields_2026c


@cache
def annex_e_actions() -> Mapping[int, str]:
    """Table E.1-1, the attributes named by one tag: tag -> the table's code (``D``, ``Z``, ``X``, ``U``,
    ``Z_D``, ``X_Z``, ``X_D``, ``X_Z_D``, ``X_Z_U_STAR``).

    >>> annex_e_actions()[0x00100010], annex_e_actions()[0x00080018], annex_e_actions()[0x00080023]
    ('Z', 'U', 'Z_D')
    """
    t = _table()
    out: dict[int, str] = {}
    for code in ("D", "Z", "X", "U", "Z_D", "X_Z", "X_D", "X_Z_D", "X_Z_U_STAR"):
        for entry in getattr(t, f"{code}_TAGS"):
            if len(entry) == 2:
                out[int(Tag(entry[0], entry[1]))] = code
    return out


@cache
def annex_e_masks() -> tuple[tuple[int, int, int, int], ...]:
    """The table's repeating groups (curve data 50xx,xxxx; overlay data and comments 60xx,3000/4000) as
    ``(group, element, group mask, element mask)``: removed (X)."""
    t = _table()
    return tuple(tuple(e) for code in ("X", "X_Z", "X_D", "X_Z_D", "Z", "D") for e in getattr(t, f"{code}_TAGS")
                 if len(e) == 4)  # type: ignore[misc]


def _masked(tag: BaseTag) -> bool:
    return any((tag.group & gm) == g and (tag.element & em) == (e & em) for g, e, gm, em in annex_e_masks())


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _is_time(tag: int) -> bool:
    return _vr(tag) in _TIME_VRS


@cache
def annex_e_recipe(dates: DateOption, only: frozenset[int] | None = None) -> str:
    """The ``deid`` recipe of the profile (``FORMAT dicom``, ``%header``), one line per attribute of the
    table: ``REMOVE`` (X), ``BLANK`` (Z), ``REPLACE ... func:dummy`` (D), ``REPLACE ... func:uid`` (U);
    Patient's Name and ID ``func:patient``; with ``shift``, dates and times are ``KEEP`` here (moved
    before the recipe runs, :func:`deidentify`). ``only``: the lines of these tags (those a data set
    holds: deid matches every line against every element, 0.4 s a CT slice for the whole table, and a
    line whose attribute is absent does nothing).

    >>> print(annex_e_recipe("remove", frozenset({0x00100010, 0x00080080, 0x00080018, 0x00101040, 0x00080050})))
    FORMAT dicom
    <BLANKLINE>
    %header
    <BLANKLINE>
    REPLACE (0008,0018) func:uid
    BLANK (0008,0050)
    REPLACE (0008,0080) func:dummy
    REPLACE (0010,0010) func:patient
    REMOVE (0010,1040)
    <BLANKLINE>
    """
    lines = ["FORMAT dicom", "", "%header", ""]
    for tag, code in sorted(annex_e_actions().items()):
        if only is not None and tag not in only:
            continue
        action = _RESOLVE[code]
        field = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag in (0x00100010, 0x00100020):
            lines.append(f"REPLACE {field} func:patient")
        elif dates == "shift" and _is_time(tag):
            lines.append(f"KEEP {field}")
        elif action == "X":
            lines.append(f"REMOVE {field}")
        elif action == "Z":
            lines.append(f"BLANK {field}")
        elif action == "D":
            lines.append(f"REPLACE {field} func:dummy")
        elif action == "U" and _vr(tag) == "SQ":
            continue  # X/Z/U* on a sequence (Source Image, Referenced Image): kept, its UIDs remapped by their lines
        elif action == "U":
            lines.append(f"REPLACE {field} func:uid")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Pseudonyms:
    """The keyed mapping of one export: UIDs, patient pseudonyms and date offsets (HMAC-SHA-256)."""

    key: bytes

    @classmethod
    def random(cls) -> Pseudonyms:
        """A fresh 256-bit key, kept in memory only: nobody can map this export back, nor link it to
        another export."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_file(cls, path: Path) -> Pseudonyms:
        """A site's own key (at least 32 bytes, kept apart from every export): successive exports give a
        patient, a study and an image the same pseudonyms."""
        key = Path(path).read_bytes().strip()
        if len(key) < 32:
            raise ValueError(f"{path}: an export key must hold at least 32 bytes, it holds {len(key)}")
        return cls(key)

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The new UID of ``original``: ``2.25.`` and 128 bits of its HMAC (at most 44 characters).

        >>> p = Pseudonyms(b"k" * 32)
        >>> p.uid("1.2.3") == p.uid("1.2.3") != p.uid("1.2.4"), p.uid("1.2.3").startswith("2.25.")
        (True, True)
        """
        return f"2.25.{int.from_bytes(self._digest('uid', original.strip())[:16], 'big')}"

    def patient(self, patient_id: str) -> str:
        """The pseudonym of a patient (Patient's Name and Patient ID of the export)."""
        return "SG" + self._digest("patient", patient_id.strip()).hex()[:16].upper()

    def offset(self, patient_id: str) -> timedelta:
        """How far back this patient's dates and times move: 1 to 3650 days, plus 1 to 86399 seconds."""
        d = self._digest("dates", patient_id.strip())
        return timedelta(days=1 + int.from_bytes(d[:4], "big") % 3650, seconds=1 + int.from_bytes(d[4:8], "big") % 86399)


@dataclass(frozen=True)
class Profile:
    """The options of one export: the dates option and the export's pseudonyms."""

    pseudonyms: Pseudonyms
    dates: DateOption = "shift"

    def __post_init__(self) -> None:
        if self.dates not in ("shift", "remove"):
            raise ValueError(f"dates must be 'shift' or 'remove', got {self.dates!r}")


# ------------------------------------------------------------------------------------------------ dates
def _parse_tm(value: str) -> time:
    v = value.strip()
    hh, mm, ss = int(v[0:2]), int(v[2:4] or 0), int(v[4:6] or 0)
    frac = v[7:13] if len(v) > 7 and v[6] == "." else ""
    return time(hh, mm, ss, int(frac.ljust(6, "0")) if frac else 0)


def _fmt_tm(t: time) -> str:
    return t.strftime("%H%M%S") + (f".{t.microsecond:06d}" if t.microsecond else "")


def _parse_dt(value: str) -> datetime:
    v = value.strip()
    for offset_sign in ("+", "-"):
        if offset_sign in v[8:]:
            v = v[: 8 + v[8:].index(offset_sign)]
    d = datetime.strptime(v[:8], "%Y%m%d")
    return datetime.combine(d.date(), _parse_tm(v[8:]) if len(v) > 8 else time())


def _shift_one(elem: DataElement, delta: timedelta) -> None:
    if elem.VM != 1 or elem.value in (None, ""):
        return
    s = str(elem.value)
    if elem.VR == "DA":
        elem.value = (datetime.strptime(s.strip()[:8], "%Y%m%d") - timedelta(days=delta.days)).strftime("%Y%m%d")
    elif elem.VR == "TM":
        t = datetime.combine(date(2000, 1, 1), _parse_tm(s)) - timedelta(seconds=delta.seconds)
        elem.value = _fmt_tm(t.time())
    elif elem.VR == "DT":
        moved = _parse_dt(s) - delta
        elem.value = moved.strftime("%Y%m%d") + _fmt_tm(moved.time())


def _shift_dates(ds: Dataset, delta: timedelta) -> None:
    """Move every date and time of the table in ``ds`` (and its sequence items) back by ``delta``: a
    ``...Date``/``...Time`` pair as one instant, a lone date by the days, a lone time by the seconds."""
    listed = annex_e_actions()
    done: set[int] = set()
    for elem in list(ds):
        tag = int(elem.tag)
        if elem.VR == "SQ":
            for item in elem.value:
                _shift_dates(item, delta)
            continue
        if tag not in listed or tag in done or elem.VR not in _TIME_VRS:
            continue
        kw = keyword_for_tag(tag)
        pair = kw[:-4] + "Time" if elem.VR == "DA" and kw.endswith("Date") else None
        partner = ds.data_element(pair) if pair is not None and pair in ds else None
        if partner is not None and partner.VR == "TM" and int(partner.tag) in listed and partner.value \
                and elem.value and elem.VM == 1 and partner.VM == 1:
            moved = datetime.combine(datetime.strptime(str(elem.value).strip()[:8], "%Y%m%d").date(),
                                     _parse_tm(str(partner.value))) - delta
            elem.value, partner.value = moved.strftime("%Y%m%d"), _fmt_tm(moved.time())
            done.add(int(partner.tag))
        else:
            _shift_one(elem, delta)
        done.add(tag)


# ----------------------------------------------------------------------------------------- the profile
def _dummy(vr: str) -> Any:
    """A D action's value for ``vr``."""
    if vr in ("DA",):
        return _DUMMY_DATE
    if vr == "TM":
        return _DUMMY_TIME
    if vr == "DT":
        return _DUMMY_DATE + "000000"
    if vr in ("IS", "DS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    if vr == "SQ":
        return Sequence()
    if vr == "AS":
        return "000Y"
    if vr == "PN":
        return "ANONYMIZED^"  # family name component: a name without '^' is PN's retired form
    return "ANONYMIZED"


def patient_key(ds: Dataset) -> str:
    """Who the patient is, for the pseudonym and the date offset: the Patient ID within its issuer; a data
    set without a Patient ID is a patient of its own (its study).

    >>> d = Dataset(); d.PatientID = "123"; d.StudyInstanceUID = "1.2"
    >>> patient_key(d).split("\\x00")
    ['123', '']
    >>> d.IssuerOfPatientID = "B"; patient_key(d).split("\\x00")
    ['123', 'B']
    >>> d.PatientID = ""; patient_key(d).split("\\x00")
    ['study', '1.2']
    """
    ident = (str(ds.get("PatientID", "") or "").strip(), str(ds.get("IssuerOfPatientID", "") or "").strip())
    return "\x00".join(ident) if ident[0] else "study\x00" + str(ds.get("StudyInstanceUID", ""))


def _walk_masked(ds: Dataset) -> Iterator[tuple[Dataset, BaseTag]]:
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_masked(item)
        elif _masked(elem.tag):
            yield ds, elem.tag


def deidentify(ds: Dataset, profile: Profile) -> Dataset:
    """Apply the profile to ``ds`` (changed in place and returned): the curve and overlay groups and
    every private attribute removed, dates shifted (``shift``), then the Annex E recipe run by ``deid``
    over every element and nested item, and the de-identification attributes set."""
    from deid.dicom.fields import _get_fields_inner
    from deid.dicom.parser import DicomParser

    p = profile.pseudonyms
    original_patient = patient_key(ds)
    for parent, tag in list(_walk_masked(ds)):
        del parent[tag]
    if profile.dates == "shift":
        _shift_dates(ds, p.offset(original_patient))

    def uid(item: Any = None, value: Any = None, field: Any = None, dicom: Any = None) -> Any:
        v = field.element.value
        if isinstance(v, list | tuple) or getattr(field.element, "VM", 1) > 1:
            return [p.uid(str(x)) for x in v]
        return p.uid(str(v)) if v not in (None, "") else v

    def dummy(item: Any = None, value: Any = None, field: Any = None, dicom: Any = None) -> Any:
        if field.element.VR == "UI":
            return uid(field=field)
        return _dummy(field.element.VR)

    pseudonym = p.patient(original_patient)

    def patient(item: Any = None, value: Any = None, field: Any = None, dicom: Any = None) -> Any:
        return pseudonym + "^" if field.element.VR == "PN" else pseudonym

    listed = annex_e_actions()
    recipe = _recipe(profile.dates, frozenset(t for t in _tags(ds) if t in listed))
    if not isinstance(ds, FileDataset):  # deid hashes a FileDataset by its identity; a plain Dataset it cannot
        ds = FileDataset("", ds, file_meta=getattr(ds, "file_meta", None), preamble=b"\0" * 128)
    try:
        parser = DicomParser(ds, recipe=recipe)
        for name, func in (("uid", uid), ("dummy", dummy), ("patient", patient)):
            parser.define(name, func)
        parser.parse(remove_private=True)
    finally:
        # deid memoises the fields of every data set it parses (functools.cache keyed on the data set): the
        # cache would keep each one, pixels included, for the life of the process
        _get_fields_inner.cache_clear()
    out: Dataset = parser.dicom
    out.PatientName, out.PatientID = pseudonym + "^", pseudonym  # also where the source had none (Type 2)
    _mark(out, profile)
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _tags(ds: Dataset) -> Iterator[int]:
    for elem in ds:
        yield int(elem.tag)
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _tags(item)


@lru_cache(maxsize=64)
def _recipe(dates: DateOption, only: frozenset[int]) -> Any:
    """The profile as a parsed ``deid`` recipe, once per set of tags (the slices of a series share one).
    deid reads a recipe from a file only: written to a temporary folder, read, and removed."""
    import tempfile

    from deid.config import DeidRecipe

    with tempfile.TemporaryDirectory(prefix="specgate-annex-e-") as folder:
        path = Path(folder) / f"annex-e-{dates}.dicom"
        path.write_text(annex_e_recipe(dates, only), encoding="utf-8")
        return DeidRecipe(deid=str(path), base=False)


def _mark(ds: Dataset, profile: Profile) -> None:
    """Patient Identity Removed, De-identification Method (and its codes), Longitudinal Temporal
    Information Modified: what a reader of the export is told about what was done."""
    ds.PatientIdentityRemoved = "YES"
    codes = [("113100", "Basic Application Confidentiality Profile")]
    if profile.dates == "shift":
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    ds.DeidentificationMethod = f"PS3.15 Annex E {ANNEX_E_EDITION}; specgate export; deid"[:64]
    seq = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if profile.dates == "shift" else "REMOVED"
