"""The ``specgate`` command tree: every command registered once, through its module's ``register``, and
each one's help printed without settings errors or imports failing."""

from __future__ import annotations

import click
from click.testing import CliRunner

from specgate.cli import main


def _walk(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_walk(cmd, (*prefix, name)))
    return out


def test_every_command_is_registered_and_has_help() -> None:
    paths = _walk(main)
    expected = {("model", "register"), ("model", "list"), ("model", "fit-ood"), ("model", "evaluate"),
                ("model", "train"), ("model", "shadow"), ("model", "promote"), ("model", "experiment"), ("model", "experiment", "calibration"),
                ("model", "experiment", "ood"), ("model", "experiment", "failures"),
                ("jobs", "list"), ("jobs", "show"), ("jobs", "approve"), ("jobs", "reject"), ("jobs", "retry"), ("jobs", "retract"), ("worker",), ("reconcile",), ("scp",), ("echo",),
                ("review",), ("users", "add"), ("report",), ("db", "upgrade"), ("audit", "verify"), ("demo",),
                ("drift", "status"), ("drift", "clear"), ("export",)}
    assert expected <= set(paths), sorted(expected - set(paths))
    for path in paths:
        res = CliRunner().invoke(main, [*path, "--help"], catch_exceptions=False)
        assert res.exit_code == 0 and "Usage: main " + " ".join(path) in res.output, (path, res.output)
