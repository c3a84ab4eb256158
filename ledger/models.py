"""The registry of the hospital's models (table ``models``): register, read, record a fitted OOD bank.

One module changes the table, and every change writes an audit event in the same transaction
(``model.registered``, ``model.bank_fitted``, ``model.shadowed``, ``model.promoted``): who registered which files (their SHA-256) and which bank
each model was judged by, from when. A model is ``registered`` until its bank is fitted, then ``live``;
only a live model may be routed to (a model without a bank would leave every result unjudged). Apart from
its state, a model may be *shadow* (silent mode, :mod:`ledger.shadow`): its rules' jobs run beside the live
ones and are never sent, until it is promoted.

Names are validated here, at the boundary, with the bad value in the message::

    >>> validate_name("liver-ct.v2")
    'liver-ct.v2'
    >>> validate_name("default")
    Traceback (most recent call last):
    ...
    ledger.models.ModelRegistryError: model name 'default' is reserved (the model of the settings' model_weights)
    >>> validate_name("my model")
    Traceback (most recent call last):
    ...
    ledger.models.ModelRegistryError: model name 'my model' is not allowed: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import audit
from .schema import ModelState, RegisteredModel, utcnow

__all__ = ["ModelRegistryError", "get", "list_models", "promote", "recorded_files", "register", "require",
           "set_bank", "set_shadow", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: names a registered model cannot take: "default" is the settings' own model (model_weights/model_bank)
RESERVED_NAMES = frozenset({"default"})


class ModelRegistryError(ValueError):
    """A registration or change refused: a bad or taken name, an unknown model, a bad hash."""


def validate_name(name: str) -> str:
    if name in RESERVED_NAMES:
        raise ModelRegistryError(f"model name {name!r} is reserved (the model of the settings' model_weights)")
    if not _NAME.fullmatch(name):
        raise ModelRegistryError(f"model name {name!r} is not allowed: 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
    return name


def _check_sha256(value: str, what: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ModelRegistryError(f"{what} {value!r} is not a lower-case hex SHA-256")
    return value


def get(session: Session, name: str) -> RegisteredModel | None:
    """The model registered as ``name``, or None."""
    return session.execute(select(RegisteredModel).where(RegisteredModel.name == name)).scalar_one_or_none()


def require(session: Session, name: str) -> RegisteredModel:
    """The model registered as ``name``; :class:`ModelRegistryError` naming the registered ones if none."""
    row = get(session, name)
    if row is None:
        known = ", ".join(m.name for m in list_models(session)) or "none"
        raise ModelRegistryError(f"no model is registered as {name!r} (registered: {known})")
    return row


def recorded_files(row: RegisteredModel) -> dict[str, Path]:
    """Where each file the registration hashed (``files_sha256``'s keys) lies on this machine, without
    opening the model: a key that names the registered path's own file is that file (a SegNet or TorchScript
    file); one that names a file an open option points at is that file (a TorchScript model's ``spec``);
    any other key is relative to the registered folder (a MONAI bundle's ``configs/...``, an nnU-Net
    folder's ``fold_0/...``), or to the registered file's folder. What a worker hashes at start-up to see
    that it would run the model that was registered (``specgate worker``).

        >>> from ledger.schema import RegisteredModel
        >>> row = RegisteredModel(path="/m/net.ts", files_sha256={"net.ts": "0", "spec.json": "0"},
        ...                       settings={"open_options": {"spec": "/specs/spec.json"}})
        >>> {k: str(v) for k, v in recorded_files(row).items()}
        {'net.ts': '/m/net.ts', 'spec.json': '/specs/spec.json'}
    """
    path = Path(row.path)
    named = {Path(str(v)).name: Path(str(v)) for v in ((row.settings or {}).get("open_options") or {}).values()}
    named[path.name] = path
    folder = path if path.is_dir() else path.parent
    return {rel: named.get(rel, folder / rel) for rel in row.files_sha256}


def list_models(session: Session) -> list[RegisteredModel]:
    """Every registered model, by name."""
    return list(session.execute(select(RegisteredModel).order_by(RegisteredModel.name)).scalars())


def register(session: Session, *, name: str, version: str, format: str, path: str,
             files_sha256: Mapping[str, str], labels: Mapping[int, str], layer: str,
             settings: Mapping[str, Any], actor: str, codes: Mapping[str, Any] | None = None) -> RegisteredModel:
    """Record a validated model (state ``registered``, no bank) and audit it, in the caller's transaction.

    Refuses a name that is taken (also by a concurrent registration: the unique name makes the second
    commit fail), a file hash that is not a SHA-256, and a model without files or labels.
    """
    validate_name(name)
    if not files_sha256:
        raise ModelRegistryError(f"model {name!r}: no files recorded")
    for rel, sha in files_sha256.items():
        _check_sha256(sha, f"model {name!r}: SHA-256 of {rel!r}")
    if not labels:
        raise ModelRegistryError(f"model {name!r}: the model declares no labels")
    for value in labels:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelRegistryError(f"model {name!r}: label value {value!r} is not a positive integer "
                                     "(0 is the background)")
    existing = get(session, name)
    if existing is not None:
        raise ModelRegistryError(
            f"a model named {name!r} is already registered ({existing.format} {existing.path}, version "
            f"{existing.version}, by {existing.registered_by} at {existing.registered_at:%Y-%m-%d %H:%M}); "
            "choose another name")
    row = RegisteredModel(
        name=name, version=version, format=format, path=path, files_sha256=dict(sorted(files_sha256.items())),
        labels={str(v): str(n) for v, n in sorted(labels.items())}, layer=layer, settings=dict(settings),
        codes=None if codes is None else dict(codes), state=ModelState.REGISTERED, registered_at=utcnow(),
        registered_by=actor[:128])
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # PostgreSQL: another registration of this name committed meanwhile
        raise ModelRegistryError(f"a model named {name!r} was registered by someone else just now; choose "
                                 "another name") from exc
    audit.append(session, actor=actor, action="model.registered", object_type="model", object_id=name,
                 details={"id": row.id, "version": version, "format": format, "path": path,
                          "files_sha256": row.files_sha256, "labels": row.labels, "layer": layer,
                          "codes": row.codes})
    return row


def set_bank(session: Session, name: str, *, bank_path: str, bank_sha256: str, actor: str,
             details: Mapping[str, Any] | None = None) -> RegisteredModel:
    """Record the OOD bank fitted for model ``name`` (replacing an earlier one) and make the model live.

    The audit event keeps the previous bank's hash, so which bank judged a study when stays answerable.
    ``details``: how the bank was fitted (number of signatures, tau, c, data folders), for the event.
    """
    _check_sha256(bank_sha256, f"model {name!r}: bank SHA-256")
    row = session.execute(select(RegisteredModel).where(RegisteredModel.name == name)
                          .with_for_update()).scalar_one_or_none()
    if row is None:
        require(session, name)  # raises, naming the registered models
        raise AssertionError("unreachable")
    previous = {"bank_path": row.bank_path, "bank_sha256": row.bank_sha256, "state": str(row.state)}
    row.bank_path, row.bank_sha256 = bank_path, bank_sha256
    row.state, row.bank_fitted_at = ModelState.LIVE, utcnow()
    session.flush()
    audit.append(session, actor=actor, action="model.bank_fitted", object_type="model", object_id=name,
                 details={"bank_path": bank_path, "bank_sha256": bank_sha256, "previous": previous,
                          **dict(details or {})})
    return row


def _locked(session: Session, name: str) -> RegisteredModel:
    row = session.execute(select(RegisteredModel).where(RegisteredModel.name == name)
                          .with_for_update()).scalar_one_or_none()
    return row if row is not None else require(session, name)  # require raises, naming the registered ones


def set_shadow(session: Session, name: str, *, actor: str, why: str | None = None) -> RegisteredModel:
    """Put model ``name`` in shadow (silent mode, :mod:`ledger.shadow`), audited ``model.shadowed``: the
    rules that name it make shadow jobs from the next study on. Refused if it is in shadow already."""
    row = _locked(session, name)
    if row.shadow:
        raise ModelRegistryError(f"model {name!r} is in shadow already")
    row.shadow = True
    session.flush()
    audit.append(session, actor=actor, action="model.shadowed", object_type="model", object_id=name,
                 details={"state": str(row.state), "why": why})
    return row


def promote(session: Session, name: str, *, actor: str, demote: str | None = None,
            why: str | None = None) -> RegisteredModel:
    """Make shadow model ``name`` live (its rules' next jobs are released or held by its gate, and sent),
    audited ``model.promoted`` with who. Refused unless it is in shadow and its bank is fitted. ``demote``:
    a registered model put in shadow in the same transaction (it goes on running beside, silent); the
    previously live model is otherwise left as it is (what its rules match decides what it still runs)."""
    row = _locked(session, name)
    if not row.shadow:
        raise ModelRegistryError(f"model {name!r} is not in shadow: nothing to promote")
    if row.state != ModelState.LIVE:
        raise ModelRegistryError(f"model {name!r} has no OOD bank: fit one with 'specgate model fit-ood {name} "
                                 "--data DIR' before it is promoted")
    if demote is not None:
        if demote == name:
            raise ModelRegistryError(f"model {name!r} cannot be promoted and put in shadow at once")
        set_shadow(session, demote, actor=actor, why=f"promotion of {name}")
    row.shadow = False
    session.flush()
    audit.append(session, actor=actor, action="model.promoted", object_type="model", object_id=name,
                 details={"version": row.version, "bank_sha256": row.bank_sha256, "demoted": demote, "why": why})
    return row
