"""What every ``specgate`` command gets: one typed :class:`AppContext` (the settings, the ledger engine
opened on first use, the models the ledger has registered), and :func:`pass_app`, the one way a command
asks for it.

Commands never read ``ctx.obj`` themselves: ``ctx.obj`` is ``Any`` to click, so a typo in an attribute
(``ctx.obj.data_dir`` where the settings hold it) was silently ``None`` and ``specgate model evaluate``
wrote its figures to the working directory. Through :func:`pass_app` the command's first argument is an
:class:`AppContext` and mypy checks every use.

Start-up checks that need the ledger live here too (:meth:`AppContext.check_routing`): the settings
alone cannot know which models the ledger has registered.
"""

from __future__ import annotations

import functools
import getpass
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import click

from .settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from dicom_node.config import SeriesRule
    from ledger.schema import RegisteredModel
    from store import Store
    from worker.config import ModelSpec, WorkerConfig

__all__ = ["AppContext", "StartupError", "app_context", "operator", "pass_app"]

P = ParamSpec("P")
R = TypeVar("R")


class StartupError(click.ClickException):
    """A process refuses to start; the message names the rule, the model, the setting."""


def operator() -> str:
    """Who runs this command, for the audit trail (``operator:<login>``)."""
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator:unknown"


@dataclass
class AppContext:
    """The settings, and the ledger engine opened on first use (closed with the command)."""

    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def files(self) -> Store:
        """Where instance files and results live (:mod:`store`, from the settings)."""
        from store import open_store

        return open_store(self.settings.store_config(), self.settings.data_dir)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from ledger.db import open_engine

            self._engine = open_engine(self.settings.db_url)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        from ledger.db import sessionmaker_for

        return sessionmaker_for(self.engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- the ledger's models ------------------------------------------------------------------------
    def registered_models(self) -> list[RegisteredModel]:
        """Every model registered in the ledger (read once per call; rows detached from their session)."""
        from sqlalchemy.exc import DBAPIError

        from ledger import models

        try:
            with self.sessions()() as session:
                return models.list_models(session)
        except DBAPIError as exc:
            detail = str(exc.orig or exc).splitlines()[0]
            raise click.ClickException(f"cannot read the registered models from the ledger: {detail} (is the "
                                       "ledger migrated? specgate db upgrade)") from exc

    def worker_config(self) -> WorkerConfig:
        """The settings' worker configuration with the ledger's live models added to its models.

        A registered model is served under its name, from the path it was registered with, with its hooked
        layer and its fitted bank. Only ``live`` models (bank fitted) are added: nothing can be routed to
        the others (:meth:`check_routing`). A settings model of the same name wins (registration refuses
        such names; the settings may have gained one since).
        """
        cfg = self.settings.worker_config()
        configured = {m.name for m in cfg.models}
        added = tuple(model_spec(row) for row in self.registered_models()
                      if row.name not in configured and row.bank_path is not None)
        return replace(cfg, models=cfg.models + added) if added else cfg

    def check_routing(self, models: Collection[str] | None = None) -> None:
        """Refuse to start while a rule selects a model that cannot judge its results.

        Each ``[[rules]]`` entry's ``model`` must be configured in the settings (``default``,
        ``SPECGATE_MODELS``) or registered in the ledger with a fitted OOD bank, whose file is there with
        the SHA-256 the ledger recorded (hashing a bank takes milliseconds). ``models``: only the rules that
        select one of these (a worker that serves them; None: every rule). Raises :class:`StartupError`
        naming every such rule and its model.
        """
        from worker.config import DEFAULT_MODEL

        configured = {DEFAULT_MODEL, *self.settings.models}
        wanted = [r for r in self.settings.rules
                  if r.model not in configured and (models is None or r.model in models)]
        if not wanted:
            return
        registered = {row.name: row for row in self.registered_models()}
        problems = self._label_problems(wanted, registered)
        for rule in wanted:
            row = registered.get(rule.model)
            if row is None:
                problems.append(
                    f"rule {rule.name!r} names model {rule.model!r}, which is neither configured (models: "
                    f"{', '.join(sorted(configured))}) nor registered in the ledger (registered: "
                    f"{', '.join(sorted(registered)) or 'none'})")
            elif row.bank_path is None or row.bank_sha256 is None:
                problems.append(
                    f"rule {rule.name!r} names model {rule.model!r}, which is registered without an OOD bank: "
                    "every result would be unjudged; fit one with "
                    f"'specgate model fit-ood {rule.model} --data DIR'")
            else:
                bank = _bank_problem(Path(row.bank_path), row.bank_sha256)
                if bank is not None:
                    problems.append(f"rule {rule.name!r} names model {rule.model!r}, whose OOD bank {bank}; fit "
                                    f"it again with 'specgate model fit-ood {rule.model} --data DIR'")
        if problems:
            raise StartupError("refusing to start: " + "; ".join(problems))

    @staticmethod
    def _label_problems(rules: Sequence[SeriesRule], registered: Mapping[str, RegisteredModel]) -> list[str]:
        """A rule that sends labels its registered model does not have, or whose names or codes cannot be
        written into a SEG (:func:`worker.segments.validate_rule_labels`)."""
        from model.adapters.base import Label
        from worker.segments import validate_rule_labels

        problems = []
        for rule in rules:
            row = registered.get(rule.model)
            if row is None:
                continue
            labels = [Label(int(v), str(n)) for v, n in sorted((row.labels or {}).items(), key=lambda kv: int(kv[0]))]
            codes = {str(n): (str(c[0]), str(c[1]), str(c[2])) for n, c in (row.codes or {}).items()}
            try:
                validate_rule_labels(rule, labels, codes=codes)
            except ValueError as exc:
                problems.append(str(exc))
        return problems


def _bank_problem(path: Path, sha256: str) -> str | None:
    """What is wrong with a registered model's bank file (gone, or not the one the ledger recorded)."""
    from model.ood import sha256_file

    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if actual != sha256:
        return f"{path} is not the one the ledger recorded (SHA-256 {actual}, recorded {sha256})"
    return None


def model_spec(row: RegisteredModel) -> ModelSpec:
    """The worker's :class:`worker.config.ModelSpec` of a registered model."""
    from worker.config import ModelSpec

    path = Path(row.path)
    options = row.settings.get("open_options") or {}
    return ModelSpec(row.name, weights=path if row.format == "segnet" else None,
                     bank=None if row.bank_path is None else Path(row.bank_path),
                     format=row.format, path=path, layer=row.layer,
                     options=tuple(sorted((str(k), str(v)) for k, v in options.items())),
                     codes=tuple(sorted((str(name), (str(c[0]), str(c[1]), str(c[2])))
                                        for name, c in (row.codes or {}).items())))


def app_context() -> AppContext:
    """The :class:`AppContext` of the running ``specgate`` command."""
    app = click.get_current_context().find_object(AppContext)
    if app is None:
        raise click.UsageError("this command needs the settings: run it as 'specgate ...'")
    return app


def pass_app(command: Callable[Concatenate[AppContext, P], R]) -> Callable[P, R]:
    """Decorate a command so that it receives the :class:`AppContext` as its first argument (typed)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return command(app_context(), *args, **kwargs)

    return run
