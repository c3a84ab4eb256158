"""The blind audit sample of released results (issue 22, item 3).

``audit_samples``: one row per released result drawn for a blind review (``audit_sample_share`` of the
released studies, drawn by :func:`ledger.audit_sample.draw` from the study's UID, so the draw is
reproducible): the share and the draw it was made with, and the radiologist's verdict once given
(``pending`` until then, ``agreed`` or ``rejected``, who, when, why), and the retraction a rejection led
to. Studies not drawn have no row; their draw is in the audit trail (``audit_sample.drawn``).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATE = sa.Enum("pending", "agreed", "rejected", name="audit_sample_state", native_enum=False,
                 create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "audit_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("draw", sa.Float(), nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed_by", sa.String(64), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("retraction_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_audit_samples_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_audit_samples_result_id_results"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["retraction_id"], ["retractions.id"],
                                name=op.f("fk_audit_samples_retraction_id_retractions"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_samples")),
        sa.UniqueConstraint("job_id", name=op.f("uq_audit_samples_job_id")),
    )
    op.create_index(op.f("ix_audit_samples_state"), "audit_samples", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_samples_state"), table_name="audit_samples")
    op.drop_table("audit_samples")
