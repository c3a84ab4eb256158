"""The review app: login throttling and session revocation on users, the station name on series, and the
result's place on its bank's own OODM distribution.

- ``users.failed_logins`` / ``users.last_failed_login_at``: failed logins in a row, for slowing an account
  down.
- ``review_sessions``: logins to the review app, server-side (the browser holds a random token; the table
  keeps its SHA-256), so logout, a password change or a disabled account ends them at once.
- ``series.station_name``: the scanner (StationName, 0008,1010), shown in the queue and counted in reports.
- ``results.bank_percentile``: percent of the bank's leave-one-out OODMs at or below this result's OODM
  (None for results made before this revision).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN (see 0003): SQLite 3.35+ does both in place.
def upgrade() -> None:
    op.add_column("users", sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False))
    op.add_column("users", sa.Column("last_failed_login_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "review_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_review_sessions_user_id_users",
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name="pk_review_sessions"),
        sa.UniqueConstraint("token_sha256", name="uq_review_sessions_token_sha256"),
    )
    op.create_index("ix_review_sessions_user_id", "review_sessions", ["user_id"])
    op.add_column("series", sa.Column("station_name", sa.String(64), nullable=True))
    op.add_column("results", sa.Column("bank_percentile", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("results", "bank_percentile")
    op.drop_column("series", "station_name")
    op.drop_index("ix_review_sessions_user_id", table_name="review_sessions")
    op.drop_table("review_sessions")
    op.drop_column("users", "last_failed_login_at")
    op.drop_column("users", "failed_logins")
