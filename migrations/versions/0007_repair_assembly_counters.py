"""Repair the study assembly counters that the first version of revision 0003 left at 0/0.

That version added ``studies.received_count`` and ``studies.assembled_count`` with 0 for every existing
study. The assembler assembles a study while ``received_count > assembled_count``, so a study that was
still in its quiet period when a ledger ran it has never been assembled: acknowledged to its sender,
never segmented, never reported. Revision 0003 now computes the counters from the rows; this revision
does the same for the ledgers that already ran the first version (for a ledger upgraded through the
corrected 0003 it finds nothing to do).

Which studies: those at 0/0 that hold instances. No study can be there otherwise: every instance stored
since 0003 bumps ``received_count`` in the transaction that inserts it, and an assembly only raises
``assembled_count`` to ``received_count``. Studies whose counters moved since (new instances arrived)
are left as they are: their counters already make the assembler do the right thing.

What they get is what the corrected 0003 gives (its docstring): ``received_count`` the instances held,
``assembled_count`` those received no later than the study's assembly (``assembled_at``, else its newest
job that left ``receiving``), 0 for a study never assembled. The repair writes no audit event: the
counters are the assembler's bookkeeping; an assembly that follows writes its own ``job.created``.

Nothing to undo on downgrade: the counters stay as repaired.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The statement of 0003 (migrations are frozen: each carries its own), restricted to the damaged studies.
_REPAIR = """
    UPDATE studies SET
        received_count = (SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_id
                          WHERE se.study_id = studies.id),
        assembled_count = (SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_id
                           WHERE se.study_id = studies.id AND i.received_at <= COALESCE(
                               studies.assembled_at,
                               (SELECT MAX(j.created_at) FROM jobs j
                                WHERE j.study_id = studies.id AND j.state <> 'receiving')))
    WHERE received_count = 0 AND assembled_count = 0
      AND EXISTS (SELECT 1 FROM instances i JOIN series se ON se.id = i.series_id WHERE se.study_id = studies.id)"""


def upgrade() -> None:
    op.execute(_REPAIR)


def downgrade() -> None:
    pass
