"""What a model's label names mean in SNOMED CT: the default table for common abdominal and thoracic
organs, the normalisation of label names, and a model's own mapping over it.

A DICOM-SEG segment is coded by a *category* (CID 7150) and a *type* (CID 7151, anatomy), with an optional
laterality *modifier* of the type (CID 244, ``SegmentedPropertyTypeModifierCodeSequence``). Every code in
:data:`DEFAULT_ANATOMY` is taken from the DICOM PS3.16 concepts pydicom ships (``pydicom.sr.codedict``;
a test checks each value and meaning against that table), never typed in from memory. Where PS3.16 has no
concept for the sided structure (the left kidney, the right adrenal gland, the lower lobe of the left
lung), the structure's own code is written with the Left/Right modifier, as PS3.3 C.8.20.2 intends for
paired organs; where it has one (upper lobe of the left lung, middle lobe of the right lung), that code.

Label names are normalised before the look-up (:func:`normalise_name`): case, ``_`` / ``-`` / ``.`` and
repeated spaces are ignored, the words "left"/"right" may stand anywhere (``kidney_left``, ``Left kidney``,
``kidney (left)``), and a few spellings are aliases (``lungs``, ``small_bowel``, ``urinary_bladder``,
``vertebrae_L1``):

    >>> lookup("kidney_left").type, lookup("kidney_left").modifier
    (('64033007', 'SCT', 'Kidney'), ('7771000', 'SCT', 'Left'))
    >>> lookup("Left Kidney") == lookup("kidney_left")
    True
    >>> lookup("lung_upper_lobe_left").type
    ('44714003', 'SCT', 'Structure of upper lobe of left lung (body structure)')
    >>> lookup("vertebrae_L1").type
    ('66794005', 'SCT', 'L1 vertebra')
    >>> lookup("tumour") is None
    True

A model's registration may bring its own mapping (``Mapping[str, code]``), looked up before the default
table, names normalised the same way. A value there is an :class:`AnatomyCode` or a bare
``(value, scheme, meaning)`` triple, which is taken as the type with the category "Anatomical Structure".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from model.adapters.base import normalise_name

__all__ = ["ANATOMICAL_STRUCTURE", "AnatomyCode", "CodeTriple", "CodeMapping", "DEFAULT_ANATOMY", "LEFT", "RIGHT",
           "lookup", "normalise_name", "validate_code"]

CodeTriple: TypeAlias = tuple[str, str, str]
"""(code value, coding scheme designator, code meaning)."""

ANATOMICAL_STRUCTURE: CodeTriple = ("91723000", "SCT", "Anatomical Structure")
"""CID 7150's category for anatomy (``codes.cid7150.AnatomicalStructure``)."""
LEFT: CodeTriple = ("7771000", "SCT", "Left")
RIGHT: CodeTriple = ("24028007", "SCT", "Right")
_SIDES = {"left": LEFT, "right": RIGHT}


def validate_code(code: object, what: str) -> CodeTriple:
    """``code`` as a (value, scheme designator, meaning) triple of non-empty strings, else ValueError."""
    if (not isinstance(code, tuple | list) or len(code) != 3
            or not all(isinstance(c, str) and c.strip() for c in code)):
        raise ValueError(f"{what} must be (value, scheme designator, meaning), got {code!r}")
    return (code[0], code[1], code[2])


@dataclass(frozen=True)
class AnatomyCode:
    """How one segment is coded: category (CID 7150), type (CID 7151) and an optional laterality
    modifier of the type (CID 244)."""

    type: CodeTriple
    category: CodeTriple = ANATOMICAL_STRUCTURE
    modifier: CodeTriple | None = None

    def __post_init__(self) -> None:
        validate_code(self.type, "type_code")
        validate_code(self.category, "category_code")
        if self.modifier is not None:
            validate_code(self.modifier, "modifier_code")


CodeMapping: TypeAlias = Mapping[str, AnatomyCode | CodeTriple]
"""A model's own label name -> code table (a bare triple is the type, category "Anatomical Structure")."""


