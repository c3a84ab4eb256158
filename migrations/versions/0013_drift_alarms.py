"""Drift alarms (issue 22, item 1): ``drift_charts`` (one EWMA chart per source and model, its baseline
and statistics), ``drift_observations`` (one row per finished job: its source's acquisition metadata, the
gate's numbers, the chart after it; written with the job's result) and ``drift_alarms`` (open until an
admin clears them). See :mod:`ledger.drift`.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def _source() -> list[sa.Column[object]]:
    return [sa.Column("model", sa.String(64), nullable=False),
            sa.Column("calling_ae", sa.String(16), nullable=False),
            sa.Column("station_name", sa.String(64), nullable=True),
            sa.Column("manufacturer", sa.String(64), nullable=True),
            sa.Column("manufacturer_model", sa.String(64), nullable=True),
            sa.Column("software_versions", sa.String(128), nullable=True)]


def upgrade() -> None:
    op.create_table(
        "drift_charts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source_key", sa.String(64), nullable=False),
        *_source(),
        sa.Column("baseline_n", sa.Integer(), nullable=False),
        sa.Column("baseline_sum", sa.Float(), nullable=False),
        sa.Column("baseline_sumsq", sa.Float(), nullable=False),
        sa.Column("baseline_ood", sa.Integer(), nullable=False),
        sa.Column("baseline_done", sa.Boolean(), nullable=False),
        sa.Column("baseline_metadata", _JSON, nullable=False),
        sa.Column("ewma_oodm", sa.Float(), nullable=False),
        sa.Column("ewma_rate", sa.Float(), nullable=True),
        sa.Column("charted", sa.Integer(), nullable=False),
        sa.Column("observations", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_charts")),
        sa.UniqueConstraint("source_key", name=op.f("uq_drift_charts_source_key")),
    )
    op.create_table(
        "drift_observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("chart_id", sa.Integer(), nullable=False),
        *_source(),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("pixel_spacing", sa.Float(), nullable=True),
        sa.Column("kvp", sa.Float(), nullable=True),
        sa.Column("convolution_kernel", sa.String(64), nullable=True),
        sa.Column("metadata", _JSON, nullable=False),
        sa.Column("oodm", sa.Float(), nullable=False),
        sa.Column("tau", sa.Float(), nullable=False),
        sa.Column("is_ood", sa.Boolean(), nullable=False),
        sa.Column("in_baseline", sa.Boolean(), nullable=False),
        *[sa.Column(c, sa.Float(), nullable=True)
          for c in ("ewma_oodm", "limit_oodm", "stop_oodm", "ewma_rate", "limit_rate", "stop_rate")],
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_observations")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_drift_observations_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["chart_id"], ["drift_charts.id"],
                                name=op.f("fk_drift_observations_chart_id_drift_charts"), ondelete="RESTRICT"),
        sa.UniqueConstraint("job_id", name=op.f("uq_drift_observations_job_id")),
    )
    op.create_index(op.f("ix_drift_observations_chart_id"), "drift_observations", ["chart_id"])
    op.create_index(op.f("ix_drift_observations_created_at"), "drift_observations", ["created_at"])
    op.create_table(
        "drift_alarms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("chart_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("statistic", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("detail", _JSON, nullable=False),
        sa.Column("first_job_id", sa.Integer(), nullable=False),
        sa.Column("opened_at", _TS, nullable=False),
        sa.Column("cleared_at", _TS, nullable=True),
        sa.Column("cleared_by", sa.String(128), nullable=True),
        sa.Column("clear_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_alarms")),
        sa.ForeignKeyConstraint(["chart_id"], ["drift_charts.id"], name=op.f("fk_drift_alarms_chart_id_drift_charts"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["first_job_id"], ["jobs.id"], name=op.f("fk_drift_alarms_first_job_id_jobs"),
                                ondelete="RESTRICT"),
    )
    op.create_index("ix_drift_alarms_state_chart", "drift_alarms", ["state", "chart_id"])


def downgrade() -> None:
    op.drop_index("ix_drift_alarms_state_chart", table_name="drift_alarms")
    op.drop_table("drift_alarms")
    op.drop_index(op.f("ix_drift_observations_created_at"), table_name="drift_observations")
    op.drop_index(op.f("ix_drift_observations_chart_id"), table_name="drift_observations")
    op.drop_table("drift_observations")
    op.drop_table("drift_charts")
