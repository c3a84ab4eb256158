"""Silent (shadow) mode: a model tried on live studies, scored like the live one, never sent (issue 22, item 2).

Design
------
**Which jobs are shadow.** A rule is a *shadow rule* when it says ``shadow = true`` in the settings, or when
the model it names is registered as shadow in the ledger (``models.shadow``, set by ``specgate model shadow
NAME``, cleared by ``specgate model promote NAME``). Shadow rules do not compete for a study: the assembler
(:mod:`dicom_node.assembler`) picks the live job's rule among the live rules exactly as before (the first
that matches wins), then every shadow rule that matches a series of the same study makes one *shadow job*
beside it: same study, same ``version``, ``shadow = true``, ``shadow_of_id`` naming the live job (NULL when
no live rule matched), its rule's model recorded as the job's, so its segmentation goes to that model's
queue (``gpu.<model>``, :mod:`worker.celery_app`) like any job. The jobs table keeps one *live* job per
study version (partial unique index ``uq_jobs_live_version``) and at most one shadow job per shadow rule
and version (``uq_jobs_shadow_version``, migration 0014). A newer version supersedes the shadow jobs of the
older ones as it does the live job.

**Scored as usual, never sent.** A shadow job runs the whole pipeline: SEG, SR, probability map,
evidence, OODM against its own model's bank, ``released`` or ``held`` by its own gate. It stops there:
- :func:`ledger.jobs.transition` refuses to move a shadow job to ``approved`` or ``sent``
  (:class:`ledger.jobs.ShadowRefused`), whoever asks: the one door every approval and delivery goes through;
- :func:`ledger.reviews.decide` refuses to approve or reject one, and the refusal is committed as an audit
  event (``review.refused``, with the user) before the error is raised (its transaction has done nothing
  else: the decision is refused before anything is written);
- :func:`dicom_node.scu.deliver` refuses to create a delivery row for a shadow result, and
  :func:`worker.delivery.deliver_job` refuses to send one (``delivery.refused``, audited);
- the worker does not enqueue its delivery, the reconciler does not look for it, the review queue and the
  held count leave it out (the radiologists never see it to decide); it has a page of its own
  (``/shadow``) and its study page is read-only.

**Side by side.** When both a shadow job and its live job have a result, the worker that finishes the
second compares them (:func:`compare`, :mod:`worker.shadow`): the Dice similarity coefficient of the two
SEGs' label maps, foreground against foreground (any segment; two empty masks agree: 1.0), stored in
``shadow_comparisons`` with an audit event. :func:`side_by_side` is the report ``shadow``
(``specgate report shadow``, the review app's reports page): per shadow model and live model, the DSC
(mean, median, minimum), the 2x2 table of the two gates' OOD decisions, and, where the live result was
held, what the radiologists decided against what the shadow gate would have done.

**Promotion.** ``specgate model promote NAME`` clears the model's shadow flag (audited with who). Its rules
are then ordinary rules, in the order the settings list them: the next study they match is a live job of
that model, released or held by its gate and sent. The previously live model is not changed: it keeps the
studies its rule matches and the promoted model's rule does not (put the promoted rule first to replace
it; ``--demote OLD`` puts a registered ``OLD`` in shadow in the same transaction, so it goes on running
beside, silent). A rule that says ``shadow = true`` in the settings stays a shadow rule until that line
is removed: promotion says so.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from . import audit
from .schema import Job, JobState, RegisteredModel, Result, Review, ShadowComparison, utcnow
from .sql import insert_ignore

__all__ = ["ShadowError", "ShadowPair", "ShadowRow", "dice", "is_shadow_job", "is_shadow_rule", "pairs_of", "record_comparison",
           "refuse", "shadow_models", "shadow_results", "side_by_side"]


class ShadowError(ValueError):
    """Something asked of a shadow job that a shadow job never does (approved, sent, retracted)."""


def shadow_models(session: Session) -> frozenset[str]:
    """The names of the registered models in shadow."""
    return frozenset(session.execute(select(RegisteredModel.name).where(RegisteredModel.shadow)).scalars())


def is_shadow_rule(rule: Any, shadow: Iterable[str]) -> bool:
    """Whether a :class:`dicom_node.config.SeriesRule` makes shadow jobs: it says so, or its model is in
    ``shadow`` (:func:`shadow_models`)."""
    return bool(rule.shadow) or rule.model in shadow


def refuse(session: Session, job_id: int, *, actor: str, action: str, what: str) -> ShadowError:
    """Audit, in ``session``, that ``actor`` asked shadow job ``job_id`` to be ``what``, and return the error
    to raise. The caller commits before raising (the refusal must stay on record)."""
    model = session.execute(select(Job.model_name).where(Job.id == job_id)).scalar()
    audit.append(session, actor=actor, action=action, object_type="job", object_id=job_id,
                 details={"refused": what, "why": "shadow job", "model": model})
    return ShadowError(f"job {job_id} is a shadow result (model {model}): it is never {what} "
                       "(silent mode; promote the model to send its results)")


def is_shadow_job(session: Session, job_id: int) -> bool:
    return bool(session.execute(select(Job.shadow).where(Job.id == job_id)).scalar())


# ------------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class ShadowPair:
    """A shadow job and the live job it ran beside, both with a result, not compared yet."""

    shadow_job_id: int
    live_job_id: int
    shadow_series: str | None
    live_series: str | None
    shadow_seg: str
    live_seg: str


def pairs_of(session: Session, job_id: int) -> list[ShadowPair]:
    """The uncompared pairs job ``job_id`` is part of (as the shadow job, or as the live one), both results
    made."""
    shadow, live = aliased(Job), aliased(Job)
    rs, rl = aliased(Result), aliased(Result)
    q = (select(shadow.id, live.id, shadow.series_instance_uid, live.series_instance_uid, rs.seg_path, rl.seg_path)
         .join(live, live.id == shadow.shadow_of_id)
         .join(rs, rs.job_id == shadow.id).join(rl, rl.job_id == live.id)
         .outerjoin(ShadowComparison, ShadowComparison.shadow_job_id == shadow.id)
         .where(shadow.shadow, ShadowComparison.id.is_(None), (shadow.id == job_id) | (live.id == job_id)))
    return [ShadowPair(*row) for row in session.execute(q).all()]


def dice(a: Any, b: Any) -> float:
    """The Dice similarity coefficient of two boolean masks of one shape, 2|A&B| / (|A|+|B|); two empty
    masks agree (1.0).

        >>> import numpy as np
        >>> a = np.array([1, 1, 0, 0], bool); b = np.array([1, 0, 1, 0], bool)
        >>> dice(a, b), dice(a, a), dice(a & False, b & False)
        (0.5, 1.0, 1.0)
    """
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def record_comparison(session: Session, pair: ShadowPair, *, dsc: float | None, shadow_voxels: int | None,
                      live_voxels: int | None, note: str | None, actor: str) -> bool:
    """Store one comparison, audited; False when another process stored it first."""
    made = bool(insert_ignore(session, ShadowComparison, {
        "shadow_job_id": pair.shadow_job_id, "live_job_id": pair.live_job_id, "dsc": dsc,
        "shadow_voxels": shadow_voxels, "live_voxels": live_voxels, "note": note, "computed_at": utcnow()}))
    if made:
        audit.append(session, actor=actor, action="shadow.compared", object_type="job", object_id=pair.shadow_job_id,
                     details={"live_job_id": pair.live_job_id, "dsc": None if dsc is None else round(dsc, 6),
                              "shadow_voxels": shadow_voxels, "live_voxels": live_voxels, "note": note})
    return made


# ------------------------------------------------------------------------------------------- what is shown
@dataclass(frozen=True)
class ShadowRow:
    """One shadow result for the review app's Shadow page."""

    job_id: int
    version: int
    state: JobState
    model: str | None
    rule: str | None
    created_at: datetime
    oodm: float
    tau: float
    is_ood: bool
    live_job_id: int | None
    live_state: JobState | None
    live_model: str | None
    live_is_ood: bool | None
    dsc: float | None
    note: str | None


