"""Which segments a result's DICOM-SEG has, and what each says it is: from the model's labels and its
description of its output (:class:`worker.config.ModelSpec`), the rule's choice of labels, and the anatomy
codes (:mod:`worker.anatomy`).

What a model's output is belongs to the model: a model of the settings (TOML ``[models.NAME]``) describes
its one segment there (label, description, codes, colour: ``ModelSpec.segment``, a
:class:`SegmentDefinition`; the shipped model's is :data:`PHANTOM_SEGMENT`); a model registered in the
ledger is described by its label names and the codes of its registration (``specgate model register
--codes``). A rule (``dicom_node.config.SeriesRule``) only routes: which model, and which of its labels
the SEG carries (:class:`RuleChoice`: its ``name`` and ``labels``).

At start-up, :func:`validate_rule_labels` for every rule with its model's labels, so a rule naming a
label its model does not have stops the service with the rule's and the label's names. Then, once per
job, with the prediction's ``labels`` map (z, y, x on the source grid)::

    segments = segments_for(rule, model.labels, codes=spec.codes, segment=spec.segment)
    seg = encode_seg(volume, labels, segments=segments, ...)              # worker.dicom_seg: one segment each
    sr = encode_sr(volume, seg, ...)                                       # volumes counted from the SEG
    save_probability(path, foreground, labels > 0, extra=review_arrays(labels, segments))  # review draws
    evidence["segments"] = segments_evidence(segments, labels, volume.spacing)

(a one-label model goes the same way: its SEG is the very one its boolean mask gave). When a radiologist
approves a held result and its objects are written again, they are written with the segments of the first
writing, whatever the configuration says now: ``segments_from_evidence(evidence["segments"])`` and the
kept ``labels`` map (``review_arrays`` keeps the labels sent, which are all the SEG needs).

**A model that describes its one segment** (a settings model), **one label, no choice in the rule**: the
segment is the model's description: the shipped phantom model's segment stays "Phantom organ".
**Otherwise** (several labels, a rule that chooses labels, or a registered model): one segment per chosen
label, in the model's label order, numbered 1..n (DICOM asks for consecutive segment numbers; the model's
label value is kept in :attr:`SegmentDefinition.value` and the review arrays), named with the model's own
label name, coded from the model's mapping or the default table, and coloured from :data:`PALETTE` by label
value (so a label has the same colour whichever labels a rule chooses). A label without a known code gets
the generic codes (:data:`GENERIC_CODE`: "Anatomical Structure" / "Organ", as the single segment always
had) and says so in its Segment Description: ``"no anatomy code known for label 'NAME'"``.

A chosen label the model did not find in this study still gets its segment (with no frames): the SEG's
segment list is then the same for every study of a rule, and the SR says the volume is 0 mL, which is a
finding ("no spleen found") rather than a silence.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from .anatomy import AnatomyCode, CodeMapping, lookup, normalise_name

__all__ = ["GENERIC_CODE", "LabelLike", "PALETTE", "PHANTOM_SEGMENT", "PHANTOM_SEGMENT_DESCRIPTION", "RuleChoice",
           "RuleOf", "SegmentDefinition", "color_for", "review_arrays", "segments_evidence", "segments_for",
           "segments_from_evidence", "select_labels", "validate_rule_labels"]

_LO_MAX = 64
_NOT_LO = re.compile(r"[\\\x00-\x1f\x7f]")

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128),
)
"""Label value v (1..19) is drawn in ``PALETTE[v - 1]``: Sasha Trubetskoy's "20 simple, distinct colours"
without its grey, white and black (which vanish on a CT slice). Past 19, :func:`color_for` steps the hue
by the golden angle, alternating saturation and brightness."""


def color_for(value: int) -> tuple[int, int, int]:
    """The RGB display colour of label ``value`` (>= 1).

    >>> color_for(1), color_for(4)
    ((230, 25, 75), (0, 130, 200))
    """
    if value < 1:
        raise ValueError(f"label values start at 1 (0 is background), got {value!r}")
    if value <= len(PALETTE):
        return PALETTE[value - 1]
    k = value - len(PALETTE)
    hue = (k * 0.618033988749895) % 1.0
    sat, val = (0.85, 0.95) if k % 2 else (0.55, 0.80)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


class RuleChoice(Protocol):
    """What the segments need of a rule (``dicom_node.config.SeriesRule``): its name, for messages, and
    which of its model's labels it sends (names or values; None: every label)."""

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> tuple[str | int, ...] | None: ...


