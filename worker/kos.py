"""Withdrawing a result that was already sent: an IHE IOCM rejection note (a Key Object Selection document).

IHE Imaging Object Change Management (RAD TF-1 §39) withdraws instances from a PACS with a KOS, in the
same study as what it rejects and in its own series, whose document title says why:

- (113001, DCM, "Rejected for Quality Reasons"): the result is wrong (a radiologist retracts it), or a
  newer version of the study supersedes it;
- (113037, DCM, "Rejected for Patient Safety Reasons"): it must not be used (e.g. the wrong patient).

:func:`encode_kos` references exactly the objects given (the SEG and its SR), with the retracting user,
if any, as person observer (TID 1002) and a Key Object Description (113012, DCM) in words. If any of the
rejected objects is marked "NOT FOR CLINICAL USE" (Image Comments or Series Description), the KOS says
so too, in its description and Series Description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from worker.dicom_seg import DEFAULT_SOFTWARE_VERSION
from worker.labels import NOT_FOR_CLINICAL_USE, person_name, readable_name

__all__ = ["encode_kos", "REJECTION_TITLES"]

REJECTION_TITLES = {
    "quality": CodedConcept(value="113001", scheme_designator="DCM", meaning="Rejected for Quality Reasons"),
    "patient_safety": CodedConcept(value="113037", scheme_designator="DCM",
                                   meaning="Rejected for Patient Safety Reasons"),
}
_LO_MAX = 64


def encode_kos(
    objects: Sequence[Dataset],
    *,
    reason: Literal["quality", "patient_safety"],
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9003,
    retracted_by: str | None = None,
    manufacturer: str = "specgate",
    software_version: str = DEFAULT_SOFTWARE_VERSION,
) -> Dataset:
    """An IOCM rejection note (KOS) for ``objects`` (datasets or their headers: SOP class and instance,
    series and study UIDs, and the patient/study attributes), all of one study."""
    if reason not in REJECTION_TITLES:
        raise ValueError(f"reason must be one of {sorted(REJECTION_TITLES)}, got {reason!r}")
    if not objects:
        raise ValueError("a rejection note needs at least one object to reject, got none")
    studies = {ds.StudyInstanceUID for ds in objects}
    if len(studies) != 1:
        raise ValueError(f"the rejected objects must be of one study, got {sorted(studies)}")
    uids = [ds.SOPInstanceUID for ds in objects]
    if len(set(uids)) != len(uids):
        raise ValueError(f"an object is given twice: {uids}")
    if retracted_by is not None and (not retracted_by.strip() or "\\" in retracted_by or "=" in retracted_by):
        raise ValueError(f"retracted_by must be a person's name (a DICOM PN), got {retracted_by!r}")

    marked = any(_marked(ds) for ds in objects)
    what = "AI result"
    who = f" by {readable_name(retracted_by)}" if retracted_by else ""
    words = f"{REJECTION_TITLES[reason].meaning}: {what} retracted{who}"
    observer = None
    if retracted_by is not None:
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=person_name(retracted_by)),
        )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTION_TITLES[reason],
        referenced_objects=list(objects),
        observer_person_context=observer,
        description=f"{words}. {NOT_FOR_CLINICAL_USE}." if marked else f"{words}.",
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(objects), content=content, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=manufacturer, software_versions=software_version,
    )
    prefix = f"{NOT_FOR_CLINICAL_USE}: " if marked else ""
    description = prefix + f"Rejected ({reason.replace('_', ' ')}): {what}{who}"
    kos.SeriesDescription = description if len(description) <= _LO_MAX else description[: _LO_MAX - 3] + "..."
    return kos


def _marked(ds: Dataset) -> bool:
    return (NOT_FOR_CLINICAL_USE in str(ds.get("ImageComments", ""))
            or str(ds.get("SeriesDescription", "")).startswith(NOT_FOR_CLINICAL_USE))
