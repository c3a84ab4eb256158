"""``specgate export`` on a ledger seeded through the real pipeline (a tiny model; the gate holds every study),
on SQLite and PostgreSQL: one study still held, one rejected, one approved, two of them of one patient.

What is shown: no attribute of PS3.15 Annex E's list (Table E.1-1 as the dicom-anonymizer package ships it,
iterated here against the originals) keeps its original value in any exported image or SEG, and no private
attribute survives; dciodvfy reports no error on any exported file; names, IDs and dates are gone or
shifted as configured (a patient's intervals kept); the UIDs agree between the images and the SEG and
differ from the originals, alike under one key and otherwise under another; the NIfTI labels are the
SEG's; ``specgate model fit-ood`` reads the export; the export and its refusals are audited.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_series import load_series
from export.confidentiality import annex_e_actions, annex_e_masks
from ledger import jobs
from ledger.db import session_scope
from ledger.reviews import decide
from ledger.schema import AuditEvent, Instance, Job, Result
from model.data.volumes import MSDDataset, load_nifti
from store import FsStore
from tests.integration.review.helpers import held_job, holding_segmenter

DCIODVFY = shutil.which("dciodvfy")

#: what a scanner and a RIS put in a CT image beyond what the synthetic series carries: every one is on
#: Annex E's list (keyword -> value), plus a private attribute and an overlay comment (60xx repeating group)
PHI: dict[str, Any] = {
    "PatientBirthDate": "19610412", "PatientBirthTime": "071500", "PatientAge": "063Y", "PatientSize": "1.72",
    "PatientWeight": "81", "PatientAddress": "12 ELM STREET^SPRINGFIELD", "OtherPatientIDs": "MRN-998877",
    "AdditionalPatientHistory": "Smoker, previous hepatitis", "AccessionNumber": "ACC20250301",
    "InstitutionName": "St Elsewhere General", "InstitutionAddress": "1 Hospital Road",
    "ReferringPhysicianName": "HOUSE^GREGORY", "PerformingPhysicianName": "CUDDY^LISA",
    "OperatorsName": "WILSON^JAMES", "StationName": "CTSCAN07", "DeviceSerialNumber": "SN-4711",
    "StudyID": "S7781", "StudyDescription": "CT ABDOMEN WITH CONTRAST", "InstanceCreationDate": "20250301",
    "InstanceCreationTime": "101112", "AcquisitionDate": "20250301", "AcquisitionTime": "101010.5",
    "AcquisitionDateTime": "20250301101010.5", "ProtocolName": "LIVER 3 PHASE",
    "RequestingPhysician": "CHASE^ROBERT", "SoftwareVersions": "VA48A",
}


def _prepare(study_date: str, study_time: str):
    """Make a written series look like one from a scanner: the attributes above, real dates and times,
    the Type 2 attributes the synthetic writer leaves out (so that dciodvfy judges the export, not them)."""

    def run(paths: list[Path]) -> None:
        for p in paths:
            ds = dcmread(p)
            for kw, value in PHI.items():
                setattr(ds, kw, value)
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
            ds.PatientPosition, ds.AcquisitionNumber = "HFS", "1"
            ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "LO", "DOE^JANE 1961")
            ds.add_new(0x60004000, "LT", "patient DOE moved")
            ds.save_as(p, enforce_file_format=True)

    return run


@pytest.fixture
def seeded(migrated: Any, tmp_path: Path, tiny_model: Any) -> dict[str, Any]:
    """Four held studies through the real pipeline; one rejected, one approved (and sent), one with an
    image marked as having burned-in text."""
    settings, _, sessions = migrated
    held = held_job(migrated, tmp_path, tiny_model, seed=11, patient_name="DOE^JANE", patient_id="PID-JANE",
                    prepare=_prepare("20250301", "101010"))
    rejected = held_job(migrated, tmp_path, tiny_model, seed=12, patient_name="DOE^JANE", patient_id="PID-JANE",
                        prepare=_prepare("20250317", "231500"))
    approved = held_job(migrated, tmp_path, tiny_model, seed=13, patient_name="ROE^RICHARD", patient_id="PID-RICH",
                        prepare=_prepare("20250402", "080000"))
    burned = held_job(migrated, tmp_path, tiny_model, seed=14, patient_name="POE^EDGAR", patient_id="PID-EDGAR",
                      prepare=_burned_in)
    with session_scope(sessions) as s:
        decide(s, rejected, user="anna", decision="reject", reason="segmentation_wrong: DOE^JANE liver missed")
        decide(s, approved, user="anna", decision="approve")
        jobs.transition(s, approved, "sent", actor="test")  # what its delivery does once sent
    return {"held": held, "rejected": rejected, "approved": approved, "burned": burned}


def _burned_in(paths: list[Path]) -> None:
    """One slice marked as carrying burned-in text (a scanner's dose page, a screenshot)."""
    ds = dcmread(paths[3])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(paths[3], enforce_file_format=True)


def _originals(sessions: Any, job_id: int) -> tuple[list[Dataset], Dataset]:
    """The job's source images (as stored) and its SEG, read from the ledger's records."""
    from ledger.schema import Series

    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        paths = s.execute(select(Instance.spool_path).join(Series)
                          .where(Series.series_instance_uid == job.series_instance_uid)).scalars().all()
        seg_key = s.execute(select(Result.seg_path).where(Result.job_id == job_id)).scalar_one()
    return [dcmread(p) for p in paths], seg_key


def _values(ds: Dataset, out: dict[int, list[Any]] | None = None) -> dict[int, list[Any]]:
    """Every element's value anywhere in ``ds`` (nested items included), by tag."""
    out = {} if out is None else out
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _values(item, out)
        else:
            out.setdefault(int(elem.tag), []).append(elem.value)
    return out


def _listed(tag: int) -> bool:
    g, e = tag >> 16, tag & 0xFFFF
    return tag in annex_e_actions() or any((g & gm) == mg and (e & em) == (me & em) for mg, me, gm, em in annex_e_masks())


def _kept_values(original: Dataset, exported: Dataset) -> tuple[int, list[str]]:
    """How many non-empty values of Annex E's list (and private attributes) ``original`` holds, and which
    of them ``exported`` still holds, anywhere."""
    before, after = _values(original), _values(exported)
    checked, kept = 0, []
    for tag, values in before.items():
        if not (_listed(tag) or (tag >> 16) % 2 == 1):
            continue
        for v in values:
            if v in (None, "", b"") or (isinstance(v, list) and not v):
                continue
            checked += 1
            if v in after.get(tag, []):
                kept.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X})={str(v)[:40]}")
    return checked, kept


