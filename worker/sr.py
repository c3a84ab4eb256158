"""The OOD gate's evidence for one SEG, as a DICOM Structured Report that travels with it.

:func:`encode_sr` makes a Comprehensive 3D SR (highdicom) with a TID 1500 Measurement Report, so that a
PACS or a research query finds every AI result and its evidence without specgate's database:

- Observation context (TID 1001): the model as the device observer (TID 1004: name, manufacturer,
  "NAME VERSION" as model name, a UID derived from name, version and weights); the approving radiologist,
  if any, as the person observer (TID 1003).
- Image library (TID 1600): every source image (single-frame series; an enhanced multi-frame source
  is referenced by its series and in the evidence).
- One volumetric ROI measurement group (TID 1411) per segment of the SEG, in segment order: it references
  the SEG segment and, through it, the source series; its tracking identifier is "segment N of LABEL"; its
  finding type and category are the segment's (a segment coded with a laterality modifier also gets a
  finding site, TID 1419, with that laterality); its algorithm (TID 4019) is the model's name and
  version, with ``weights_sha256=<hex>`` as algorithm parameter. Each group has the segment's volume:
  NUM (118565006, SCT, "Volume") in ``cm3`` (UCUM "cubic centimeter", CID 7181: 1 cm3 = 1 mL), counted
  from the SEG's own frames (voxels of the segment times the source voxel volume), so it is 0 for a
  segment the model did not find. The gate's evidence is about the whole study, not one organ: it is
  given once, in the group of segment 1 (so a query finds one OODM per SR):

  ========================  ==============================================  ======================
  item                      concept name                                    value
  ========================  ==============================================  ======================
  NUM                       (OODM, 99SPECGATE, "Out-of-distribution         OODM, unit ``1``
                            measure")
  NUM                       (OODTAU, 99SPECGATE, "OOD threshold tau")       tau, unit ``1``
  NUM (when known)          (OODC, 99SPECGATE, "OOD calibration constant")  C, unit ``1``
  CODE                      (OODVERDICT, 99SPECGATE, "OOD gate verdict")    INDIST / OOD / NOBANK
  CODE                      (RELEASE, 99SPECGATE, "Release decision")       GATE / APPROVED; for an
                                                                            approval its Observation
                                                                            DateTime is when
  ========================  ==============================================  ======================

- A model not for clinical use: a TEXT item (121106, DCM, "Comment") "NOT FOR CLINICAL USE" at the root,
  and the Series Description's prefix (Image Comments is not part of the SR IODs).
- An approved result is also *verified* (Verification Flag VERIFIED, the radiologist as Verifying
  Observer, Verification DateTime the approval's time); a result the gate released is UNVERIFIED.

Private codes (coding scheme designator ``99SPECGATE``) are used only where DICOM and SNOMED CT have no
concept: the OOD score, its threshold and constant, the gate's verdict and the release decision. The
procedure reported is (363679005, SCT, "Imaging procedure"); units are UCUM ``1`` (no units).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

from dicom_series import Volume
from worker.dicom_seg import DEFAULT_SOFTWARE_VERSION, derive_uid
from worker.labels import NOT_FOR_CLINICAL_USE, GateEvidence, ModelIdentity, Release, series_description

__all__ = ["encode_sr", "segment_voxels", "OODM", "OOD_TAU", "OOD_C", "OOD_VERDICT", "RELEASE_DECISION", "VERDICTS",
           "DECISIONS", "VOLUME", "CUBIC_CENTIMETER"]

_SCHEME = "99SPECGATE"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


OODM = _private("OODM", "Out-of-distribution measure")
OOD_TAU = _private("OODTAU", "OOD threshold tau")
OOD_C = _private("OODC", "OOD calibration constant")
OOD_VERDICT = _private("OODVERDICT", "OOD gate verdict")
RELEASE_DECISION = _private("RELEASE", "Release decision")
VERDICTS = {
    "in": _private("INDIST", "In distribution"),
    "ood": _private("OOD", "Out of distribution"),
    "nobank": _private("NOBANK", "Modality not in the gate's bank"),
}
DECISIONS = {
    "gate": _private("GATE", "Released by the OOD gate"),
    "approved": _private("APPROVED", "Approved by a radiologist"),
}
VOLUME = CodedConcept.from_code(codes.SCT.Volume)
CUBIC_CENTIMETER = CodedConcept.from_code(codes.UCUM.CubicCentimeter)
_NO_UNITS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
_IMAGING_PROCEDURE = CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging procedure")
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_COMMENT = CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")


def encode_sr(
    volume: Volume,
    seg: Dataset,
    *,
    model: ModelIdentity,
    evidence: GateEvidence,
    release: Release,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9002,
    manufacturer: str = "specgate",
    software_version: str = DEFAULT_SOFTWARE_VERSION,
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) with the gate's evidence for ``seg`` (made by :func:`worker.dicom_seg.
    encode_seg` over ``volume``), in the source's study, in its own series. See the module docstring for
    its content."""
    if seg.StudyInstanceUID != volume.study_instance_uid:
        raise ValueError(f"SEG study {seg.StudyInstanceUID} is not the volume's study {volume.study_instance_uid}")
    if seg.SOPClassUID != _SEGMENTATION_STORAGE:
        raise ValueError(f"not a SEG: SOP class {seg.SOPClassUID}")
    voxel_cm3 = float(np.prod([float(v) for v in volume.spacing])) / 1000.0
    voxels = segment_voxels(seg)
    groups = [_measurement_group(seg, segment, volume.series_instance_uid, model, voxels[int(segment.SegmentNumber)]
                                 * voxel_cm3, evidence if k == 0 else None, release)
              for k, segment in enumerate(seg.SegmentSequence)]

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model, release),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
        # highdicom's image library entry reads the top-level geometry of single-frame images only; an
        # enhanced multi-frame source is referenced by its series (and in the evidence) alone
        referenced_images=None if volume.is_multiframe else list(volume.headers),
    )
    if not model.clinical_use:
        report[0].ContentSequence.append(hd.sr.TextContentItem(
            name=_COMMENT, value=NOT_FOR_CLINICAL_USE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))

    approved = release.how == "approved"
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.headers],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=approved,
        verifying_observer_name=release.reviewer_pn if approved else None,
        verifying_organization="specgate review" if approved else None,
        software_versions=software_version,
    )
    if approved and release.decided_at is not None:
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(release.decided_at)
    sr.SeriesDescription = series_description("Gate evidence", model, release)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Dataset:
    """The private coding scheme declared, as PS3.3 C.12.1.1.8 asks of a scheme not in PS3.16."""
    item = Dataset()
    item.CodingSchemeDesignator = _SCHEME
    item.CodingSchemeName = "specgate OOD gate concepts"
    item.CodingSchemeResponsibleOrganization = "specgate"
    return item


