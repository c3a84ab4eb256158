"""Study assembly counters: instances received, and how many the last assembly saw.

The assembler (``dicom_node.assembler``) re-assembles a study while ``received_count > assembled_count``
and its quiet period has passed. Both counters are computed here from what the ledger already holds, so
that an upgrade neither forgets a study nor assembles one again:

- ``received_count``: the study's instances (through its series).
- ``assembled_count``: the instances received no later than the study's assembly, i.e. all of them for a
  study assembled since its last instance, fewer for one that received instances after it, and 0 for one
  never assembled. The assembly's time is ``assembled_at``, or, where a ledger did not record it, the
  creation of the study's newest job that left ``receiving`` (a job exists only once a study was
  assembled; a ``receiving`` job means the study is still arriving).

So a study still in its quiet period when the upgrade runs (0 < received) is assembled once its quiet
period ends, one that received instances after its job was made gets a new version (as the assembler
does for any study), and every other study is left alone.

The first version of this revision set both counters to 0 for existing studies: a study waiting for its
quiet period at the upgrade was never assembled. This revision is corrected in place, for ledgers that
upgrade from now on; revision 0007 repairs the ledgers that already ran the first version.

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

# Both counters from the rows (revision 0007 runs a copy of this statement on the studies the first version of
# this revision left at 0/0). Correlated subqueries: one pass over studies, each using the indexes on
# series.study_id and instances.series_id. An instance received at NULL assembly time counts nowhere
# (``received_at <= NULL`` is not true), which is the 0 of a study never assembled.
COUNTERS_FROM_ROWS = """
    UPDATE studies SET
        received_count = (SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_id
                          WHERE se.study_id = studies.id),
        assembled_count = (SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_id
                           WHERE se.study_id = studies.id AND i.received_at <= COALESCE(
                               studies.assembled_at,
                               (SELECT MAX(j.created_at) FROM jobs j
                                WHERE j.study_id = studies.id AND j.state <> 'receiving')))"""


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, whereas a batch "move and
# copy" of ``studies`` would fail on the foreign keys that series and jobs hold to it.
def upgrade() -> None:
    op.add_column("studies", sa.Column("received_count", sa.Integer(), server_default="0", nullable=False))
    op.add_column("studies", sa.Column("assembled_count", sa.Integer(), server_default="0", nullable=False))
    op.execute(COUNTERS_FROM_ROWS)


def downgrade() -> None:
    op.drop_column("studies", "assembled_count")
    op.drop_column("studies", "received_count")