class LabelLike(Protocol):
    """One of a model's labels (``model.adapters.base.Label``): its value in the label map and its name."""

    @property
    def value(self) -> int: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class SegmentDefinition:
    """One segment of the SEG: the label ``value`` it is drawn from in the label map, its Segment Label
    (at most 64 characters), RGB display colour, codes, whether the codes name the structure
    (``coded=False``: the generic codes), and an optional Segment Description (at most 64)."""

    value: int
    label: str
    color: tuple[int, int, int]
    code: AnatomyCode
    coded: bool = True
    description: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
            raise ValueError(f"a segment's label value must be an integer >= 1, got {self.value!r}")
        if not self.label.strip() or len(self.label) > _LO_MAX or _NOT_LO.search(self.label):
            raise ValueError(f"a segment label must be 1 to {_LO_MAX} characters without a backslash or a "
                             f"control character (DICOM LO), got {self.label!r}")
        if len(self.color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.color):
            raise ValueError(f"a segment colour must be three integers 0-255 (RGB), got {self.color!r}")
        if self.description is not None and len(self.description) > _LO_MAX:
            raise ValueError(f"a segment description must be at most {_LO_MAX} characters, got "
                             f"{self.description!r}")


GENERIC_CODE = AnatomyCode(type=("91772007", "SCT", "Organ"), category=("123037004", "SCT", "Anatomical Structure"))
"""The codes of a segment that names no structure: "Organ", an "Anatomical Structure" (SNOMED CT); the
shipped model's segment, and a label with no known code."""

PHANTOM_SEGMENT_DESCRIPTION = "Organ outline by a model trained on synthetic phantoms only"

PHANTOM_SEGMENT = SegmentDefinition(value=1, label="Phantom organ", color=(255, 160, 0), code=GENERIC_CODE,
                                    description=PHANTOM_SEGMENT_DESCRIPTION)
"""What the shipped model's one segment says it is, and the default of a settings model (``[models.NAME]``):
it was trained on synthetic phantoms only, so its segment is "an organ of a phantom", not a named human
organ."""


def _clip(text: str) -> str:
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3].rstrip() + "..."


def _describe(label: LabelLike, codes: CodeMapping | None) -> SegmentDefinition:
    name = label.name.strip() or f"label {label.value}"
    code = lookup(name, codes)
    if code is None:
        return SegmentDefinition(value=label.value, label=_clip(name), color=color_for(label.value),
                                 code=GENERIC_CODE, coded=False,
                                 description=_clip(f"no anatomy code known for label {name!r}"))
    return SegmentDefinition(value=label.value, label=_clip(name), color=color_for(label.value), code=code)


def select_labels(rule: RuleChoice, labels: Sequence[LabelLike]) -> tuple[LabelLike, ...]:
    """The model's labels the rule chooses (``rule.labels``: names or values; None: all), in the model's
    order. A name matches whatever the case and separators (``Kidney_Left`` = ``kidney left``); a value is
    an integer. Raises ValueError naming the rule, the label and the model's labels when a choice matches
    none, or two choices the same label.

    >>> from model.adapters.base import Label
    >>> labels = [Label(1, "liver"), Label(2, "spleen")]
    >>> [lab.name for lab in select_labels(RuleOf("r", ("Spleen",)), labels)]
    ['spleen']
    >>> select_labels(RuleOf("r", ("kidney",)), labels)
    Traceback (most recent call last):
    ...
    ValueError: rule 'r' sends label 'kidney', which the model does not have (its labels: 1=liver, 2=spleen)
    """
    values = [lab.value for lab in labels]
    if len(set(values)) != len(values) or any(v < 1 for v in values):
        raise ValueError(f"the model's label values must be distinct and >= 1, got {values}")
    if rule.labels is None:
        return tuple(labels)
    by_name: dict[str, list[LabelLike]] = {}
    for lab in labels:
        by_name.setdefault(normalise_name(lab.name), []).append(lab)
    chosen: dict[int, LabelLike] = {}
    known = ", ".join(f"{lab.value}={lab.name}" for lab in labels) or "none"
    for wanted in rule.labels:
        if isinstance(wanted, int):
            found = [lab for lab in labels if lab.value == wanted]
        else:
            found = by_name.get(normalise_name(wanted), [])
        if len(found) != 1:
            why = "which the model does not have" if not found else "which names several of the model's labels"
            raise ValueError(f"rule {rule.name!r} sends label {wanted!r}, {why} (its labels: {known})")
        if found[0].value in chosen:
            raise ValueError(f"rule {rule.name!r} chooses label {found[0].value}={found[0].name!r} twice")
        chosen[found[0].value] = found[0]
    return tuple(lab for lab in labels if lab.value in chosen)


def validate_rule_labels(rule: RuleChoice, labels: Sequence[LabelLike], *, codes: CodeMapping | None = None,
                         segment: SegmentDefinition | None = None) -> None:
    """Start-up check of one rule against its model's labels and code mapping: raises ValueError naming
    the rule and the label (see :func:`select_labels`) when the rule chooses a label the model does not
    have, and naming the label when a chosen label's name or code cannot be written into a SEG."""
    segments_for(rule, labels, codes=codes, segment=segment)


