"""One export: the selected studies' images and SEGs de-identified, NIfTI volumes and labels in the
layout ``specgate model train`` and ``fit-ood`` read, a manifest, and an audit row.

The folder it writes::

    DIR/manifest.json                         every case: new UIDs, pseudonym, state, reviews, model, OODM
    DIR/CT/dataset.json                       one dataset per modality, MSD and nnU-Net v2 keys at once
    DIR/CT/imagesTr/case_0001_0000.nii.gz     the series (stored values rescaled: HU for CT)
    DIR/CT/labelsTr/case_0001.nii.gz          the SEG's segments as a label map (dataset.json names them)
    DIR/dicom/case_0001/image/<uid>.dcm       the series, de-identified (PS3.15 Annex E)
    DIR/dicom/case_0001/seg.dcm               the specgate SEG, de-identified, its references remapped

The NIfTI files are made from the de-identified DICOM (the labels through the SEG's references to the new
SOP Instance UIDs), so a reference the remapping broke stops the export. Which ledger job became which
case is in the audit row only (``export`` event: job ids in case order), not in the folder. Nothing is
written under ``DIR`` until every case is done: the export is made beside it and renamed into place in
the transaction that appends the audit row; a failure leaves no folder and an ``export_refused`` row.
A study with an image marked Burned In Annotation ``YES`` is left out (its pixels may show a name the
profile cannot reach); the audit row lists it under ``left_out``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import session_scope
from store import Store, StoreError

from .confidentiality import ANNEX_E_EDITION, Profile, deidentify
from .selection import Criteria, Selected, select_jobs

__all__ = ["ExportError", "ExportSummary", "nifti_affine", "run_export"]

#: the fixed list a rejection picks from (review app); a CLI rejection's free text is "other"
_REASON = re.compile(r"^(?P<code>[a-z_]+)(?::\s*(?P<note>.*))?$", re.DOTALL)


class _Skipped(Exception):
    """This study is left out of the export (the others go on); ``reason`` says why, without patient data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExportError(Exception):
    """The export cannot be made (nothing selected, a file missing from the store, a reference broken);
    the message says which job and why, and names no patient."""


@dataclass
class ExportSummary:
    out: Path
    cases: list[dict[str, Any]] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"job": id, "reason": text}
    audit_id: int | None = None
    export_id: str = ""