def _observation_context(model: ModelIdentity, release: Release) -> hd.sr.ObservationContext:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("specgate-model", model.name, model.version, model.weights_sha256),
            name=model.name,
            manufacturer_name="specgate",
            model_name=f"{model.name} {model.version}",
        ),
    )
    person = None
    if release.reviewer_pn is not None:
        person = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=release.reviewer_pn),
        )
    return hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)


def _verdict(evidence: GateEvidence) -> CodedConcept:
    if not evidence.is_ood:
        return VERDICTS["in"]
    return VERDICTS["nobank"] if evidence.gate_reason == "modality_not_in_bank" else VERDICTS["ood"]


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def segment_voxels(seg: Dataset) -> dict[int, int]:
    """Voxels of each segment of a BINARY SEG (segment number -> count; 0 for a segment with no frame),
    counted from its bit-packed Pixel Data, frame by frame, with each frame's segment number from its
    Segment Identification (per frame, or shared when the SEG has one segment)."""
    if seg.SegmentationType != "BINARY":
        raise ValueError(f"only a BINARY SEG's voxels are counted here, got {seg.SegmentationType!r}")
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    counts = dict.fromkeys(numbers, 0)
    n_frames, pixels = int(seg.NumberOfFrames), int(seg.Rows) * int(seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    data = np.frombuffer(seg.PixelData, dtype=np.uint8)
    if pixels % 8 == 0:  # every frame starts on a byte: count set bits per frame's bytes
        per_frame = _POPCOUNT[data[: n_frames * pixels // 8]].reshape(n_frames, -1).sum(axis=1, dtype=np.int64)
    else:
        bits = np.unpackbits(data, bitorder="little", count=n_frames * pixels)
        per_frame = bits.reshape(n_frames, pixels).sum(axis=1, dtype=np.int64)
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = item.get("SegmentIdentificationSequence") or shared
        counts[int(ident[0].ReferencedSegmentNumber)] += int(per_frame[i])
    return counts


def _measurement_group(seg: Dataset, segment: Dataset, source_series_uid: str, model: ModelIdentity,
                       volume_cm3: float, evidence: GateEvidence | None,
                       release: Release) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """Segment ``segment``'s group: its volume, and the gate's evidence when ``evidence`` is given."""
    number = int(segment.SegmentNumber)
    measurements = [hd.sr.Measurement(name=VOLUME, value=round(volume_cm3, 6), unit=CUBIC_CENTIMETER)]
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if evidence is not None:
        measurements += [hd.sr.Measurement(name=OODM, value=evidence.oodm, unit=_NO_UNITS),
                         hd.sr.Measurement(name=OOD_TAU, value=evidence.tau, unit=_NO_UNITS)]
        if evidence.c is not None:
            measurements.append(hd.sr.Measurement(name=OOD_C, value=evidence.c, unit=_NO_UNITS))
        decision = hd.sr.QualitativeEvaluation(name=RELEASE_DECISION, value=DECISIONS[release.how])
        if release.decided_at is not None:
            decision[0].ObservationDateTime = DT(release.decided_at)
        evaluations = [hd.sr.QualitativeEvaluation(name=OOD_VERDICT, value=_verdict(evidence)), decision]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    finding_sites: Sequence[hd.sr.FindingSite] | None = None
    if "SegmentedPropertyTypeModifierCodeSequence" in kind:
        finding_sites = [hd.sr.FindingSite(
            anatomic_location=_plain(kind),
            laterality=_plain(kind.SegmentedPropertyTypeModifierCodeSequence[0]))]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid("specgate-tracking", seg.SOPInstanceUID, str(number)),
            identifier=f"segment {number} of {segment.SegmentLabel}"[:64],
        ),
        # highdicom's ReferencedSegment.from_segmentation looks for per-frame segment identification, which
        # a one-segment SEG keeps in the shared functional groups: reference segment and source series directly
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        ),
        finding_type=_plain(kind),
        finding_category=CodedConcept.from_dataset(segment.SegmentedPropertyCategoryCodeSequence[0]),
        finding_sites=finding_sites,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, parameters=[f"weights_sha256={model.weights_sha256}"]),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _plain(item: Dataset) -> CodedConcept:
    """A code item's value, scheme and meaning only (a SEG's type item may carry its modifier inside)."""
    return CodedConcept(value=item.CodeValue, scheme_designator=item.CodingSchemeDesignator,
                        meaning=item.CodeMeaning)