def _sct(value: str, meaning: str) -> CodeTriple:
    return (value, "SCT", meaning)


# The structure's own codes (CID 7151 "Segmentation Property Types" as pydicom ships it), keyed by the
# normalised name without a side.
_ORGANS: dict[str, CodeTriple] = {
    "liver": _sct("10200004", "Liver"),
    "spleen": _sct("78961009", "Spleen"),
    "kidney": _sct("64033007", "Kidney"),
    "pancreas": _sct("15776009", "Pancreas"),
    "gallbladder": _sct("28231008", "Gallbladder"),
    "stomach": _sct("69695003", "Stomach"),
    "aorta": _sct("15825003", "Aorta"),
    "thoracic aorta": _sct("113262008", "Thoracic aorta"),
    "inferior vena cava": _sct("64131007", "Inferior vena cava"),
    "portal vein": _sct("32764006", "Portal vein"),
    "lung": _sct("39607008", "Lung"),
    "upper lobe of lung": _sct("45653009", "Upper lobe of lung"),
    "lower lobe of lung": _sct("90572001", "Structure of lower lobe of lung (body structure)"),
    "middle lobe of lung": _sct("40020002", "Structure of middle lobe of lung (body structure)"),
    "heart": _sct("80891009", "Heart"),
    "left atrium": _sct("82471001", "Left atrium"),
    "right atrium": _sct("73829009", "Right atrium"),
    "left ventricle": _sct("87878005", "Left ventricle"),
    "right ventricle": _sct("53085002", "Right ventricle"),
    "esophagus": _sct("32849002", "Esophagus"),
    "trachea": _sct("44567001", "Trachea"),
    "urinary bladder": _sct("89837001", "Bladder"),
    "prostate": _sct("41216001", "Prostate"),
    "adrenal gland": _sct("23451007", "Adrenal gland"),
    "duodenum": _sct("38848004", "Duodenum"),
    "small intestine": _sct("30315005", "Small intestine"),
    "colon": _sct("71854001", "Colon"),
    "rectum": _sct("34402009", "Rectum"),
    "vertebra": _sct("51282000", "Vertebra"),
    "sacrum": _sct("54735007", "Sacrum"),
    "spinal cord": _sct("2748008", "Spinal cord"),
    "brain": _sct("12738006", "Brain"),
    "thyroid": _sct("69748006", "Thyroid"),
    "sternum": _sct("56873002", "Sternum"),
    "rib": _sct("113197003", "Rib"),
    "femur": _sct("71341001", "Femur"),
}

# Sided structures PS3.16 has a concept of its own for (used instead of structure + modifier).
_SIDED: dict[tuple[str, CodeTriple], CodeTriple] = {
    ("upper lobe of lung", LEFT): _sct("44714003", "Structure of upper lobe of left lung (body structure)"),
    ("middle lobe of lung", RIGHT): _sct("72481006", "Middle lobe of right lung"),
}

# Other spellings of the keys above (normalised, without a side), as models name their labels
# (TotalSegmentator, nnU-Net / MSD datasets, MONAI bundles).
_ALIASES: dict[str, str] = {
    "lungs": "lung",
    "kidneys": "kidney",
    "adrenal": "adrenal gland",
    "adrenal glands": "adrenal gland",
    "adrenalgland": "adrenal gland",
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "bladder": "urinary bladder",
    "small bowel": "small intestine",
    "bowel small": "small intestine",
    "ivc": "inferior vena cava",
    "postcava": "inferior vena cava",
    "vena cava inferior": "inferior vena cava",
    "lung upper lobe": "upper lobe of lung",
    "upper lobe lung": "upper lobe of lung",
    "lung lower lobe": "lower lobe of lung",
    "lower lobe lung": "lower lobe of lung",
    "lung middle lobe": "middle lobe of lung",
    "middle lobe lung": "middle lobe of lung",
    "vertebrae": "vertebra",
    "spine": "vertebra",
    "thyroid gland": "thyroid",
    "heart atrium left": "left atrium",
    "heart atrium right": "right atrium",
    "heart ventricle left": "left ventricle",
    "heart ventricle right": "right ventricle",
}