def _dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY, "dciodvfy is not installed (deploy/dev-services.sh installs dicom3tools)"
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _dt(ds: Dataset, what: str = "Study") -> datetime:
    """``<what>Date`` and ``<what>Time`` as one instant."""
    return datetime.strptime(f"{ds[what + 'Date'].value}{str(ds[what + 'Time'].value)[:6]}", "%Y%m%d%H%M%S")


def test_export_deidentifies_remaps_and_feeds_fit_ood(migrated: Any, seeded: dict[str, Any], cli: Any,
                                                      tmp_path: Path, tiny_model: Any) -> None:
    settings, _, sessions = migrated
    today = datetime.now(UTC).date().isoformat()
    key = tmp_path / "export.key"
    key.write_bytes(b"k" * 48)
    out = tmp_path / "export"
    res = cli("export", "--held", "--rejected", "--approved", "--since", today, "--to", str(out),
              "--user", "alice", "--key-file", str(key))
    assert "exported 3 studies" in res.output and f"left out: job {seeded['burned']}: an image has burned-in" \
        in res.output, res.output
    burned = seeded.pop("burned")
    assert not any(phi in res.output for phi in ("DOE", "ROE", "POE", "PID-")), res.output  # nor in what it prints
    manifest = json.loads((out / "manifest.json").read_text())
    cases = {c["state"]: c for c in manifest["cases"]}
    assert set(cases) == {"held", "rejected", "approved"} and len(manifest["cases"]) == 3
    text = (out / "manifest.json").read_text() + (out / "CT" / "dataset.json").read_text()
    for phi in ("DOE", "JANE", "ROE", "PID-", "MRN", "ACC2025", "Elsewhere", "2025-03", "20250301"):
        assert phi not in text, phi
    assert cases["rejected"]["reviews"] == [{"decision": "reject", "reason_code": "segmentation_wrong"}]
    assert cases["approved"]["reviews"] == [{"decision": "approve"}] and cases["held"]["reviews"] == []
    store = FsStore(settings.data_dir)
    with session_scope(sessions) as s:
        for state, job_id in seeded.items():
            r = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
            assert (cases[state]["oodm"], cases[state]["tau"], cases[state]["is_ood"]) == (r.oodm, r.tau, True)
            assert cases[state]["model"] == "default" and cases[state]["weights_sha256"] == r.weights_sha256
        event = s.execute(select(AuditEvent).where(AuditEvent.action == "export")).scalar_one()
        assert event.actor == "alice" and event.object_type == "export" and event.object_id == manifest["export_id"]
        assert event.details["jobs"] == [seeded["held"], seeded["rejected"], seeded["approved"]]
        assert event.details["key"] == "file" and event.details["dates"] == "shift"
        assert event.details["left_out"] == [{"job": burned, "reason": "an image has burned-in annotation "
                                                                      "(BurnedInAnnotation YES)"}]

    study_times: dict[str, tuple[datetime, datetime]] = {}
    checked_total = 0
    for state, job_id in seeded.items():
        case = cases[state]
        originals, seg_key = _originals(sessions, job_id)
        original_seg = dcmread(store.path(seg_key))
        folder = out / case["dicom"]
        exported = {int(ds.InstanceNumber): ds for ds in (dcmread(p) for p in sorted((folder / "image").iterdir()))}
        assert len(exported) == len(originals) == case["instances"]
        for orig in originals:
            new = exported[int(orig.InstanceNumber)]
            checked, kept = _kept_values(orig, new)
            checked_total += checked
            assert not kept, (state, kept)
            assert new.PatientIdentityRemoved == "YES" and new.LongitudinalTemporalInformationModified == "MODIFIED"
            assert not any(e.tag.is_private for e in new) and (0x6000, 0x4000) not in new
            assert str(new.PatientName) == case["patient"] + "^" and new.PatientID == case["patient"]
            assert new.StudyDate != orig.StudyDate and new.AcquisitionTime != orig.AcquisitionTime
            # the patient's own intervals stay: birth to study, study to acquisition
            assert _dt(orig, "Study") - _dt(orig, "PatientBirth") == _dt(new, "Study") - _dt(new, "PatientBirth")
            assert (datetime.strptime(str(orig.AcquisitionDateTime), "%Y%m%d%H%M%S.%f") - _dt(orig)
                    == datetime.strptime(str(new.AcquisitionDateTime), "%Y%m%d%H%M%S.%f") - _dt(new))
        study_times[state] = (_dt(originals[0]), _dt(next(iter(exported.values()))))
        seg = dcmread(folder / "seg.dcm")
        checked, kept = _kept_values(original_seg, seg)
        checked_total += checked
        assert not kept, (state, "SEG", kept)
        # UIDs: the SEG points at the exported images, never at the originals
        image_uids = {str(ds.SOPInstanceUID) for ds in exported.values()}
        one = next(iter(exported.values()))
        assert image_uids.isdisjoint(str(o.SOPInstanceUID) for o in originals)
        assert seg.StudyInstanceUID == one.StudyInstanceUID == case["study_instance_uid"] != originals[0].StudyInstanceUID
        assert seg.FrameOfReferenceUID == one.FrameOfReferenceUID != originals[0].FrameOfReferenceUID
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [one.SeriesInstanceUID]
        refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        sources = {src.ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
                   for d in f.DerivationImageSequence for src in d.SourceImageSequence}
        assert refs == image_uids and sources <= image_uids and seg.SOPInstanceUID != original_seg.SOPInstanceUID
        for p in [folder / "seg.dcm", *sorted((folder / "image").iterdir())[:4]]:
            assert _dciodvfy_errors(p) == [], p
        # the label map is the SEG's, on the image's grid: compared with the original SEG on the originals
        volume = load_series([Path(o.filename) for o in originals])
        truth = hd.seg.Segmentation.from_dataset(original_seg).get_pixels_by_source_instance(
            [r.sop_instance_uid for r in volume.slices], assert_missing_frames_are_empty=True)[..., 0]
        label, spacing = load_nifti(out / case["label"])
        image, _ = load_nifti(out / case["image"])
        assert label.shape == image.shape == truth.shape and spacing == pytest.approx(volume.spacing)
        assert int(label.sum()) == int((truth > 0).sum())
        assert np.allclose(np.sort(image.ravel()), np.sort(volume.array.ravel()))
    assert checked_total >= 3 * 48 * len(PHI), checked_total  # the check looked at what was put in
    # one patient, two studies: one pseudonym, one offset (the interval between the studies kept)
    assert cases["held"]["patient"] == cases["rejected"]["patient"] != cases["approved"]["patient"]
    assert (study_times["rejected"][0] - study_times["held"][0]) == (study_times["rejected"][1] - study_times["held"][1])
    assert study_times["held"][0] - study_times["held"][1] != study_times["approved"][0] - study_times["approved"][1]

    # the layout train and fit-ood read
    ds = MSDDataset(out / "CT")
    assert len(ds) == 3 and ds.label_names == {1: "Phantom organ"} and ds[0].label is not None
    weights, _ = tiny_model
    bank = tmp_path / "bank.npz"
    res = cli("model", "fit-ood", "--weights", str(weights), "--data", str(out / "CT"), "--out", str(bank),
              "--block", "32", "--overlap", "8", "--device", "cpu")
    assert "bank of 3 signatures (3 images" in res.output, res.output
    res = cli("model", "train", "--dataset", f"retrain={out / 'CT'}", "--out", str(tmp_path / "train"), "--block", "32",
              "--max-iterations", "2", "--eval-every", "1", "--base-features", "4", "--levels", "2", "--device", "cpu")
    assert "retrain: 3 cases" in res.output and (tmp_path / "train" / "best.pt").is_file(), res.output

    # the same key gives the same UIDs and pseudonyms; a random key others; refusals are audited
    again = tmp_path / "again"
    cli("export", "--rejected", "--since", today, "--to", str(again), "--key-file", str(key), "--user", "alice",
        "--include-notes")
    other = tmp_path / "other"
    cli("export", "--rejected", "--since", today, "--to", str(other), "--dates", "remove")
    first = json.loads((again / "manifest.json").read_text())["cases"][0]
    assert {k: first[k] for k in ("study_instance_uid", "patient")} == \
        {k: cases["rejected"][k] for k in ("study_instance_uid", "patient")}
    assert first["reviews"] == [{"decision": "reject", "reason_code": "segmentation_wrong",
                                 "note": "DOE^JANE liver missed"}]  # asked for: the reviewer's words as written
    removed = json.loads((other / "manifest.json").read_text())["cases"][0]
    assert removed["study_instance_uid"] != first["study_instance_uid"] and removed["patient"] != first["patient"]
    some = dcmread(sorted((other / removed["dicom"] / "image").iterdir())[0])
    assert some.LongitudinalTemporalInformationModified == "REMOVED" and not some.StudyDate
    assert some.ContentDate == "19000101" and "PatientBirthDate" not in some or not some.PatientBirthDate
    assert _dciodvfy_errors(other / removed["dicom"] / "seg.dcm") == []
    res = cli("export", "--held", "--since", today, "--to", str(out), expect=1)
    assert "not an empty folder" in res.output
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    res = cli("export", "--held", "--since", tomorrow, "--to", str(tmp_path / "none"), expect=1)
    assert "no study matches" in res.output and not (tmp_path / "none").exists()
    res = cli("export", "--since", today, "--to", str(tmp_path / "x"), expect=2)
    with session_scope(sessions) as s:
        refused = s.execute(select(AuditEvent).where(AuditEvent.action == "export_refused")
                            .order_by(AuditEvent.id)).scalars().all()
        assert [e.details["reason"] for e in refused] == ["the target exists and is not an empty folder",
                                                          "no study matches"]
    # a kept SEG that is no longer DICOM: the export stops naming the job; the audit row names the error's
    # kind only (a library's message may quote the data)
    seg_file = store.path(_originals(sessions, seeded["rejected"])[1])
    seg_file.write_bytes(b"not a DICOM file" * 8)
    res = cli("export", "--rejected", "--since", today, "--to", str(tmp_path / "broken"), expect=1)
    assert f"job {seeded['rejected']}: export failed: InvalidDicomError" in res.output, res.output
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken.partial-*"))
    with session_scope(sessions) as s:
        last = s.execute(select(AuditEvent).order_by(AuditEvent.id.desc())).scalars().first()
        assert last.action == "export_refused" and last.details["reason"] == \
            f"job {seeded['rejected']}: InvalidDicomError (the message was shown to the operator)"
    assert cli("audit", "verify").exit_code == 0


