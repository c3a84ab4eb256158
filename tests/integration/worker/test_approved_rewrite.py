"""worker.objects.rewrite_approved: an approved result's SEG and SR are written again with the approver, with
the segments they were first written with (from the job's evidence), whatever the configuration says now
and with no rule or model at hand. A result from before segments were recorded keeps the one segment its
rule then described (recorded in the evidence's ``rule_config``, from the days rules carried it)."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from sqlalchemy import select

from ledger import migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import Result, Review, ReviewDecision
from specgate.settings import Settings
from tests.integration.review.multilabel import multilabel_job
from worker.objects import rewrite_approved, save_probability


def _approve(sessions, job_id: int) -> Result:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as s:
        s.add(Review(job_id=job_id, username="alice", decision=ReviewDecision.APPROVE))
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        s.expunge(result)
        return result


def test_an_approval_rewrites_with_the_recorded_segments_and_an_old_result_with_its_rules(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    try:
        sessions = sessionmaker_for(engine)
        job = multilabel_job(sessions, tmp_path, settings.results_dir)
        result = _approve(sessions, job.job_id)
        assert rewrite_approved(sessions, job.job_id)
        seg = hd.seg.segread(result.seg_path)
        assert seg.ContentCreatorName.family_name == "alice" and seg.SOPInstanceUID == result.seg_sop_instance_uid
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [d.label for d in job.segments]

        # a result written when the rule described the segment: no segments in its evidence, no label map
        evidence_path = Path(str(result.evidence_path))
        evidence = json.loads(evidence_path.read_text())
        del evidence["segments"]
        evidence["rule_config"] = {"name": "abdomen", "model": "default", "segment_label": "Liver",
                                   "segment_description": None, "display_color": [200, 80, 40],
                                   "category_code": ["123037004", "SCT", "Anatomical Structure"],
                                   "type_code": ["10200004", "SCT", "Liver"]}
        evidence_path.write_text(json.dumps(evidence))
        mask = job.label_map == 1
        save_probability(Path(str(result.prob_path)), mask.astype(np.float16), mask)
        assert rewrite_approved(sessions, job.job_id)
    finally:
        engine.dispose()
    (item,) = dcmread(result.seg_path).SegmentSequence
    assert item.SegmentLabel == "Liver" and "SegmentDescription" not in item
    kind = item.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("10200004", "SCT", "Liver")
    assert hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb() == (200, 80, 40)
    assert hd.seg.segread(result.seg_path).get_volume().array.sum() == int(mask.sum())
