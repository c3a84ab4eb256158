"""The ``specgate`` command: the composition root. Settings are built here, once, and passed down."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import (
    _cli_config,
    _cli_db,
    _cli_dicom,
    _cli_drift,
    _cli_export,
    _cli_health,
    _cli_jobs,
    _cli_model,
    _cli_report,
    _cli_review,
    _cli_spool,
    _cli_studies,
    _cli_worker,
)
from ._context import AppContext, pass_app
from .settings import Settings, SettingsError

__all__ = ["AppContext", "main"]

log = logging.getLogger("specgate")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pynetdicom logs identifiers (patient names/IDs) at DEBUG; never let it.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLevelName(level)))
    # ... and a C-FIND/C-MOVE/C-GET's request and response identifiers at INFO (an archive's answer may
    # carry the patient's name; dicom_node.archive asks by accession number): its own switches, off here,
    # at the composition root, once per process.
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file with settings (environment variables SPECGATE_* override it).")
@click.version_option(package_name="specgate")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """specgate: a clinical AI worker beside the PACS.

    It receives CT/MR studies over DICOM, segments them with a 3D CNN, checks each result with a spectral
    out-of-distribution gate, sends confident DICOM-SEG results back, holds the others for review, and
    keeps an append-only audit trail of every step.
    """
    try:
        settings = Settings.load(config_file)
    except SettingsError as exc:
        raise click.UsageError(f"configuration refused:\n{exc}") from exc
    _configure_logging(settings.log_level)
    app = AppContext(settings)
    ctx.obj = app
    ctx.call_on_close(app.close)


# ---------------------------------------------------------------------------------------------- db
@main.group()
def db() -> None:
    """Create or change the ledger's schema (Alembic migrations)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_app
def db_upgrade(app: AppContext, revision: str) -> None:
    """Migrate the ledger up to REVISION (default: head)."""
    from ledger import migrations

    migrations.upgrade(app.settings.db_url, revision)
    click.echo(f"ledger at revision {migrations.current_revision(app.engine)}")


@db.command("downgrade")
@click.argument("revision")
@pass_app
def db_downgrade(app: AppContext, revision: str) -> None:
    """Migrate the ledger down to REVISION (e.g. 0001, or 'base' to remove everything)."""
    from ledger import migrations

    migrations.downgrade(app.settings.db_url, revision)
    click.echo(f"ledger at revision {migrations.current_revision(app.engine) or 'base'}")


@db.command("current")
@pass_app
def db_current(app: AppContext) -> None:
    """Print the ledger's current revision and the newest one this version knows."""
    from ledger import migrations

    click.echo(f"current: {migrations.current_revision(app.engine) or 'base'}  head: {migrations.head_revision()}")


@db.command("relativize-paths")
@pass_app
def db_relativize_paths(app: AppContext) -> None:
    """Rewrite the absolute file paths that earlier versions stored (spool, results, KOS) as paths relative
    to the data dir, where they lie inside it; those outside it are left and still read as they are."""
    from ledger.paths import relativize

    counts = relativize(app.sessions(), app.data_dir, actor="cli:db relativize-paths")
    click.echo("rows rewritten: " + ", ".join(f"{k} {n}" for k, n in counts.items()))


# ------------------------------------------------------------------------------------------- audit
@main.group()
def audit() -> None:
    """The append-only audit trail."""


@audit.command("verify")
@pass_app
def audit_verify(app: AppContext) -> None:
    """Walk the hash chain; exit 1 naming the first event that does not verify."""
    from ledger import audit as ledger_audit

    with app.sessions()() as session:
        result = ledger_audit.verify(session)
    click.echo(result.describe())
    if not result.ok:
        sys.exit(1)


# -------------------------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--timeout", default=900.0, show_default=True, help="Give up after this many seconds.")
@pass_app
def demo(app: AppContext, timeout: float) -> None:
    """Run the whole product on embedded defaults: SCP, worker, gate, a local PACS, two studies.

    One study the shipped model knows is segmented, released and delivered; one of an organ it never saw
    is held for review. SQLite ledger and a filesystem broker in the data dir: no servers needed.
    """
    from ._demo import run_demo

    sys.exit(run_demo(app.settings, echo=click.echo, timeout_s=timeout))


# One way of registering commands: each module adds its own to ``main``.
for _commands in (_cli_config, _cli_db, _cli_jobs, _cli_worker, _cli_model, _cli_report, _cli_dicom, _cli_review,
                  _cli_health, _cli_spool, _cli_studies, _cli_drift, _cli_export):
    _commands.register(main)

if __name__ == "__main__":  # pragma: no cover
    main()
