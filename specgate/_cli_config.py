"""``specgate config example``: the example TOML file, generated from the settings model.

``deploy/specgate.example.toml`` lists every setting of :class:`specgate.settings.Settings`, in the order the
model declares them, each with its meaning (the field's description), its environment variable and its
default. Written by hand it drifted from the model (settings missing, defaults stale); generated, a test
(``tests/unit/test_deploy_example_config.py``) keeps the committed file equal to what the model says now and
names each setting that differs. Regenerate it with one command::

    specgate config example --output deploy/specgate.example.toml

A setting left at its default is shown commented out (``# key = default``); the few an installation must
set (:data:`EXAMPLES`: the database, the broker, who may send, where results go...) are shown set to an
example value, their default in the comment above. Tables (``[models.NAME]``, ``[[rules]]``) must follow
every plain key in TOML: their examples close the file (:data:`TABLES`).

    >>> toml_value(["CT", "MR"]), toml_value(None), toml_value(2.0), toml_value({"a": 1, "b": None})
    ('["CT", "MR"]', '(not set)', '2.0', '{ a = 1 }')
"""

from __future__ import annotations

import enum
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import click
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .settings import ENV_PREFIX, Settings

__all__ = ["EXAMPLES", "MACHINE_DEFAULTS", "REGENERATE", "TABLES", "example_toml", "register", "toml_value"]

REGENERATE = "specgate config example --output deploy/specgate.example.toml"

# Settings whose default depends on the machine: the file states the rule, not one machine's number.
MACHINE_DEFAULTS: Mapping[str, str] = {
    "review_hash_concurrency": "half the CPU cores, at least 1",
}

# What a production installation sets, as TOML text (each is checked by loading the file).
EXAMPLES: Mapping[str, str] = {
    "data_dir": '"/var/lib/specgate"',
    "database_url": '"postgresql+psycopg://specgate_svc@db.example.org/specgate"',
    "broker_url": '"redis://redis.example.org:6379/0"',
    "scp_host": '"0.0.0.0"',
    "allowed_callers": '["PACS_MAIN@10.1.2.3", "CT_SCANNER_1@10.1.5.20"]',
    "destinations": '["pacs=PACS_MAIN@10.1.2.3:104"]',
    "spool_disk_watermark_percent": "90",
    "installation_id": '"HOSPITAL-A-SPECGATE-1"',
}

HEADER = f"""\
# specgate configuration (specgate --config /etc/specgate/specgate.toml ...).
#
# GENERATED from the settings model (specgate/settings.py): do not edit by hand; regenerate with
#   {REGENERATE}
# Every setting is listed with its meaning, its environment variable and its default. A commented line
# (`# key = value`) shows the default; an uncommented one is an example value a production installation sets.
# Every key may also be set as an environment variable: SPECGATE_ + the key in upper case; the environment
# wins. An unknown key or a bad value stops start-up with a message naming it.
"""

TABLES = """\
# ==== tables: [models.NAME] and [[rules]] (TOML puts them after every plain key) ==========================

# More models, by name; a rule's `model` selects one ("default": model_weights/model_bank, or the shipped one).
# A rule may also select a model registered in the ledger (`specgate model register NAME --nnunet DIR ...`,
# then `specgate model fit-ood NAME --data DIR`): `specgate worker` and `specgate scp` refuse to start while
# a rule's model is neither configured here nor registered with a fitted OOD bank, naming the rule.
#
# What the SEG says a model's segment is belongs to the model: for a one-label model, its table's
# segment_label, segment_description, category_code and type_code (SNOMED CT: value, scheme, meaning) and
# display_color (RGB 0-255). Left out, they are the shipped model's: "Phantom organ", described as drawn by a
# model trained on synthetic phantoms only, "Anatomical Structure" / "Organ", orange. [models.default]
# describes model_weights (or the shipped model) and sets nothing else. A model with several labels names each
# segment after its label, coloured from a fixed palette and coded from the default table (worker/anatomy.py);
# a registered model is described by its own label names and the codes given to
# `specgate model register NAME ... --codes FILE`.
[models.liver-v3]
weights = "/var/lib/specgate/models/liver-v3.pt"
bank = "/var/lib/specgate/models/liver-v3-bank.npz"
segment_label = "Liver"
category_code = ["123037004", "SCT", "Anatomical Structure"]
type_code = ["10200004", "SCT", "Liver"]
# segment_description = "Liver parenchyma"
# display_color = [221, 130, 101]

# Which series are segmented, by which model. The first matching rule wins; a study with no match is recorded
# and left alone.
[[rules]]
name = "abdomen-ct"
modalities = ["CT"]
body_part = "ABDOMEN|LIVER"
min_slices = 16
model = "liver-v3"
# A model with several labels: which of them the SEG carries, by name (any case, "_" or " ") or value; leave
# it out to send all. Each label is then its own segment, named by the model. A name the model lacks stops
# start-up.
# labels = ["liver", "kidney_left", "kidney_right", 7]
# A series with any lossy compressed image (Lossy Image Compression "01", or received as JPEG Baseline or
# Extended, JPEG-LS near-lossless, JPEG 2000 or HTJ2K that allow loss) is not segmented: its job ends
# failed with reason lossy_source_refused. Off, such a series runs and its SEG says it was lossy.
# refuse_lossy = false

[[rules]]
name = "any-ct-mr"
modalities = ["CT", "MR"]
min_slices = 16
"""

# settings written as tables at the end of the file, not as `key = value`
_TABLE_SETTINGS = frozenset({"models", "rules"})


def toml_value(value: Any) -> str:
    """``value`` as TOML text (inline); ``None``, which TOML cannot write, as ``(not set)``."""
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | PurePath):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, BaseModel):
        return toml_value(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        items = [f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for a default of type {type(value).__name__}: {value!r}")


def _default_text(name: str) -> str:
    if name in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[name]
    field = Settings.model_fields[name]
    default = field.default if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
    if default is PydanticUndefined:
        raise ValueError(f"setting {name} has no default")
    return toml_value(default)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=108, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def example_toml() -> str:
    """The example file's text: every setting, its meaning, environment variable and default.

    Raises :class:`ValueError` naming a setting without a description (the file would not say what it means).
    """
    undescribed = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]
    if undescribed:
        raise ValueError("settings without a description (Field(description=...) in specgate/settings.py): "
                         + ", ".join(undescribed))
    blocks = [HEADER.rstrip("\n")]
    for name, field in Settings.model_fields.items():
        default = _default_text(name)
        lines = _comment(f"{name}: {field.description} ({ENV_PREFIX}{name.upper()}; default: {default})")
        if name in _TABLE_SETTINGS:
            lines.append(f"# {name}: see the tables at the end of this file")
        elif name in EXAMPLES:
            lines.append(f"{name} = {EXAMPLES[name]}")
        else:
            lines.append(f"# {name} = {default}")
        blocks.append("\n".join(lines))
    blocks.append(TABLES.rstrip("\n"))
    return "\n\n".join(blocks) + "\n"


@click.group("config")
def config_group() -> None:
    """specgate's settings."""


@config_group.command("example")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the file here (default: print it).")
def config_example(output: Path | None) -> None:
    """The example TOML file with every setting, its meaning and its default (deploy/specgate.example.toml
    is this command's output)."""
    try:
        text = example_toml()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output} ({len(Settings.model_fields)} settings)")


def register(main: click.Group) -> None:
    main.add_command(config_group)
