"""A multi-label result (four segments from a five-label model, the rule sending four) delivered by the real
SCU (``dicom_node.scu.deliver``, C-STORE) to an Orthanc PACS, and read back from Orthanc: the SEG keeps
every segment's name, colour, codes and laterality, and its voxels are the label map's, voxel for voxel;
the SR lists each segment's volume. The result is written straight into a SQLite ledger and its result
folder by tests/integration/review/multilabel.py (no model run)."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.scu import RetryPolicy, deliver
from dicom_series import load_series
from ledger import migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import Result
from specgate.settings import Destination, Settings
from tests.integration.review.multilabel import multilabel_job
from tests.peers import Orthanc
from worker.sr import VOLUME

FAST = RetryPolicy(max_attempts=3, backoff_s=0.5, backoff_max_s=10, timeout_s=10)


def test_a_multi_label_seg_reaches_orthanc_whole(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    try:
        sessions = sessionmaker_for(engine)
        job = multilabel_job(sessions, tmp_path, settings.results_dir)
        with session_scope(sessions) as s:
            result = s.execute(select(Result).where(Result.job_id == job.job_id)).scalar_one()
            result_id, seg_uid, sr_uid = result.id, result.seg_sop_instance_uid, result.sr_sop_instance_uid
        with Orthanc(tmp_path / "orthanc") as orthanc:
            dest = Destination(name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
            [out] = deliver(sessions, result_id, [dest], actor="worker", retry_policy=FAST)
            assert out.sent, out
            held = {}
            for oid in orthanc.get("/instances"):
                ds = dcmread(io.BytesIO(orthanc.get(f"/instances/{oid}/file")))
                held[ds.SOPInstanceUID] = ds
    finally:
        engine.dispose()
    assert set(held) == {seg_uid, sr_uid}
    (tmp_path / "from-orthanc").mkdir()
    seg_path = tmp_path / "from-orthanc" / "seg.dcm"
    held[seg_uid].save_as(seg_path)
    seg = hd.seg.segread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "kidney_left", "kidney_right", "lesion <b>"]
    for item, definition in zip(seg.SegmentSequence, job.segments, strict=True):
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == definition.code.type
        modifiers = kind.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeMeaning for m in modifiers] == ([definition.code.modifier[2]] if definition.code.modifier else [])
        lab = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue))
        assert lab.to_rgb() == definition.color
    # voxel for voxel through the source references: segment n is label segments[n-1].value
    volume = load_series(sorted((tmp_path / "multilabel-series").iterdir()))
    got = seg.get_pixels_by_source_instance([ref.sop_instance_uid for ref in volume.slices],
                                            assert_missing_frames_are_empty=True)
    for n, definition in enumerate(job.segments, start=1):
        np.testing.assert_array_equal(got[..., n - 1].astype(bool), job.label_map == definition.value)
    assert int(seg.NumberOfFrames) == sum(int((job.label_map == d.value).any(axis=(1, 2)).sum()) for d in job.segments)

    sr_path = tmp_path / "from-orthanc" / "sr.dcm"
    held[sr_uid].save_as(sr_path)
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    voxel_ml = float(np.prod(job.spacing)) / 1000
    assert [g.get_measurements(name=VOLUME)[0].value for g in groups] == pytest.approx(
        [float((job.label_map == d.value).sum() * voxel_ml) for d in job.segments], abs=1e-6)
