"""Completeness by asking the archive (issue 21, item 5).

``studies.completeness_due_at``: set when a study's quiet period ended and its source has an archive to
ask; until then (the bound, ``completeness_wait_seconds``) the assembler waits for the instances the
archive says it holds. ``studies.completeness``: the archive's answer (its counts per series), or why it
gave none. ``jobs.completeness``: what the job was assembled with (complete, ``incomplete_at_source`` with
the counts at the source and held per series, or ``archive_unreachable``), which the worker copies into
the job's evidence and the rule's ``when_incomplete`` reads. All NULL for a study whose source has no
archive, and for every row made before this revision.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("studies", sa.Column("completeness_due_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("studies", sa.Column("completeness", _JSON, nullable=True))
    op.add_column("jobs", sa.Column("completeness", _JSON, nullable=True))


def downgrade() -> None:
    # plain ALTER TABLE on both (SQLite >= 3.35): a batch copy of the table would break the views on it
    op.execute("ALTER TABLE jobs DROP COLUMN completeness")
    op.execute("ALTER TABLE studies DROP COLUMN completeness")
    op.execute("ALTER TABLE studies DROP COLUMN completeness_due_at")