def test_export_from_the_s3_store_on_a_host_without_the_files(migrated: Any, tmp_path: Path, tiny_model: Any,
                                                              s3_server: Any) -> None:
    """A study received by the real SCP, uploaded to S3 (SeaweedFS) and segmented by a worker of its own
    data directory; the export runs on a third host whose data directory is empty: everything comes from
    the store, each instance checked against the SHA-256 the ledger recorded (a corrupted copy stops the
    export, naming the job; nothing is written)."""
    from click.testing import CliRunner

    from dicom_node.uploader import Uploader
    from ledger import jobs
    from ledger.schema import Study
    from specgate.cli import main
    from store import instance_key, open_store
    from tests.integration.test_store_pipeline import _receive, _run, _s3_settings
    from worker.config import PipelineConfig

    base, _, sessions = migrated
    prefix = f"x-{tmp_path.name[-12:]}"
    scp = _s3_settings(base, tmp_path / "scp-host", s3_server, prefix)
    case, series = _receive(scp, sessions, tmp_path)
    assert Uploader(sessions, open_store(scp.store_config(), scp.data_dir), scp.data_dir).run_once() == len(series.paths)
    with session_scope(sessions) as s:
        study = s.execute(select(Study)).scalar_one()
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr").id
    shutil.rmtree(scp.data_dir)
    worker = _s3_settings(base, tmp_path / "worker-host", s3_server, prefix)
    cfg = PipelineConfig(results_dir=worker.results_dir, data_dir=worker.data_dir, store=worker.store_config(),
                         installation="TEST", rules=tuple(worker.rules), heartbeat_s=0.2)
    seg = holding_segmenter(tiny_model, tmp_path, case)
    assert _run(sessions, job_id, cfg, seg, "task-1").state == "held"
    shutil.rmtree(worker.data_dir)

    host = _s3_settings(base, tmp_path / "export-host", s3_server, prefix)
    env = {"SPECGATE_DATA_DIR": str(host.data_dir), "SPECGATE_DATABASE_URL": host.db_url, "SPECGATE_STORE": "s3",
           "SPECGATE_S3_ENDPOINT_URL": s3_server.endpoint_url, "SPECGATE_S3_BUCKET": s3_server.bucket,
           "SPECGATE_S3_ACCESS_KEY": s3_server.access_key, "SPECGATE_S3_SECRET_KEY": s3_server.secret_key,
           "SPECGATE_S3_PREFIX": prefix}
    today = datetime.now(UTC).date().isoformat()

    def export(to: Path):
        return CliRunner().invoke(main, ["export", "--held", "--since", today, "--to", str(to), "--user", "bo"],
                                  env=env, catch_exceptions=False)

    res = export(tmp_path / "out")
    assert res.exit_code == 0 and "exported 1 studies" in res.output, res.output
    exported = [dcmread(p) for p in sorted((tmp_path / "out" / "dicom" / "case_0001" / "image").iterdir())]
    seg = dcmread(tmp_path / "out" / "dicom" / "case_0001" / "seg.dcm")
    assert len(exported) == len(series.paths)
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(ds.SOPInstanceUID) for ds in exported}
    assert seg.StudyInstanceUID == exported[0].StudyInstanceUID != series.study_instance_uid

    # a cached copy that no longer hashes to the ledger's SHA-256: refused, named, audited, nothing written
    with session_scope(sessions) as s:
        key, sha = s.execute(select(Instance.store_key, Instance.sha256).order_by(Instance.id)).first()
    assert key == instance_key(sha)
    cached = open_store(host.store_config(), host.data_dir).path(key, sha)
    cached.write_bytes(b"\0" * 300 + cached.read_bytes()[300:])
    res = export(tmp_path / "again")
    assert res.exit_code == 1 and f"job {job_id}: a file cannot be read from the store" in res.output, res.output
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again.partial-*"))
    with session_scope(sessions) as s:
        refused = s.execute(select(AuditEvent).where(AuditEvent.action == "export_refused")).scalar_one()
        assert refused.actor == "bo" and refused.details["jobs"] == [job_id] and "SHA-256" in refused.details["reason"]


