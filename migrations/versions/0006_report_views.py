"""SQL views behind the administrators' reports (issue 10): volume, turnaround, OOD rate, review queue and
decisions, delivery failures, failed jobs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Each view is plain SQL over the ledger tables, readable with any SQL client; :mod:`ledger.reports` reads
them for ``specgate report`` and the review app's reports page, and computes the percentiles there
(SQLite has no percentile function). The definitions, once for every view:

- **Days** are UTC calendar days, as ``'YYYY-MM-DD'`` text (they sort and compare as dates).
- **Durations** are seconds, as doubles rounded to the millisecond on both backends.
- **Modality and station name** are the job's series' (``jobs.series_instance_uid``, the series the rule
  chose and the model segmented); **calling AE** is the study's (``studies.calling_ae``).
- **Turnaround** (``v_turnaround``, one row per delivered job) runs from the *last instance received* to
  the *delivery*. The last instance received is the newest ``instances.received_at`` of the job's study
  among the instances received no later than the job was created (the instances that job version saw; a
  later version's instances do not stretch an earlier version's turnaround), falling back to
  ``studies.last_received_at`` for a study without instance rows. The delivery is the first
  ``deliveries.sent_at`` of the job's result over its destinations (state ``sent``). A job is
  ``held = 1`` when a radiologist reviewed it (a ``reviews`` row exists): its turnaround includes the wait
  for review.
- **OOD rate** (``v_ood_rate``) counts results by the day they were made; superseded results (an older
  version of a study's result, replaced when new instances arrived) are left out, so every study version
  that is still current counts once.
- **Held time** is the ``job.held`` audit event's time (the transition into ``held``), falling back, for
  a job still held, to ``jobs.updated_at`` (which that transition set, and which nothing changes while the
  job stays held). ``v_review_queue`` gives each held job's age against the database's clock;
  ``v_review_decisions`` gives each review's decision time, ``reviews.created_at`` minus the held time
  (NULL without a ``job.held`` event).
- **Delivery failures** (``v_delivery_failures``): every delivery that failed or needed more than one
  attempt, with its last DIMSE status as ``0xA700``-style hex and a class of failure: from the status
  (``out of resources`` 0xA7xx, ``warning`` 0x0001/0xBxxx, ``refused`` any other non-zero), else from the
  text :mod:`dicom_node.scu` writes (``association rejected``, ``no connection``, ``association aborted``,
  ``no response``, ``no presentation context``, else ``other``); ``sent after retries`` for one that got
  through in the end.
- **Failed jobs** (``v_failed_jobs``): jobs now in state ``failed`` by the day they failed
  (``jobs.updated_at``) and reason code. A job an operator retried leaves this view; its failure stays in
  the audit trail.
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("v_daily_volume", "v_turnaround", "v_ood_rate", "v_review_queue", "v_review_decisions",
         "v_delivery_failures", "v_failed_jobs")


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _day(ts: str) -> str:
    """The UTC day of a timestamp column as 'YYYY-MM-DD' (SQLite stores UTC text without an offset)."""
    return f"to_char({ts} AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if _pg() else f"date({ts})"


def _seconds(later: str, earlier: str) -> str:
    """``later - earlier`` in seconds, a double rounded to the millisecond on both backends (PostgreSQL's
    EXTRACT is numeric; SQLite's julianday arithmetic carries some microseconds of float noise)."""
    if _pg():
        return f"CAST(ROUND(CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS NUMERIC), 3) AS DOUBLE PRECISION)"
    return f"ROUND((julianday({later}) - julianday({earlier})) * 86400.0, 3)"


def _age(ts: str) -> str:
    """Seconds from ``ts`` to the database's now, to the millisecond (SQLite's julianday('now') keeps
    milliseconds)."""
    return _seconds("CURRENT_TIMESTAMP" if _pg() else "'now'", ts)


def _hex4(value: str) -> str:
    """An integer as '0xA700' (NULL stays NULL)."""
    if _pg():
        return f"CASE WHEN {value} IS NULL THEN NULL ELSE '0x' || UPPER(LPAD(TO_HEX({value}), 4, '0')) END"
    return f"CASE WHEN {value} IS NULL THEN NULL ELSE printf('0x%04X', {value}) END"


def _held_at(job_id: str) -> str:
    # audit_events.object_id is text; compare text with text (PostgreSQL does not cast implicitly), and
    # let the (object_type, object_id) index find the job's events.
    return (f"(SELECT MIN(ae.ts) FROM audit_events ae WHERE ae.object_type = 'job' "
            f"AND ae.object_id = CAST({job_id} AS VARCHAR(128)) AND ae.action = 'job.held')")


# 0xA700-0xA7FF = 42752-43007, 0xB000-0xBFFF = 45056-49151
_ERROR_CLASS = """CASE
            WHEN d.state = 'sent' THEN 'sent after retries'
            WHEN d.last_status BETWEEN 42752 AND 43007 THEN 'out of resources'
            WHEN d.last_status = 1 OR d.last_status BETWEEN 45056 AND 49151 THEN 'warning'
            WHEN d.last_status IS NOT NULL AND d.last_status <> 0 THEN 'refused'
            WHEN d.last_error LIKE 'association rejected%' THEN 'association rejected'
            WHEN d.last_error LIKE 'could not connect%' THEN 'no connection'
            WHEN d.last_error LIKE 'association aborted%' THEN 'association aborted'
            WHEN d.last_error LIKE 'no C-STORE response%' THEN 'no response'
            WHEN d.last_error LIKE 'peer accepts no presentation context%' THEN 'no presentation context'
            ELSE 'other'
        END"""


def upgrade() -> None:
    op.execute(f"""
        CREATE VIEW v_daily_volume AS
        SELECT x.day, x.modality, COUNT(DISTINCT x.study_id) AS studies, COUNT(DISTINCT x.series_id) AS series,
               COUNT(*) AS instances, CAST(SUM(x.size_bytes) AS BIGINT) AS bytes
        FROM (SELECT {_day('i.received_at')} AS day, se.modality, se.study_id, se.id AS series_id, i.size_bytes
              FROM instances i JOIN series se ON se.id = i.series_id) x
        GROUP BY x.day, x.modality""")
    op.execute(f"""
        CREATE VIEW v_turnaround AS
        SELECT t.job_id, {_day('t.delivered_at')} AS day, t.modality, t.calling_ae, t.station_name,
               t.model_id, t.held, t.last_received_at, t.delivered_at,
               {_seconds('t.delivered_at', 't.last_received_at')} AS turnaround_seconds
        FROM (SELECT j.id AS job_id, se.modality, st.calling_ae, se.station_name, r.model_id,
                     CASE WHEN EXISTS (SELECT 1 FROM reviews rv WHERE rv.job_id = j.id) THEN 1 ELSE 0 END AS held,
                     COALESCE((SELECT MAX(i.received_at) FROM instances i JOIN series s2 ON s2.id = i.series_id
                               WHERE s2.study_id = j.study_id AND i.received_at <= j.created_at),
                              st.last_received_at) AS last_received_at,
                     (SELECT MIN(d.sent_at) FROM deliveries d
                      WHERE d.result_id = r.id AND d.state = 'sent') AS delivered_at
              FROM jobs j JOIN studies st ON st.id = j.study_id JOIN results r ON r.job_id = j.id
              LEFT JOIN series se ON se.series_instance_uid = j.series_instance_uid) t
        WHERE t.delivered_at IS NOT NULL""")
    op.execute(f"""
        CREATE VIEW v_ood_rate AS
        SELECT x.day, x.modality, x.calling_ae, x.station_name, x.model_id, COUNT(*) AS results,
               SUM(x.ood) AS ood, CAST(SUM(x.ood) AS DOUBLE PRECISION) / COUNT(*) AS ood_rate
        FROM (SELECT {_day('r.created_at')} AS day, se.modality, st.calling_ae, se.station_name, r.model_id,
                     CASE WHEN r.is_ood THEN 1 ELSE 0 END AS ood
              FROM results r JOIN jobs j ON j.id = r.job_id JOIN studies st ON st.id = j.study_id
              LEFT JOIN series se ON se.series_instance_uid = j.series_instance_uid
              WHERE NOT r.superseded) x
        GROUP BY x.day, x.modality, x.calling_ae, x.station_name, x.model_id""")
    op.execute(f"""
        CREATE VIEW v_review_queue AS
        SELECT q.job_id, q.version, {_day('q.held_at')} AS day, q.held_at, {_age('q.held_at')} AS age_seconds,
               q.modality, q.body_part, q.calling_ae, q.station_name, q.model_id, q.oodm, q.tau
        FROM (SELECT j.id AS job_id, j.version, COALESCE({_held_at('j.id')}, j.updated_at) AS held_at,
                     se.modality, se.body_part, st.calling_ae, se.station_name, r.model_id, r.oodm, r.tau
              FROM jobs j JOIN studies st ON st.id = j.study_id
              LEFT JOIN results r ON r.job_id = j.id
              LEFT JOIN series se ON se.series_instance_uid = j.series_instance_uid
              WHERE j.state = 'held') q""")
    op.execute(f"""
        CREATE VIEW v_review_decisions AS
        SELECT x.review_id, x.job_id, x.username, x.decision, {_day('x.decided_at')} AS day, x.held_at,
               x.decided_at, {_seconds('x.decided_at', 'x.held_at')} AS decision_seconds, x.modality
        FROM (SELECT rv.id AS review_id, rv.job_id, rv.username, rv.decision, rv.created_at AS decided_at,
                     {_held_at('rv.job_id')} AS held_at, se.modality
              FROM reviews rv JOIN jobs j ON j.id = rv.job_id
              LEFT JOIN series se ON se.series_instance_uid = j.series_instance_uid) x""")
    op.execute(f"""
        CREATE VIEW v_delivery_failures AS
        SELECT d.id AS delivery_id, d.job_id, d.destination, d.ae_title, d.state, d.attempts, d.last_status,
               {_hex4('d.last_status')} AS status_hex,
               {_ERROR_CLASS} AS error_class,
               {_day('d.updated_at')} AS day, d.updated_at, d.last_error
        FROM deliveries d
        WHERE d.state = 'failed' OR d.attempts > 1""")
    op.execute(f"""
        CREATE VIEW v_failed_jobs AS
        SELECT x.day, x.reason_code, COUNT(*) AS jobs
        FROM (SELECT {_day('j.updated_at')} AS day, COALESCE(j.reason_code, 'unspecified') AS reason_code
              FROM jobs j WHERE j.state = 'failed') x
        GROUP BY x.day, x.reason_code""")


def downgrade() -> None:
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {view}")
