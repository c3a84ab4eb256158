"""docs/evidence.md: every table in it is an experiment's report as the experiment wrote it."""

import importlib
from pathlib import Path

import pytest

from model.experiments.evidence import blocks
from model.experiments.report import read_json

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "evidence.md"


def test_the_evidence_embeds_reports():
    found = blocks(DOC.read_text())
    assert {Path(p).name for p, _ in found} >= {"calibration.md", "ood.md", "failures.md"}, [p for p, _ in found]


@pytest.mark.parametrize("path,body", blocks(DOC.read_text()) if DOC.exists() else [])
def test_each_embedded_report_is_its_file_and_the_file_is_the_render_of_its_json(path, body):
    md = ROOT / path
    assert body == md.read_text(), f"{path}: run `python -m model.experiments.evidence docs/evidence.md`"
    name = md.stem
    js = md.with_suffix(".json")
    assert js.is_file(), js
    module = importlib.import_module(f"model.experiments.{name}")
    assert module.render(read_json(js)) == md.read_text(), f"{path} is not what {js.name} renders"
