"""Study assembly counters: instances received, and how many the last assembly saw.

The assembler (``dicom_node.assembler``) re-assembles a study while ``received_count > assembled_count``
and its quiet period has passed. Existing studies get 0/0 (nothing pending).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, whereas a batch "move and
# copy" of ``studies`` would fail on the foreign keys that series and jobs hold to it.
def upgrade() -> None:
    op.add_column("studies", sa.Column("received_count", sa.Integer(), server_default="0", nullable=False))
    op.add_column("studies", sa.Column("assembled_count", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("studies", "assembled_count")
    op.drop_column("studies", "received_count")
