"""``v_ood_rate`` counts the live results only: a shadow model's (migration 0014, ``ledger.shadow``) are left out.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06

A shadow job runs beside the live job of the same study and is never sent; counted in the OOD rate it
would make one study two results, and a shadow model on trial (which may hold many) would move the
"all results" rate the reports page charts for the live gate. The shadow models' own decisions are in
the ``shadow`` report. The view is otherwise revision 0006's.
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _day(ts: str) -> str:
    """As revision 0006: the UTC day of a timestamp as 'YYYY-MM-DD'."""
    if op.get_bind().dialect.name == "postgresql":
        return f"to_char({ts} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    return f"date({ts})"


def _create(live_only: bool) -> None:
    shadow = " AND NOT j.shadow" if live_only else ""
    op.execute("DROP VIEW IF EXISTS v_ood_rate")
    op.execute(f"""
        CREATE VIEW v_ood_rate AS
        SELECT x.day, x.modality, x.calling_ae, x.station_name, x.model_id, COUNT(*) AS results,
               SUM(x.ood) AS ood, CAST(SUM(x.ood) AS DOUBLE PRECISION) / COUNT(*) AS ood_rate
        FROM (SELECT {_day('r.created_at')} AS day, se.modality, st.calling_ae, se.station_name, r.model_id,
                     CASE WHEN r.is_ood THEN 1 ELSE 0 END AS ood
              FROM results r JOIN jobs j ON j.id = r.job_id JOIN studies st ON st.id = j.study_id
              LEFT JOIN series se ON se.series_instance_uid = j.series_instance_uid
              WHERE NOT r.superseded{shadow}) x
        GROUP BY x.day, x.modality, x.calling_ae, x.station_name, x.model_id""")


def upgrade() -> None:
    _create(live_only=True)


def downgrade() -> None:
    _create(live_only=False)
