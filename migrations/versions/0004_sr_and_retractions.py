"""The gate's evidence as a DICOM SR sent with every SEG, and retraction of sent results (IHE IOCM).

``results`` gets the SR's file and UIDs (nullable: results made before this revision have no SR and are
delivered as before, SEG alone). ``retractions`` records a sent result taken back by a Key Object
Selection document; ``retraction_deliveries`` that document's delivery to each destination that had
received the result, with the same columns and guarantees as ``deliveries``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATE = sa.Enum("pending", "sending", "sent", "failed", name="delivery_state", native_enum=False,
                 create_constraint=True, length=16)
_REASON = sa.Enum("quality", "patient_safety", name="retraction_reason", native_enum=False,
                  create_constraint=True, length=16)


# Plain ADD COLUMN and a unique index on ``results``, not batch mode (see 0003: a batch copy of ``results``
# would fail on the foreign keys that deliveries hold to it).
def upgrade() -> None:
    op.add_column("results", sa.Column("sr_path", sa.String(512), nullable=True))
    op.add_column("results", sa.Column("sr_sop_instance_uid", sa.String(64), nullable=True))
    op.add_column("results", sa.Column("sr_series_instance_uid", sa.String(64), nullable=True))
    op.create_index("uq_results_sr_sop_instance_uid", "results", ["sr_sop_instance_uid"], unique=True)
    op.create_table(
        "retractions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("kos_path", sa.String(512), nullable=False),
        sa.Column("kos_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("kos_series_instance_uid", sa.String(64), nullable=False),
        sa.Column("reason", _REASON, nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_retractions_job_id_jobs"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_retractions_result_id_results"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retractions")),
        sa.UniqueConstraint("result_id", name=op.f("uq_retractions_result_id")),
        sa.UniqueConstraint("kos_sop_instance_uid", name=op.f("uq_retractions_kos_sop_instance_uid")),
    )
    op.create_index(op.f("ix_retractions_job_id"), "retractions", ["job_id"], unique=False)
    op.create_table(
        "retraction_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("retraction_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_retraction_deliveries_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["retraction_id"], ["retractions.id"],
                                name=op.f("fk_retraction_deliveries_retraction_id_retractions"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retraction_deliveries")),
        sa.UniqueConstraint("retraction_id", "destination", name="uq_retraction_deliveries_destination"),
    )
    op.create_index(op.f("ix_retraction_deliveries_job_id"), "retraction_deliveries", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_retraction_deliveries_job_id"), table_name="retraction_deliveries")
    op.drop_table("retraction_deliveries")
    op.drop_index(op.f("ix_retractions_job_id"), table_name="retractions")
    op.drop_table("retractions")
    op.drop_index("uq_results_sr_sop_instance_uid", table_name="results")
    op.drop_column("results", "sr_series_instance_uid")
    op.drop_column("results", "sr_sop_instance_uid")
    op.drop_column("results", "sr_path")
