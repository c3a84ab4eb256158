"""The hospital's models: ``models``, one row per model registered with ``specgate model register``.

A row records what the model is made of (its format, the path as the operator gave it, the SHA-256 of
every file), what it outputs (label values and the model's names for them, optionally a SNOMED CT code per
label), how its spectral signature is taken (the hooked layer and the adapter's signature settings), and,
once ``specgate model fit-ood`` has run, its OOD bank (path and SHA-256). ``state`` is ``registered``
until the bank is fitted, then ``live``: only a live model may be routed to. Every change to a row writes
an audit event (:mod:`ledger.models`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_STATE = sa.Enum("registered", "live", name="model_state", native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("files_sha256", _JSON, nullable=False),
        sa.Column("labels", _JSON, nullable=False),
        sa.Column("layer", sa.String(256), nullable=False),
        sa.Column("settings", _JSON, nullable=False),
        sa.Column("codes", _JSON, nullable=True),
        sa.Column("bank_path", sa.String(1024), nullable=True),
        sa.Column("bank_sha256", sa.String(64), nullable=True),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_by", sa.String(128), nullable=False),
        sa.Column("bank_fitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )


def downgrade() -> None:
    op.drop_table("models")
