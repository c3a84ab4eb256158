"""Silent mode, the worker's side: a shadow result against its live job's, compared when both exist.

The worker that finishes the second job of a pair (:func:`ledger.shadow.pairs_of`: a shadow job and the
live job it ran beside, both with a result) reads both DICOM-SEGs back and stores the Dice similarity
coefficient of their label maps, foreground against foreground (any segment), on the source series'
instances (:func:`ledger.shadow.record_comparison`). Two jobs of different series cannot be compared voxel
for voxel: the comparison is stored without a DSC, with a note. Two workers finishing the two jobs at once
may both compare: the first stored wins, the other's is dropped.

What the design is, and where nothing is sent, is :mod:`ledger.shadow`.
"""

from __future__ import annotations

import logging

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ledger import shadow
from ledger.db import session_scope
from ledger.schema import Instance, Series
from store import Store, StoreError

__all__ = ["compare_ready", "seg_foreground"]

log = logging.getLogger("specgate.worker")


def seg_foreground(seg_path: str, source_uids: list[str]) -> np.ndarray:
    """A DICOM-SEG's foreground (any segment) on the source instances ``source_uids``, in that order
    (a slice the SEG has no frame for is empty)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_uids, assert_missing_frames_are_empty=True)
    return np.asarray(np.asarray(pixels).any(axis=-1), dtype=bool)


def _source_uids(s: Session, series_instance_uid: str) -> list[str]:
    return list(s.execute(select(Instance.sop_instance_uid).join(Series, Series.id == Instance.series_id)
                          .where(Series.series_instance_uid == series_instance_uid)
                          .order_by(Instance.sop_instance_uid)).scalars())


def compare_ready(sessions: sessionmaker[Session], job_id: int, files: Store, *, actor: str) -> int:
    """Compare every pair job ``job_id`` completes (none for most jobs: one query); the number stored. A
    SEG that cannot be read is logged and left for the next finishing job or the report to show missing."""
    with session_scope(sessions) as s:
        pairs = shadow.pairs_of(s, job_id)
        sources = {p.shadow_series: _source_uids(s, p.shadow_series) for p in pairs
                   if p.shadow_series is not None and p.shadow_series == p.live_series}
    stored = 0
    for pair in pairs:
        dsc = shadow_voxels = live_voxels = None
        note = None
        if pair.shadow_series is None or pair.shadow_series != pair.live_series:
            note = "different series: the shadow rule chose another series than the live one"
        else:
            try:
                uids = sources[pair.shadow_series]
                a = seg_foreground(str(files.path(pair.shadow_seg)), uids)
                b = seg_foreground(str(files.path(pair.live_seg)), uids)
            except (OSError, ValueError, StoreError) as exc:
                log.warning("shadow job %d: not compared with job %d (%s: %s)", pair.shadow_job_id,
                            pair.live_job_id, type(exc).__name__, exc)
                continue
            dsc, shadow_voxels, live_voxels = shadow.dice(a, b), int(a.sum()), int(b.sum())
        with session_scope(sessions) as s:
            stored += shadow.record_comparison(s, pair, dsc=dsc, shadow_voxels=shadow_voxels,
                                               live_voxels=live_voxels, note=note, actor=actor)
    return stored
