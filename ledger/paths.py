"""File paths in the ledger: relative to the data directory.

Every path column (``instances.spool_path``, ``results.seg_path``/``sr_path``/``prob_path``/
``evidence_path``, ``retractions.kos_path``) holds a POSIX path relative to the data directory, so the
SCP, a worker and the review app may each be started from any folder, and may each see the data (an NFS
share) under another mount point: each resolves the stored path against its own ``data_dir``.

:func:`to_ledger` is what every writer stores, :func:`from_ledger` what every reader opens. Rows written
by earlier versions hold absolute paths; :func:`from_ledger` returns those as they are, and
:func:`relativize` (``specgate db relativize-paths``) rewrites those inside the data directory.

``data_dir`` None (a component built without one, as some tests do): paths are stored and read as given.

>>> from pathlib import Path
>>> to_ledger(Path("/srv/data/spool/1.2/3.4/5.6.dcm"), Path("/srv/data"))
'spool/1.2/3.4/5.6.dcm'
>>> from_ledger("spool/1.2/3.4/5.6.dcm", Path("/mnt/data"))
PosixPath('/mnt/data/spool/1.2/3.4/5.6.dcm')
>>> from_ledger("/srv/data/results/seg.dcm", Path("/mnt/data"))
PosixPath('/srv/data/results/seg.dcm')
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["from_ledger", "relativize", "to_ledger"]


def to_ledger(path: str | PathLike[str], data_dir: Path | None) -> str:
    """``path`` as the ledger stores it: POSIX, relative to the resolved ``data_dir``.

    Raises ``ValueError`` naming both when ``path`` is not inside ``data_dir``."""
    if data_dir is None:
        return str(path)
    root = Path(data_dir).resolve()
    full = Path(path).resolve()
    try:
        rel = full.relative_to(root)
    except ValueError:
        raise ValueError(f"path {str(full)!r} is outside the data directory {str(root)!r}: "
                         "the ledger stores paths relative to it") from None
    return PurePosixPath(*rel.parts).as_posix()


def from_ledger(stored: str, data_dir: Path | None) -> Path:
    """The file a stored path names: a relative one under ``data_dir``, an absolute one (a row written by
    an earlier version) as it is."""
    p = Path(stored)
    if p.is_absolute() or data_dir is None:
        return p
    return Path(data_dir).resolve() / PurePosixPath(stored)


def relativize(sessions: sessionmaker[Session], data_dir: Path, *, actor: str, batch: int = 1000) -> dict[str, int]:
    """Rewrite the absolute paths of earlier versions that lie inside ``data_dir`` as relative ones (those
    outside it stay as they are); one audit event with the counts. Returns rows rewritten per column."""
    from sqlalchemy import select, update

    from . import audit
    from .db import session_scope
    from .schema import Instance, Result, Retraction

    root = Path(data_dir).resolve()
    counts: dict[str, int] = {}
    for model, name in ((Instance, "spool_path"), (Result, "seg_path"), (Result, "sr_path"),
                        (Result, "prob_path"), (Result, "evidence_path"), (Retraction, "kos_path")):
        column = getattr(model, name)
        done, last = 0, 0
        while True:
            with session_scope(sessions) as s:
                rows = s.execute(select(model.id, column).where(model.id > last, column.like("/%"))
                                 .order_by(model.id).limit(batch)).all()
                for row_id, stored in rows:
                    try:
                        relative = to_ledger(stored, root)
                    except ValueError:
                        continue
                    s.execute(update(model).where(model.id == row_id).values({name: relative}))
                    done += 1
            if len(rows) < batch:
                break
            last = rows[-1][0]
        counts[f"{model.__tablename__}.{name}"] = done
    with session_scope(sessions) as s:
        audit.append(s, actor=actor, action="ledger.paths_relativized", object_type="ledger", object_id="paths",
                     details={"data_dir": str(root), "rows": counts})
    return counts