def test_export_of_an_enhanced_multiframe_series(migrated: Any, tmp_path: Path, tiny_model: Any, cli: Any) -> None:
    """One Enhanced CT instance (every slice a frame) through the pipeline and the export: the profile applied
    in its functional group sequences too, the SEG's frames pointing at the new instance's frames, the
    labels equal to the SEG's, and dciodvfy finds no error the source did not already have."""
    from model.data.volumes import Case
    from specgate.synthetic import SyntheticSeries
    from tests.dicom_factory import SeriesSpec
    from tests.dicom_factory import write_series as write_factory_series
    from tests.integration.worker.test_pipeline import _ingest, _run

    settings, _, sessions = migrated
    spec = SeriesSpec(slices=24, rows=48, cols=48, pixel_spacing=(4.0, 4.0), slice_spacing=4.0)
    [path] = write_factory_series(spec, tmp_path / "enhanced", enhanced=True)
    source = dcmread(path)
    for kw, value in PHI.items():
        setattr(source, kw, value)
    source.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    case = Case(name="enhanced", image=volume.array.astype(np.float32), spacing=volume.spacing, modality="CT")
    seg = holding_segmenter(tiny_model, tmp_path, case)
    series = SyntheticSeries(spec.study_instance_uid, spec.series_instance_uid, [path], "CT")
    job_id = _ingest(sessions, series)
    assert _run(settings, sessions, job_id, seg, "task-enh").state == "held"

    out = tmp_path / "export"
    cli("export", "--held", "--since", datetime.now(UTC).date().isoformat(), "--to", str(out))
    [entry] = json.loads((out / "manifest.json").read_text())["cases"]
    [image] = sorted((out / entry["dicom"] / "image").iterdir())
    new, new_seg = dcmread(image), dcmread(out / entry["dicom"] / "seg.dcm")
    checked, kept = _kept_values(dcmread(path), new)
    assert checked >= len(PHI) and not kept, kept
    original_seg = dcmread(FsStore(settings.data_dir).path(_originals(sessions, job_id)[1]))
    assert not _kept_values(original_seg, new_seg)[1]
    frames = {(src.ReferencedSOPInstanceUID, int(src.ReferencedFrameNumber))
              for f in new_seg.PerFrameFunctionalGroupsSequence for d in f.DerivationImageSequence
              for src in d.SourceImageSequence}
    assert {uid for uid, _ in frames} == {new.SOPInstanceUID} and new.SOPInstanceUID != source.SOPInstanceUID
    assert {n for _, n in frames} <= set(range(1, spec.slices + 1))
    truth = hd.seg.Segmentation.from_dataset(original_seg).get_pixels_by_source_frame(
        source.SOPInstanceUID, [int(r.frame_number) for r in volume.slices], assert_missing_frames_are_empty=True)
    label, _ = load_nifti(out / entry["label"])
    assert label.shape == truth.shape[:3] and int(label.sum()) == int((truth > 0).sum()) > 0
    before = set(_dciodvfy_errors(path))
    assert set(_dciodvfy_errors(image)) <= before, set(_dciodvfy_errors(image)) - before
    assert _dciodvfy_errors(out / entry["dicom"] / "seg.dcm") == []