def segments_for(rule: RuleChoice, labels: Sequence[LabelLike], *, codes: CodeMapping | None = None,
                 segment: SegmentDefinition | None = None) -> tuple[SegmentDefinition, ...]:
    """The SEG's segments for a model with ``labels`` under ``rule`` (see the module docstring): the model's
    own ``segment`` (a settings model's description, ``ModelSpec.segment``) for a one-label model whose rule
    chooses nothing, else one per chosen label, described by the model's names and ``codes`` (the
    registration's mapping, over :data:`worker.anatomy.DEFAULT_ANATOMY`).

    >>> from model.adapters.base import Label
    >>> [s.label for s in segments_for(RuleOf("r"), [Label(1, "foreground")], segment=PHANTOM_SEGMENT)]
    ['Phantom organ']
    >>> [(s.label, s.code.type[2]) for s in segments_for(RuleOf("r"), [Label(1, "liver")])]
    [('liver', 'Liver')]
    """
    chosen = select_labels(rule, labels)
    if segment is not None and len(labels) == 1 and rule.labels is None:
        return (replace(segment, value=labels[0].value),)
    if not chosen:
        raise ValueError(f"rule {rule.name!r} chooses no label of its model")
    return tuple(_describe(lab, codes) for lab in chosen)


@dataclass(frozen=True)
class RuleOf:
    """A :class:`RuleChoice` from plain values (a rule's name and its choice of labels).

    >>> from model.adapters.base import Label
    >>> [lab.name for lab in select_labels(RuleOf("r", ("Spleen",)), [Label(1, "liver"), Label(2, "spleen")])]
    ['spleen']
    """

    name: str
    labels: tuple[str | int, ...] | None = None


def _label_dtype(segments: Sequence[SegmentDefinition]) -> type[np.unsignedinteger[Any]]:
    return np.uint8 if max(s.value for s in segments) <= 255 else np.uint16


def review_arrays(label_map: np.ndarray, segments: Sequence[SegmentDefinition]) -> dict[str, np.ndarray]:
    """What the review app draws a multi-label result from, as arrays for the probability ``.npz`` (read
    by ``store.results.read_probability``):

    - ``labels``: (z, y, x) ``uint8`` (``uint16`` past 255), the label map with only the segments' values
      kept (a label the rule did not send is not shown either);
    - ``label_values``: (n,) ``uint16``, the segments' label values, in segment order;
    - ``label_names``: (n,) unicode, their Segment Labels;
    - ``label_colors``: (n, 3) ``uint8``, their RGB colours.
    """
    if not segments:
        raise ValueError("review_arrays needs at least one segment")
    lut = np.zeros(max(int(label_map.max(initial=0)), max(s.value for s in segments)) + 1, dtype=_label_dtype(segments))
    for s in segments:
        lut[s.value] = s.value
    keep_all = label_map.dtype == lut.dtype and np.array_equal(lut, np.arange(lut.size))
    return {
        "labels": label_map if keep_all else lut[label_map],  # every value shown: the map itself, no copy
        "label_values": np.array([s.value for s in segments], dtype=np.uint16),
        "label_names": np.array([s.label for s in segments], dtype=np.str_),
        "label_colors": np.array([s.color for s in segments], dtype=np.uint8).reshape(len(segments), 3),
    }


def segments_evidence(segments: Sequence[SegmentDefinition], label_map: np.ndarray,
                      spacing: Sequence[float]) -> list[dict[str, Any]]:
    """The segments as JSON for the job's evidence file: segment number, label value, name, RGB colour,
    codes, whether coded, voxels and volume in mL (voxels times the (z, y, x) ``spacing`` in mm)."""
    counts = np.bincount(np.asarray(label_map).ravel(), minlength=max(s.value for s in segments) + 1)
    voxel_ml = float(np.prod([float(v) for v in spacing])) / 1000.0
    return [{"segment_number": i, "value": s.value, "name": s.label, "description": s.description,
             "color": list(s.color),
             "category": list(s.code.category), "type": list(s.code.type),
             "modifier": list(s.code.modifier) if s.code.modifier else None, "coded": s.coded,
             "voxels": int(counts[s.value]), "volume_ml": round(int(counts[s.value]) * voxel_ml, 6)}
            for i, s in enumerate(segments, start=1)]


def segments_from_evidence(records: Sequence[Mapping[str, Any]]) -> tuple[SegmentDefinition, ...]:
    """The segments a job was written with, from its evidence (:func:`segments_evidence`), in segment order:
    what an approval re-encodes, whatever the configuration says now. Raises ValueError naming the record
    that is not one."""
    out = []
    for i, r in enumerate(records, start=1):
        try:
            if int(r["segment_number"]) != i:
                raise ValueError(f"segment_number {r['segment_number']!r} is not {i}")
            modifier = r.get("modifier")
            code = AnatomyCode(type=tuple(r["type"]), category=tuple(r["category"]),  # type: ignore[arg-type]
                               modifier=tuple(modifier) if modifier else None)  # type: ignore[arg-type]
            out.append(SegmentDefinition(value=int(r["value"]), label=str(r["name"]),
                                         color=tuple(int(c) for c in r["color"]),  # type: ignore[arg-type]
                                         code=code, coded=bool(r.get("coded", True)),
                                         description=r.get("description")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"evidence segment {i} is not a segment record ({exc}): {dict(r)!r}") from exc
    if not out:
        raise ValueError("the evidence lists no segments")
    return tuple(out)
