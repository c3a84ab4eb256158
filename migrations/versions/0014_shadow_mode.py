"""Silent (shadow) mode (issue 22, item 2): ``jobs.shadow``, ``jobs.shadow_of_id``, ``models.shadow``,
``shadow_comparisons``; one live job per study version instead of one job.

A shadow job runs beside the live job of the same study version (same ``version``, ``shadow_of_id`` naming
the live job; NULL when no live rule matched), so ``uq_jobs_study_version`` (study, version) gives way to
two partial unique indexes: ``uq_jobs_live_version`` (study, version) among live jobs, exactly the old
rule for them, and ``uq_jobs_shadow_version`` (study, version, rule) among shadow jobs: one per shadow
rule. ``models.shadow``: a registered model whose rules' jobs are shadow jobs until it is promoted.
``shadow_comparisons``: the Dice similarity of a shadow result's label map against its live job's.

Every existing row is a live job of a live model (``shadow`` false): nothing changes for them.

SQLite cannot drop a table's UNIQUE constraint: ``jobs`` is rebuilt (Alembic's batch copy). The views of
0006 read ``jobs``; ``legacy_alter_table`` keeps SQLite from re-checking them while the copy is renamed
into place (they name the table, which is back under the same name when the migration ends), and
foreign keys are off for the copy (``migrations/env.py``, Alembic's documented way) and checked at the end.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _check_foreign_keys() -> None:
    bad = op.get_bind().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        raise RuntimeError(f"rebuilding jobs left rows whose foreign keys do not hold: {bad[:5]}")


def upgrade() -> None:
    false = sa.false()
    op.add_column("models", sa.Column("shadow", sa.Boolean(), nullable=False, server_default=false))
    if _sqlite():
        op.execute("PRAGMA legacy_alter_table=ON")
        with op.batch_alter_table("jobs", recreate="always") as batch:
            batch.add_column(sa.Column("shadow", sa.Boolean(), nullable=False, server_default=false))
            batch.add_column(sa.Column("shadow_of_id", sa.Integer(), nullable=True))
            batch.drop_constraint("uq_jobs_study_version", type_="unique")
            batch.create_foreign_key(op.f("fk_jobs_shadow_of_id_jobs"), "jobs", ["shadow_of_id"], ["id"])
        op.execute("PRAGMA legacy_alter_table=OFF")
        _check_foreign_keys()
    else:
        op.add_column("jobs", sa.Column("shadow", sa.Boolean(), nullable=False, server_default=false))
        op.add_column("jobs", sa.Column("shadow_of_id", sa.Integer(), nullable=True))
        op.create_foreign_key(op.f("fk_jobs_shadow_of_id_jobs"), "jobs", "jobs", ["shadow_of_id"], ["id"])
        op.drop_constraint("uq_jobs_study_version", "jobs", type_="unique")
    op.create_index("ix_jobs_shadow_of_id", "jobs", ["shadow_of_id"])
    op.create_index("uq_jobs_live_version", "jobs", ["study_id", "version"], unique=True,
                    sqlite_where=sa.text("NOT shadow"), postgresql_where=sa.text("NOT shadow"))
    op.create_index("uq_jobs_shadow_version", "jobs", ["study_id", "version", "rule_name"], unique=True,
                    sqlite_where=sa.text("shadow"), postgresql_where=sa.text("shadow"))
    op.create_table(
        "shadow_comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("shadow_job_id", sa.Integer(), nullable=False),
        sa.Column("live_job_id", sa.Integer(), nullable=False),
        sa.Column("dsc", sa.Float(), nullable=True),
        sa.Column("shadow_voxels", sa.BigInteger(), nullable=True),
        sa.Column("live_voxels", sa.BigInteger(), nullable=True),
        sa.Column("note", sa.String(256), nullable=True),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["shadow_job_id"], ["jobs.id"], name=op.f("fk_shadow_comparisons_shadow_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["live_job_id"], ["jobs.id"], name=op.f("fk_shadow_comparisons_live_job_id_jobs"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_comparisons")),
        sa.UniqueConstraint("shadow_job_id", name=op.f("uq_shadow_comparisons_shadow_job_id")),
    )
    op.create_index(op.f("ix_shadow_comparisons_live_job_id"), "shadow_comparisons", ["live_job_id"])


def downgrade() -> None:
    """Refused while shadow jobs exist (two jobs of one version cannot go back under the old constraint)."""
    if op.get_bind().execute(sa.text("SELECT count(*) FROM jobs WHERE shadow")).scalar():
        raise RuntimeError("shadow jobs exist: the ledger cannot go back before revision 0014 without losing "
                           "them (one job per study version)")
    op.drop_index(op.f("ix_shadow_comparisons_live_job_id"), table_name="shadow_comparisons")
    op.drop_table("shadow_comparisons")
    op.drop_index("uq_jobs_shadow_version", table_name="jobs")
    op.drop_index("uq_jobs_live_version", table_name="jobs")
    op.drop_index("ix_jobs_shadow_of_id", table_name="jobs")
    if _sqlite():
        op.execute("PRAGMA legacy_alter_table=ON")
        with op.batch_alter_table("jobs", recreate="always") as batch:
            batch.drop_constraint(op.f("fk_jobs_shadow_of_id_jobs"), type_="foreignkey")
            batch.drop_column("shadow_of_id")
            batch.drop_column("shadow")
            batch.create_unique_constraint("uq_jobs_study_version", ["study_id", "version"])
        op.execute("PRAGMA legacy_alter_table=OFF")
        _check_foreign_keys()
    else:
        op.create_unique_constraint("uq_jobs_study_version", "jobs", ["study_id", "version"])
        op.drop_constraint(op.f("fk_jobs_shadow_of_id_jobs"), "jobs", type_="foreignkey")
        op.drop_column("jobs", "shadow_of_id")
        op.drop_column("jobs", "shadow")
    op.execute("ALTER TABLE models DROP COLUMN shadow")
