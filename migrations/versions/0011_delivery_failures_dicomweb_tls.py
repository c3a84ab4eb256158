"""``v_delivery_failures`` tells DICOMweb and TLS failures apart (issue 21, items 3 and 4).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

A DICOMweb destination's delivery rows record the HTTP status of its STOW-RS request in ``last_status``
and have no AE title (``ae_title = ''``; a C-STORE destination always has one). Before this revision the
view showed an HTTP 401 as ``0x0191`` of class ``refused``, and a TLS handshake that failed as ``other``.
Now, for a STOW-RS row, ``status_hex`` is ``HTTP 401``-style and the class comes from the status and the
text :mod:`dicom_node.dicomweb` writes: ``authentication refused`` (401, 403, 407), ``server unavailable``
(5xx, 408, 425, 429), ``warning`` (202 with warnings only), ``refused`` (any other status), ``no
connection``, ``no response``; for every row, a failed TLS handshake (:func:`dicom_node.security.tls_reason`)
is ``tls certificate not verified`` (``tls_verify_failed: ...``, the peer's certificate) or ``tls refused``
(``tls_failed: ...``, the peer refused ours). C-STORE rows are classed as before.
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _day(ts: str) -> str:
    """As revision 0006: the UTC day of a timestamp as 'YYYY-MM-DD'."""
    return f"to_char({ts} AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if _pg() else f"date({ts})"


def _hex4(value: str) -> str:
    """As revision 0006: an integer as '0xA700' (NULL stays NULL)."""
    if _pg():
        return f"CASE WHEN {value} IS NULL THEN NULL ELSE '0x' || UPPER(LPAD(TO_HEX({value}), 4, '0')) END"
    return f"CASE WHEN {value} IS NULL THEN NULL ELSE printf('0x%04X', {value}) END"


# C-STORE, as revision 0006 (0xA700-0xA7FF = 42752-43007, 0xB000-0xBFFF = 45056-49151)
_DIMSE_CLASS = """
            WHEN d.last_status BETWEEN 42752 AND 43007 THEN 'out of resources'
            WHEN d.last_status = 1 OR d.last_status BETWEEN 45056 AND 49151 THEN 'warning'
            WHEN d.last_status IS NOT NULL AND d.last_status <> 0 THEN 'refused'
            WHEN d.last_error LIKE 'association rejected%' THEN 'association rejected'
            WHEN d.last_error LIKE 'could not connect%' THEN 'no connection'
            WHEN d.last_error LIKE 'association aborted%' THEN 'association aborted'
            WHEN d.last_error LIKE 'no C-STORE response%' THEN 'no response'
            WHEN d.last_error LIKE 'peer accepts no presentation context%' THEN 'no presentation context'"""

_STOW_CLASS = """
            WHEN d.last_status IN (401, 403, 407) THEN 'authentication refused'
            WHEN d.last_status >= 500 OR d.last_status IN (408, 425, 429) THEN 'server unavailable'
            WHEN d.last_error LIKE 'STOW-RS answered HTTP 202 (stored with warnings%' THEN 'warning'
            WHEN d.last_status IS NOT NULL THEN 'refused'
            WHEN d.last_error LIKE 'could not connect%' THEN 'no connection'
            WHEN d.last_error LIKE 'no STOW-RS response%' THEN 'no response'"""


def _view(error_class: str, status: str) -> str:
    return f"""
        CREATE VIEW v_delivery_failures AS
        SELECT d.id AS delivery_id, d.job_id, d.destination, d.ae_title, d.state, d.attempts, d.last_status,
               {status} AS status_hex,
               {error_class} AS error_class,
               {_day('d.updated_at')} AS day, d.updated_at, d.last_error
        FROM deliveries d
        WHERE d.state = 'failed' OR d.attempts > 1"""


def upgrade() -> None:
    stow = "d.ae_title = ''"
    status = (f"CASE WHEN d.last_status IS NULL THEN NULL WHEN {stow} THEN 'HTTP ' || CAST(d.last_status AS "
              f"VARCHAR(8)) ELSE {_hex4('d.last_status')} END")
    error_class = f"""CASE
            WHEN d.state = 'sent' THEN 'sent after retries'
            WHEN d.last_error LIKE 'tls_verify_failed%' THEN 'tls certificate not verified'
            WHEN d.last_error LIKE 'tls_failed%' THEN 'tls refused'
            WHEN {stow} THEN CASE{_STOW_CLASS}
                ELSE 'other' END{_DIMSE_CLASS}
            ELSE 'other'
        END"""
    op.execute("DROP VIEW IF EXISTS v_delivery_failures")
    op.execute(_view(error_class, status))


def downgrade() -> None:
    error_class = f"""CASE
            WHEN d.state = 'sent' THEN 'sent after retries'{_DIMSE_CLASS}
            ELSE 'other'
        END"""
    op.execute("DROP VIEW IF EXISTS v_delivery_failures")
    op.execute(_view(error_class, _hex4("d.last_status")))
