"""A queue per model (issue 18): ``jobs.model_name`` and ``job_attempts``.

``jobs.model_name`` is the model a job was made for (its rule's ``model``, set by the assembler), so that
its segmentation message goes to that model's queue (``gpu.<model>``) from the ledger alone. Existing rows
keep NULL: such a job goes to the queue of the model its rule names in the running settings, or to the
bare ``gpu`` queue when its rule is gone (``worker.celery_app.segment_queue_of``), which a worker started
without ``--models`` also consumes.

``job_attempts`` records every attempt: host, process id, device (``cpu``, ``cuda:0 <GPU name>``), when it
started and ended, and how (the state the job went to, the reason code). Jobs that ran before this
revision have no rows; their attempts are still counted in ``jobs.attempts``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("model_name", sa.String(64), nullable=True))
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("reason_code", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_attempts_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_attempts")),
    )
    op.create_index(op.f("ix_job_attempts_job_id"), "job_attempts", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_job_attempts_job_id"), table_name="job_attempts")
    op.drop_table("job_attempts")
    op.drop_column("jobs", "model_name")
