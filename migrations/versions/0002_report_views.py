"""SQL views that the admin reports read: job states, turnaround, gate decisions, deliveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Views are plain SQL over the ledger tables, so a PACS administrator can query them with any SQL client
(``psql``, ``sqlite3``) and a report tool never needs to know the table layout.
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _seconds(later: str, earlier: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


def upgrade() -> None:
    op.execute("""
        CREATE VIEW v_job_state_counts AS
        SELECT state, COUNT(*) AS jobs, MIN(updated_at) AS oldest_update, MAX(updated_at) AS newest_update
        FROM jobs GROUP BY state""")
    op.execute(f"""
        CREATE VIEW v_job_turnaround AS
        SELECT j.id AS job_id, s.study_instance_uid, j.version, j.state, j.attempts, j.reason_code,
               j.created_at, j.finished_at,
               {_seconds('j.finished_at', 'j.created_at')} AS turnaround_seconds
        FROM jobs j JOIN studies s ON s.id = j.study_id""")
    op.execute("""
        CREATE VIEW v_gate_decisions AS
        SELECT r.id AS result_id, r.job_id, s.study_instance_uid, r.model_id, r.weights_sha256,
               r.oodm, r.tau, r.is_ood, j.state AS job_state, r.superseded, r.created_at,
               (SELECT rv.decision FROM reviews rv WHERE rv.job_id = r.job_id ORDER BY rv.id DESC LIMIT 1)
                   AS review_decision,
               (SELECT rv.username FROM reviews rv WHERE rv.job_id = r.job_id ORDER BY rv.id DESC LIMIT 1)
                   AS reviewed_by
        FROM results r JOIN jobs j ON j.id = r.job_id JOIN studies s ON s.id = j.study_id""")
    op.execute("""
        CREATE VIEW v_delivery_status AS
        SELECT d.destination, d.state, COUNT(*) AS deliveries, SUM(d.attempts) AS attempts,
               MAX(d.updated_at) AS last_update
        FROM deliveries d GROUP BY d.destination, d.state""")


def downgrade() -> None:
    for view in ("v_delivery_status", "v_gate_decisions", "v_job_turnaround", "v_job_state_counts"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