def nifti_affine(volume_affine: np.ndarray) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume stored as (x, y, z) from :attr:`dicom_series.Volume.affine`
    ((z, y, x) index to LPS mm).

    An axial series (rows along x, columns along y, slices along z), 0.7 x 0.5 mm pixels, 2 mm slices:

    >>> a = np.array([[0, 0, 0.7, 1], [0, 0.5, 0, 2], [2.0, 0, 0, 3], [0, 0, 0, 1]])
    >>> nifti_affine(a).tolist()
    [[-0.7, 0.0, 0.0, -1.0], [0.0, -0.5, 0.0, -2.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
    """
    out = np.asarray(volume_affine, np.float64)[:, [2, 1, 0, 3]].copy()
    out[:2, :] *= -1
    return out + 0.0  # no negative zeros


def _reviews(selected: Selected, include_notes: bool) -> list[dict[str, Any]]:
    from review.queries import REJECT_REASONS

    out = []
    for r in selected.reviews:
        item: dict[str, Any] = {"decision": r.decision}
        if r.reason:
            m = _REASON.match(r.reason.strip())
            listed = m is not None and m.group("code") in REJECT_REASONS
            item["reason_code"] = m.group("code") if m is not None and listed else "other"
            note = (m.group("note") if m is not None and listed else r.reason) or None
            if include_notes and note:
                item["note"] = note.strip()
        out.append(item)
    return out


def _write_dicom(ds: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _export_case(store: Store, selected: Selected, case: str, root: Path, profile: Profile) -> dict[str, Any]:
    import highdicom as hd
    import nibabel as nib
    from pydicom import dcmread

    from dicom_series import load_series

    where = f"job {selected.job_id}"
    image_dir = root / "dicom" / case / "image"
    new_sops: set[str] = set()
    study = frame = series = patient = None
    try:
        for key, sha in selected.instances:
            source = dcmread(store.verified_path(key, sha))
            if str(source.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
                # the basic profile removes identity from the header; text burned into the pixels it cannot
                raise _Skipped("an image has burned-in annotation (BurnedInAnnotation YES)")
            ds = deidentify(source, profile)
            new_sops.add(str(ds.SOPInstanceUID))
            study, frame, series, patient = (str(ds.StudyInstanceUID), str(ds.get("FrameOfReferenceUID", "")),
                                             str(ds.SeriesInstanceUID), str(ds.PatientID))
            _write_dicom(ds, image_dir / f"{ds.SOPInstanceUID}.dcm")
        seg_ds = deidentify(dcmread(store.path(selected.seg_key, fresh=True)), profile)
    except StoreError as exc:
        raise ExportError(f"{where}: a file cannot be read from the store: {exc}") from exc
    if not new_sops:
        raise ExportError(f"{where}: its series has no instances in the ledger")
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg_ds.get("ReferencedSeriesSequence", [])
            for i in s.ReferencedInstanceSequence}
    if (str(seg_ds.StudyInstanceUID) != study or str(seg_ds.FrameOfReferenceUID) != frame
            or not refs or not refs <= new_sops
            or {str(s.SeriesInstanceUID) for s in seg_ds.ReferencedSeriesSequence} != {series}):
        raise ExportError(f"{where}: the de-identified SEG does not reference the de-identified images")
    _write_dicom(seg_ds, root / "dicom" / case / "seg.dcm")

    volume = load_series(sorted(image_dir.iterdir()), compact=True)
    seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=False)
    if volume.is_multiframe:  # one Enhanced CT/MR instance: the SEG's frames reference its frames
        pixels = seg.get_pixels_by_source_frame(volume.slices[0].sop_instance_uid,
                                                [int(ref.frame_number or 0) for ref in volume.slices],
                                                assert_missing_frames_are_empty=True)
    else:
        pixels = seg.get_pixels_by_source_instance([ref.sop_instance_uid for ref in volume.slices],
                                                   assert_missing_frames_are_empty=True)
    numbers = [int(s.SegmentNumber) for s in seg_ds.SegmentSequence]
    names = [str(s.SegmentLabel) for s in seg_ds.SegmentSequence]
    label = np.zeros(volume.shape, _label_dtype(len(numbers)))
    for k in range(len(numbers)):
        label[pixels[..., k] > 0] = k + 1  # renumbered to the dataset's labels when the dataset is written
    del pixels
    affine = nifti_affine(volume.affine)
    mod = volume.modality
    img_rel = f"{mod}/imagesTr/{case}_0000.nii.gz"
    lab_rel = f"{mod}/labelsTr/{case}.nii.gz"
    for rel in (img_rel, lab_rel):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), affine), str(root / img_rel))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(label.transpose(2, 1, 0)), affine), str(root / lab_rel))
    return {
        "case": case, "modality": mod, "patient": patient, "study_instance_uid": study,
        "series_instance_uid": series, "seg_sop_instance_uid": str(seg_ds.SOPInstanceUID),
        "frame_of_reference_uid": frame, "instances": len(new_sops), "shape": list(volume.shape),
        "spacing_mm": [round(float(s), 6) for s in volume.spacing], "segments": names,
        "image": img_rel, "label": lab_rel, "dicom": f"dicom/{case}",
    }


def _label_dtype(top: int) -> type[np.unsignedinteger[Any]]:
    return np.uint8 if top <= 255 else np.uint16


def _write_datasets(root: Path, cases: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per modality: labels by name (one value per segment label across its cases), a case's label map
    (written with its SEG's segment order, 1..n) renumbered to them where they differ (cases of models
    with other labels), and ``dataset.json`` (MSD's ``training``/``modality`` and nnU-Net
    v2's ``channel_names``/``file_ending``/``labels`` name -> value, both of which
    :func:`model.data.volumes.declared_label_names` reads)."""
    import nibabel as nib

    out: dict[str, dict[str, int]] = {}
    for mod in sorted({c["modality"] for c in cases}):
        mine = [c for c in cases if c["modality"] == mod]
        values: dict[str, int] = {}
        for c in mine:
            for name in c["segments"]:
                values.setdefault(name, len(values) + 1)
        for c in mine:
            lut = np.array([0, *(values[name] for name in c["segments"])], _label_dtype(len(values)))
            if not np.array_equal(lut, np.arange(len(lut))) or lut.dtype != _label_dtype(len(c["segments"])):
                img = nib.Nifti1Image.from_filename(str(root / c["label"]))
                nib.save(nib.Nifti1Image(lut[np.asarray(img.dataobj)], img.affine), str(root / c["label"]))
            c["labels"] = {name: values[name] for name in c["segments"]}
        meta = {
            "name": f"specgate-export-{mod}", "description": "specgate export, de-identified (PS3.15 Annex E)",
            "tensorImageSize": "3D", "modality": {"0": mod}, "channel_names": {"0": mod},
            "labels": {"background": 0, **values}, "numTraining": len(mine), "numTest": 0,
            "file_ending": ".nii.gz",
            "training": [{"image": "./" + c["image"].split("/", 1)[1], "label": "./" + c["label"].split("/", 1)[1]}
                         for c in mine],
            "test": [],
        }
        (root / mod / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        out[mod] = values
    return out


def _refuse(sessions: sessionmaker[Session], actor: str, details: Mapping[str, Any], reason: str) -> None:
    with session_scope(sessions) as s:
        audit.append(s, actor=actor, action="export_refused", object_type="export", object_id="-",
                     details={**details, "reason": reason[:500]})


def run_export(sessions: sessionmaker[Session], store: Store, out: Path, criteria: Criteria, profile: Profile, *,
               actor: str, key_source: str, include_notes: bool = False,
               progress: Callable[[str], None] | None = None) -> ExportSummary:
    """Export what ``criteria`` select to ``out`` (a folder that must not exist, or be empty).

    ``key_source`` says, for the manifest and the audit row, where the pseudonymisation key came from
    (``random``: drawn for this export and not kept; ``file``: the site's key file)."""
    out = Path(out)
    request = {"kinds": sorted(criteria.kinds), "since": criteria.since.isoformat(),
               "until": criteria.until.isoformat() if criteria.until else None, "model": criteria.model,
               "dates": profile.dates, "key": key_source, "notes": include_notes, "to": str(out)}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _refuse(sessions, actor, request, "the target exists and is not an empty folder")
        raise ExportError(f"{out} exists and is not an empty folder: give a new one")
    with sessions() as s:
        selected = select_jobs(s, criteria)
    if not selected:
        _refuse(sessions, actor, request, "no study matches")
        raise ExportError("no study matches: nothing exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_id = secrets.token_hex(8)  # the manifest's and the audit row's: which row tells which job a case was
    work = out.parent / f".{out.name}.partial-{export_id}"
    work.mkdir()
    summary = ExportSummary(out=out)
    renamed = False
    current: int | None = None  # the job being exported, for a failure's message
    try:
        cases: list[dict[str, Any]] = []
        exported: list[Selected] = []
        for sel in selected:
            current = sel.job_id
            case = f"case_{len(cases) + 1:04d}"
            if progress is not None:
                progress(f"{case}: job {sel.job_id} ({sel.kind}, {len(sel.instances)} images)")
            try:
                c = _export_case(store, sel, case, work, profile)
            except _Skipped as skip:
                shutil.rmtree(work / "dicom" / case, ignore_errors=True)
                summary.skipped.append({"job": sel.job_id, "reason": skip.reason})
                if progress is not None:
                    progress(f"  job {sel.job_id} left out: {skip.reason}")
                continue
            exported.append(sel)
            c.update({"state": sel.kind, "model": sel.model, "model_id": sel.model_id,
                      "weights_sha256": sel.weights_sha256, "oodm": sel.oodm, "tau": sel.tau, "is_ood": sel.is_ood,
                      "bank_percentile": sel.bank_percentile, "reviews": _reviews(sel, include_notes)})
            cases.append(c)
        if not cases:
            raise ExportError("every selected study was left out: " + "; ".join(
                f"job {x['job']}: {x['reason']}" for x in summary.skipped))
        labels = _write_datasets(work, cases)
        manifest = {
            "export_id": export_id,
            "created": datetime.now(UTC).date().isoformat(),
            "profile": {"standard": f"DICOM PS3.15 Annex E ({ANNEX_E_EDITION}), Basic Application Level "
                                    "Confidentiality Profile", "engine": "deid",
                        "options": (["Retain Longitudinal Temporal Information with Modified Dates"]
                                    if profile.dates == "shift" else []),
                        "dates": profile.dates, "clean_descriptors": False, "private_attributes": "removed",
                        "uids": "HMAC-SHA-256 of the original under the export's key, as 2.25.<128 bits>",
                        "key": key_source},
            "selection": {k: request[k] for k in ("kinds", "since", "until", "model")},
            "datasets": {mod: {"folder": mod, "labels": v} for mod, v in labels.items()},
            "cases": cases,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with session_scope(sessions) as s:
            event = audit.append(s, actor=actor, action="export", object_type="export",
                                 object_id=export_id,
                                 details={**request, "jobs": [x.job_id for x in exported],
                                          "studies": [x.study_id for x in exported], "cases": len(cases),
                                          "left_out": summary.skipped})
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(work, out)
            renamed = True
            summary.audit_id, summary.export_id = event.id, export_id
    except BaseException as exc:
        shutil.rmtree(out if renamed else work, ignore_errors=True)  # renamed: the audit row did not commit
        if not isinstance(exc, Exception):
            raise
        where = f"job {current}: " if current is not None else ""
        if isinstance(exc, ExportError):
            recorded, shown = str(exc), exc
        else:  # a library's message may quote a value from the data: the operator sees it, the audit row not
            recorded = f"{where}{type(exc).__name__} (the message was shown to the operator)"
            shown = ExportError(f"{where}export failed: {type(exc).__name__}: {str(exc)[:300]}")
        _refuse(sessions, actor, {**request, "jobs": [x.job_id for x in selected]}, recorded)
        raise shown from exc
    summary.cases, summary.job_ids = cases, [x.job_id for x in exported]
    return summary