# Single vertebrae C1-C7, T1-T12, L1-L5 (CID 7602/7603).
_VERTEBRAE: dict[str, CodeTriple] = {
    "c1": _sct("14806007", "C1 vertebra"), "c2": _sct("39976000", "C2 vertebra"),
    "c3": _sct("113205007", "C3 vertebra"), "c4": _sct("5329002", "C4 vertebra"),
    "c5": _sct("36978003", "C5 vertebra"), "c6": _sct("36054005", "C6 vertebra"),
    "c7": _sct("87391001", "C7 vertebra"),
    "t1": _sct("64864005", "T1 vertebra"), "t2": _sct("53733008", "T2 vertebra"),
    "t3": _sct("1626008", "T3 vertebra"), "t4": _sct("73071006", "T4 vertebra"),
    "t5": _sct("56401006", "T5 vertebra"), "t6": _sct("45296009", "T6 vertebra"),
    "t7": _sct("62487009", "T7 vertebra"), "t8": _sct("11068009", "T8 vertebra"),
    "t9": _sct("82687006", "T9 vertebra"), "t10": _sct("7610001", "T10 vertebra"),
    "t11": _sct("12989004", "T11 vertebra"), "t12": _sct("23215003", "T12 vertebra"),
    "l1": _sct("66794005", "L1 vertebra"), "l2": _sct("14293000", "L2 vertebra"),
    "l3": _sct("36470004", "L3 vertebra"), "l4": _sct("11994002", "L4 vertebra"),
    "l5": _sct("49668003", "L5 vertebra"),
}
_VERTEBRA_NAME = re.compile(r"^(?:vertebrae? )?([ctl]\d{1,2})(?: vertebrae?)?$")


def _default_table() -> Mapping[str, AnatomyCode]:
    table: dict[str, AnatomyCode] = {}
    for name, code in _ORGANS.items():
        key = normalise_name(name)
        table[key] = AnatomyCode(code)
        if key.endswith((" left", " right")):  # a structure that is itself sided (left atrium)
            continue
        for side, modifier in _SIDES.items():
            sided = _SIDED.get((name, modifier))
            table[f"{key} {side}"] = AnatomyCode(sided) if sided else AnatomyCode(code, modifier=modifier)
    for alias, name in _ALIASES.items():
        for suffix in ("", " left", " right"):
            target = normalise_name(f"{name}{suffix}")
            if target in table:
                table.setdefault(normalise_name(f"{alias}{suffix}"), table[target])
    for level, code in _VERTEBRAE.items():
        table[level] = AnatomyCode(code)
    return MappingProxyType(table)


DEFAULT_ANATOMY: Mapping[str, AnatomyCode] = _default_table()
"""Normalised label name -> code, for common abdominal and thoracic structures (see the module docstring)."""


def _as_code(value: AnatomyCode | CodeTriple, name: str) -> AnatomyCode:
    if isinstance(value, AnatomyCode):
        return value
    return AnatomyCode(validate_code(value, f"the code of label {name!r}"))


def lookup(name: str, mapping: CodeMapping | None = None) -> AnatomyCode | None:
    """The code of the label called ``name``: from ``mapping`` (the model's own; keys normalised like the
    name), else from :data:`DEFAULT_ANATOMY`, else None (the caller codes it generically and says so)."""
    key = normalise_name(name)
    if mapping:
        for own, value in mapping.items():
            if normalise_name(own) == key:
                return _as_code(value, own)
    found = DEFAULT_ANATOMY.get(key)
    if found is not None:
        return found
    vertebra = _VERTEBRA_NAME.match(key)
    if vertebra and vertebra.group(1) in _VERTEBRAE:
        return AnatomyCode(_VERTEBRAE[vertebra.group(1)])
    return None