def shadow_results(session: Session, limit: int = 200) -> list[ShadowRow]:
    """The newest shadow results (superseded ones left out), with the live job beside each."""
    live, rl = aliased(Job), aliased(Result)
    q = (select(Job.id, Job.version, Job.state, Job.model_name, Job.rule_name, Result.created_at, Result.oodm,
                Result.tau, Result.is_ood, live.id, live.state, live.model_name, rl.is_ood, ShadowComparison.dsc,
                ShadowComparison.note)
         .join(Result, Result.job_id == Job.id)
         .outerjoin(live, live.id == Job.shadow_of_id).outerjoin(rl, rl.job_id == live.id)
         .outerjoin(ShadowComparison, ShadowComparison.shadow_job_id == Job.id)
         .where(Job.shadow, Job.state != JobState.SUPERSEDED)
         .order_by(Result.created_at.desc(), Job.id.desc()).limit(limit))
    return [ShadowRow(r[0], r[1], JobState(r[2]), r[3], r[4], r[5], float(r[6]), float(r[7]), bool(r[8]), r[9],
                      None if r[10] is None else JobState(r[10]), r[11], None if r[12] is None else bool(r[12]),
                      None if r[13] is None else float(r[13]), r[14])
            for r in session.execute(q).all()]


def _in_period(day: date, since: date | None, until: date | None) -> bool:
    return (since is None or day >= since) and (until is None or day <= until)


