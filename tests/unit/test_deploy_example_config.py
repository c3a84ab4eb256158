"""``deploy/specgate.example.toml`` is generated from the settings model (``specgate config example``): the
committed file must be what the model generates now, it lists every setting, and loading it gives exactly
the defaults except the example values it sets on purpose (so each commented default is the truth)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from click.testing import CliRunner

from specgate._cli_config import EXAMPLES, REGENERATE, example_toml
from specgate.cli import main
from specgate.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "specgate.example.toml"
_KEY = re.compile(r"^(?:# )?([a-z_][a-z0-9_]*)(?: = |: see the tables)", re.MULTILINE)


def _blocks(text: str) -> dict[str, str]:
    """Each setting's block (its comment and its line), by setting name; '(header)' and '(tables)' too."""
    out: dict[str, str] = {}
    for i, block in enumerate(text.split("\n\n")):
        names = [n for n in _KEY.findall(block) if n in Settings.model_fields]
        key = names[-1] if names else f"(block {i})"
        out[key] = out.get(key, "") + block
    return out


def differing_settings(committed: str, generated: str) -> list[str]:
    """The settings (or other blocks) whose text differs between the two files, missing or added."""
    old, new = _blocks(committed), _blocks(generated)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def test_the_committed_example_is_what_the_settings_model_generates() -> None:
    committed, generated = EXAMPLE.read_text(encoding="utf-8"), example_toml()
    if committed != generated:
        raise AssertionError(f"deploy/specgate.example.toml differs from the settings model for: "
                             f"{', '.join(differing_settings(committed, generated))}. Regenerate it: {REGENERATE}")


def test_a_stale_example_is_named_by_its_setting() -> None:
    generated = example_toml()
    stale = generated.replace("# scp_port = 11112", "# scp_port = 104")
    assert differing_settings(stale, generated) == ["scp_port"]
    dropped = generated.replace("# scu_timeout = 30.0", "")
    assert "scu_timeout" in differing_settings(dropped, generated)


def test_every_setting_is_listed_with_its_environment_variable() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    listed = set(_KEY.findall(text))
    for name in Settings.model_fields:
        assert name in listed, f"{name} is not in deploy/specgate.example.toml ({REGENERATE})"
        assert f"SPECGATE_{name.upper()};" in text, name


def test_loading_the_example_gives_the_defaults_but_the_example_values(tmp_path: Path) -> None:
    loaded = Settings.load(EXAMPLE)
    examples = {k: tomllib.loads(f"v = {v}")["v"] for k, v in EXAMPLES.items()}
    expected = Settings.load(**examples, models=loaded.models, rules=loaded.rules,
                             review_hash_concurrency=loaded.review_hash_concurrency)
    differ = {k for k, v in loaded.model_dump().items() if expected.model_dump()[k] != v}
    assert not differ, f"the example sets {sorted(differ)} beyond its EXAMPLES and tables"
    assert [r.name for r in loaded.rules] == ["abdomen-ct", "any-ct-mr"] and "liver-v3" in loaded.models


def test_specgate_config_example_prints_and_writes_the_file(tmp_path: Path) -> None:
    printed = CliRunner().invoke(main, ["config", "example"], env={"SPECGATE_DATA_DIR": str(tmp_path)})
    assert printed.exit_code == 0 and printed.output == example_toml()
    target = tmp_path / "example.toml"
    written = CliRunner().invoke(main, ["config", "example", "-o", str(target)],
                                 env={"SPECGATE_DATA_DIR": str(tmp_path)})
    assert written.exit_code == 0, written.output
    assert target.read_text(encoding="utf-8") == example_toml()
