"""A mask or a label map on a loaded series -> a DICOM Segmentation (highdicom), and its atomic write.

:func:`encode_seg` makes a BINARY SEG with one segment per :class:`worker.segments.SegmentDefinition`
(a boolean mask is a label map of one segment, value 1), the algorithm identified
(name, the DCM "Artificial Intelligence" family, version, and the weights' SHA-256 as a parameter), every
source instance referenced, empty frames omitted, and each frame referencing the source slice
(single-frame series) or source frame (multi-frame series) it was drawn on.

What a radiologist sees in the PACS comes from :mod:`worker.labels`: a Series Description naming the
segment(s), the model and how the result was released ("gate" or "approved by NAME"), prefixed
"NOT FOR CLINICAL USE" (and the same in Image Comments) unless the model card says otherwise; the gate's
verdict in Content Label (``GATE_PASS`` / ``GATE_OOD`` / ``GATE_NO_BANK``) and Content Description
(OODM against tau); the approving radiologist as Content Creator's Name. Each segment's label,
description, SNOMED CT category, type and laterality modifier (``SegmentedPropertyTypeModifierCodeSequence``
inside the type's item, PS3.3 C.8.20.2) and recommended display colour (RGB in the definition, CIELab in
the object, converted by ``highdicom.color.CIELabColor.from_rgb``) come from its definition
(:func:`worker.segments.segments_for`: the model's own description of its one segment, or the model's
label names with the anatomy codes; never the rule's, which only chooses the labels).

Segments are numbered 1..n in the definitions' order (consecutive, as PS3.3 C.8.20.2 asks); voxel ``v``
of the label map goes to the segment whose definition has ``value == v``; values no definition names (a
label the rule does not send) are background. A defined label with no voxel is still a segment, with no
frames (highdicom allows it; dcmqi and dciodvfy read it), so a rule's SEGs list the same segments.

The SEG's UIDs come from :func:`derive_uid`, so one (installation, study, job, version) always makes
the same object: a resend after a crash is the same instance, never a second one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName

from dicom_series import LossySource, Volume, lossy_source
from worker.labels import (
    NOT_FOR_CLINICAL_USE,
    GateEvidence,
    ModelIdentity,
    Release,
    content_description,
    content_label,
    series_description,
)
from worker.segments import SegmentDefinition

__all__ = ["derive_uid", "encode_seg", "segment_numbers", "DEFAULT_SOFTWARE_VERSION", "SPECGATE_UUID_NAMESPACE",
           "GateEvidence", "ModelIdentity", "Release", "SegmentDefinition"]

try:  # the installed distribution's version: a metadata lookup, no other work at import
    DEFAULT_SOFTWARE_VERSION = _dist_version("specgate")
except PackageNotFoundError:  # running from a tree that is not installed
    DEFAULT_SOFTWARE_VERSION = "0+unknown"

# Namespace of the name-based UUIDs behind derive_uid. Changing it changes every derived UID: never do.
SPECGATE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:specgate:dicom-uid")

# Type 2 attributes highdicom copies from the first source image; a source without them gets them empty.
_COPIED_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def derive_uid(*parts: str) -> str:
    """A "2.25." UID that depends only on ``parts`` (and where one part ends and the next begins).

    The UUID is name-based (RFC 4122 version 5, in :data:`SPECGATE_UUID_NAMESPACE`), written as an integer
    under the 2.25 arc (ISO/IEC 9834-8, DICOM PS3.5 B.2). ``pydicom.uid.generate_uid(prefix=None,
    entropy_srcs=...)`` is *not* used: with ``prefix=None`` pydicom ignores the entropy and returns a
    random UUID.

    >>> derive_uid("site", "1.2.3", "job-7", "1") == derive_uid("site", "1.2.3", "job-7", "1")
    True
    >>> derive_uid("ab", "c") == derive_uid("a", "bc")
    False
    >>> derive_uid("x").startswith("2.25.")
    True
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"derive_uid parts must be str, got {type(part).__name__}: {part!r}")
    # Length-prefix each part, so ("ab", "c") and ("a", "bc") differ.
    name = "".join(f"{len(p)}:{p};" for p in parts)
    return f"2.25.{uuid.uuid5(SPECGATE_UUID_NAMESPACE, name).int}"


def _code(code: tuple[str, str, str], what: str) -> CodedConcept:
    if len(code) != 3 or not all(isinstance(c, str) and c for c in code):
        raise ValueError(f"{what} must be (value, scheme designator, meaning), got {code!r}")
    value, scheme, meaning = code
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _source_headers(volume: Volume) -> list[Dataset]:
    """The source headers, with empty type 2 attributes added where a source left them out."""
    out = []
    for header in volume.headers:
        missing = [kw for kw in _COPIED_TYPE2 if kw not in header]
        if missing:
            original, header = header, Dataset()
            header.update(original)  # a new element dict: the volume's own header is left as it was
            header.file_meta = original.file_meta
            for kw in missing:
                setattr(header, kw, None)
        out.append(header)
    return out


