"""Instances: ``store_key``, where the instance lives in the store (issue 18, item 1).

With the ``fs`` store the key is the spool path (relative to the data directory), written with the row;
with ``s3`` it stays NULL until the SCP's uploader has put the file under its content address, and a
study is assembled into a job only when every instance of it has a key: no worker ever sees part of a
series. Rows of earlier versions were all received into the spool, which is the ``fs`` store: their key is
their spool path.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("store_key", sa.String(512), nullable=True))
    op.execute("UPDATE instances SET store_key = spool_path")
    op.create_index("ix_instances_store_key", "instances", ["store_key"])


def downgrade() -> None:
    op.drop_index("ix_instances_store_key", table_name="instances")
    # plain ALTER TABLE on both (SQLite >= 3.35): a batch copy of the table would break the views on it
    op.execute("ALTER TABLE instances DROP COLUMN store_key")