def side_by_side(session: Session, since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    """The report ``shadow``: one row per (shadow model, live model), over the shadow jobs that ran beside a
    live job, both with a result, neither superseded; period: the UTC day the shadow result was made.

    ``held``: the live result was held for review (its gate said OOD, or a radiologist decided on it);
    ``held_approved`` / ``held_rejected`` / ``held_pending``: what the radiologists did with those, and
    ``held_rejected_shadow_in``: how many the radiologists rejected that the shadow gate would have let
    through (released), ``held_approved_shadow_in``: approved ones the shadow gate would have released.
    """
    live, rl = aliased(Job), aliased(Result)
    q = (select(Job.model_name, live.model_name, Result.created_at, Result.is_ood, rl.is_ood, live.id, live.state,
                ShadowComparison.dsc)
         .join(Result, Result.job_id == Job.id)
         .join(live, live.id == Job.shadow_of_id).join(rl, rl.job_id == live.id)
         .outerjoin(ShadowComparison, ShadowComparison.shadow_job_id == Job.id)
         .where(Job.shadow, Job.state != JobState.SUPERSEDED, live.state != JobState.SUPERSEDED,
                Result.superseded.is_(False), rl.superseded.is_(False)))
    rows = [r for r in session.execute(q).all() if _in_period(_day(r[2]), since, until)]
    decisions = _decisions(session, [r[5] for r in rows])
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in rows:
        groups[(r[0] or "?", r[1] or "default")].append(r)
    out = []
    for (shadow_model, live_model), rs in sorted(groups.items()):
        dscs = [float(r[7]) for r in rs if r[7] is not None]
        cell: dict[tuple[bool, bool], int] = defaultdict(int)
        for r in rs:
            cell[(bool(r[4]), bool(r[3]))] += 1  # (live OOD, shadow OOD)
        held = [r for r in rs if bool(r[4]) or r[5] in decisions or JobState(r[6]) == JobState.HELD]
        said = [(decisions.get(r[5]), bool(r[3])) for r in held]
        out.append({
            "shadow_model": shadow_model, "live_model": live_model, "studies": len(rs), "compared": len(dscs),
            "dsc_mean": statistics.fmean(dscs) if dscs else None,
            "dsc_median": statistics.median(dscs) if dscs else None, "dsc_min": min(dscs) if dscs else None,
            "both_in": cell[(False, False)], "live_in_shadow_ood": cell[(False, True)],
            "live_ood_shadow_in": cell[(True, False)], "both_ood": cell[(True, True)],
            "held": len(held), "held_approved": sum(d == "approve" for d, _ in said),
            "held_rejected": sum(d == "reject" for d, _ in said), "held_pending": sum(d is None for d, _ in said),
            "held_approved_shadow_in": sum(d == "approve" and not ood for d, ood in said),
            "held_rejected_shadow_in": sum(d == "reject" and not ood for d, ood in said),
        })
    return out


def _day(ts: datetime) -> date:
    from datetime import UTC

    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC).date()


def _decisions(session: Session, job_ids: Sequence[int]) -> dict[int, str]:
    """The last radiologist's decision on each of ``job_ids`` that has one (``approve`` / ``reject``)."""
    if not job_ids:
        return {}
    last = (select(Review.job_id, func.max(Review.id).label("id")).where(Review.job_id.in_(job_ids))
            .group_by(Review.job_id).subquery())
    q = select(Review.job_id, Review.decision).join(last, and_(last.c.id == Review.id))
    return {int(j): str(d) for j, d in session.execute(q).all()}