def encode_seg(
    volume: Volume,
    mask: np.ndarray,
    *,
    segments: Sequence[SegmentDefinition],
    model: ModelIdentity,
    evidence: GateEvidence,
    release: Release,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9001,
    manufacturer: str = "specgate",
    software_version: str = DEFAULT_SOFTWARE_VERSION,
) -> Dataset:
    """A BINARY DICOM-SEG over ``volume``'s source images.

    ``mask``: an integer label map (shape of ``volume.array``, 0 background), or a boolean mask (label
    value 1), written as one segment per definition of ``segments`` (:func:`worker.segments.segments_for`;
    see the module docstring). The algorithm comes from
    ``model``; the Series Description names the segment (or the segments, or their count), the model and
    the release (:func:`worker.labels.series_description`); Content Label and Content Description carry
    the gate's verdict; Content Creator's Name is the approving radiologist, if any. Frames with no
    foreground are omitted; an all-empty result still gives a valid SEG (highdicom then writes every frame,
    empty, since it cannot omit them all). Returns a highdicom ``Segmentation`` (a ``pydicom.Dataset``).
    """
    mask = np.asarray(mask)
    if mask.shape != volume.array.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume's {volume.array.shape}")
    one = mask.dtype == np.bool_ and [s.value for s in segments] == [1]
    pixels = mask if one else segment_numbers(mask, segments)  # a boolean mask is its own segment numbers

    seg = hd.seg.Segmentation(
        source_images=_source_headers(volume),
        pixel_array=_frames_in_source_order(volume, pixels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_describe_segment(number, definition, model)
                              for number, definition in enumerate(segments, start=1)],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name,
        software_versions=software_version,
        device_serial_number="0",
        content_label=content_label(evidence),
        content_description=content_description(evidence),
        content_creator_name=PersonName(release.reviewer_pn) if release.reviewer_pn is not None else None,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description(_what(segments), model, release)
    _mark_lossy(seg, lossy_source(volume.headers))
    if not model.clinical_use:
        seg.ImageComments = NOT_FOR_CLINICAL_USE
    return seg


def _mark_lossy(seg: Dataset, lossy: LossySource | None) -> None:
    """A SEG drawn on lossy compressed images says so (PS3.3 C.7.6.1.1.5): Lossy Image Compression "01"
    with the sources' Method(s) and Ratio(s), from every source instance (highdicom copies the first
    one's attributes only, and not a lossy transfer syntax). Ratio is written only when every method
    has its ratio (the two are paired value by value)."""
    if lossy is None:
        return
    seg.LossyImageCompression = "01"
    if lossy.methods:
        seg.LossyImageCompressionMethod = list(lossy.methods)
    if "LossyImageCompressionRatio" in seg:
        del seg.LossyImageCompressionRatio
    if lossy.ratios and len(lossy.ratios) == len(lossy.methods):
        seg.LossyImageCompressionRatio = list(lossy.ratios)


def _what(segments: Sequence[SegmentDefinition]) -> str:
    """What the Series Description says the SEG holds: the label, the labels if short, or their count."""
    if len(segments) == 1:
        return segments[0].label
    joined = ", ".join(s.label for s in segments)
    return joined if len(joined) <= 24 else f"{len(segments)} segments"


def segment_numbers(label_map: np.ndarray, segments: Sequence[SegmentDefinition]) -> np.ndarray:
    """``label_map`` (integers, 0 background) with each definition's label value replaced by its segment
    number (1..n in ``segments``' order) and every other value by 0; ``uint8``, or ``uint16`` past 255
    segments.

    >>> from worker.anatomy import AnatomyCode
    >>> code = AnatomyCode(("10200004", "SCT", "Liver"))
    >>> defs = [SegmentDefinition(7, "a", (1, 2, 3), code), SegmentDefinition(3, "b", (1, 2, 3), code)]
    >>> segment_numbers(np.array([0, 3, 7, 5]), defs).tolist()
    [0, 2, 1, 0]
    """
    if not segments:
        raise ValueError("a SEG needs at least one segment definition")
    values = [s.value for s in segments]
    if len(set(values)) != len(values):
        raise ValueError(f"two segment definitions share a label value: {values}")
    if label_map.dtype == np.bool_:
        label_map = label_map.view(np.uint8)
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"a label map must hold integers, got dtype {label_map.dtype}")
    low = int(label_map.min(initial=0))
    if low < 0:
        raise ValueError(f"a label map's values must be >= 0, found {low}")
    lut = np.zeros(max(int(label_map.max(initial=0)), max(values)) + 1,
                   dtype=np.uint8 if len(segments) <= 255 else np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    if label_map.dtype == lut.dtype and np.array_equal(lut, np.arange(lut.size)):
        return label_map  # every value is its own segment number (one label, 1): no copy (78 MB for a CT)
    return lut[label_map]


def _describe_segment(number: int, definition: SegmentDefinition,
                      model: ModelIdentity) -> hd.seg.SegmentDescription:
    """Segment ``number``: what it is (coded, described, coloured) and which algorithm drew it, with the
    weights' digest."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        parameters={"weights_sha256": model.weights_sha256},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=definition.label,
        segmented_property_category=_code(definition.code.category, "category_code"),
        segmented_property_type=_code(definition.code.type, "type_code"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*definition.color),
    )
    if definition.code.modifier is not None:
        segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(definition.code.modifier, "type modifier code")]
    if definition.description:
        segment.SegmentDescription = definition.description
    return segment


def _frames_in_source_order(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """The mask's planes in the order highdicom pairs them with the source images."""
    if not volume.is_multiframe:
        return mask  # headers are in z order: plane z of the mask pairs with source image z
    # highdicom pairs plane i of the array with frame i + 1 of the one multi-frame source: put each z
    # slice of the mask at the index of the frame it was drawn on.
    frames = np.zeros_like(mask)
    frame_index = np.array([ref.frame_number - 1 for ref in volume.slices])  # type: ignore[operator]
    frames[frame_index] = mask
    return frames

