"""The OOD experiment (paper Tables V-VI, the layer study) at its ``tiny`` scale through the CLI, the
bootstrap interval of the AUC, and the per-stage signatures against the production one."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.data.phantoms import phantom_case
from model.experiments import ood
from model.layer_signatures import layer_names, layer_signatures, stage_strides
from model.study_inference import InferenceSettings, prepare_study, segment_volume
from model.unet import SegNet

# ----------------------------------------------------------------------------------------------------
# pieces


def test_auc_ci_by_hand() -> None:
    # perfectly separated groups: every resample has AUC 1
    assert ood.auc_ci([0.1, 0.2, 0.3], [0.7, 0.8], n_boot=50) == (1.0, 1.0)
    # one in-distribution score and one OOD score, tied: AUC 1/2 whatever is resampled
    assert ood.auc_ci([0.5], [0.5], n_boot=20) == (0.5, 0.5)
    # in = {0, 1}, out = {0.5}: a resample of `in` is {0,0} (AUC 1), {1,1} (0) or mixed (0.5)
    lo, hi = ood.auc_ci([0.0, 1.0], [0.5], n_boot=400, seed=3)
    assert (lo, hi) == (0.0, 1.0)
    assert ood.auc_ci([0.0, 1.0], [0.5], n_boot=400, seed=3) == (lo, hi)  # the seed fixes the resamples


def test_last_decoder_stage_is_the_production_signature() -> None:
    torch.manual_seed(0)
    net = SegNet(base_features=4, levels=3).eval()
    settings = InferenceSettings(block=16, overlap=4, spacing=(("CT", (8.0, 8.0, 8.0)),))
    case = phantom_case("ct_liver", 2026, 1000)  # validation range: a check of the code, not a reported figure
    sig = layer_signatures(net, prepare_study(case.image, case.spacing, case.modality, settings), settings)
    assert list(sig) == layer_names(net) == ["encoders.0", "encoders.1", "encoders.2", "decoders.0", "decoders.1"]
    assert stage_strides(net) == {"encoders.0": 1, "encoders.1": 2, "encoders.2": 4, "decoders.0": 2, "decoders.1": 1}
    prod = segment_volume(net, case.image, case.spacing, case.modality, settings).signature
    np.testing.assert_allclose(sig[settings.signature_layer], prod, atol=1e-9)
    # the paper's (and bank version 2's) stage, spectrum and voxels: the same agreement
    v2 = dataclasses.replace(settings, signature_layer="decoders.1", spectrum="mean", signature_voxels="body")
    sig2 = layer_signatures(net, prepare_study(case.image, case.spacing, case.modality, v2), v2)
    np.testing.assert_allclose(sig2["decoders.1"], segment_volume(net, case.image, case.spacing, case.modality,
                                                                  v2).signature, atol=1e-9)
    assert sig["encoders.2"].shape == (16,)
    for v in sig.values():
        assert np.linalg.norm(v) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# the experiment through the CLI

_CI = re.compile(r"^(-?\d+\.\d+|-) \[(-?\d+\.\d+|-), (-?\d+\.\d+|-)\]$")


def _table(md: str, first_header: str, nth: int = 0) -> list[list[str]]:
    """The body rows of the ``nth`` Markdown table whose first header cell is ``first_header``."""
    lines = md.splitlines()
    start = [i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |")][nth]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _shown(v: float | None, dec: int) -> str:
    return "-" if v is None else f"{v:.{dec}f}"


def _check_ci_cell(cell: str, entry: dict, dec: int) -> None:
    m = _CI.match(cell)
    assert m, cell
    assert m.group(1) == _shown(entry["value"], dec)
    assert (m.group(2), m.group(3)) == (_shown(entry["ci95"][0], dec), _shown(entry["ci95"][1], dec))


def test_tiny_scale_through_the_cli(tmp_path: Path) -> None:
    from specgate.cli import main

    out = tmp_path / "ood"
    res = CliRunner().invoke(main, ["model", "experiment", "ood", "--scale", "tiny", "--out", str(out),
                                    "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output  # (its time is the report's to say, not a test's to assert)

    data = json.loads((out / "ood.json").read_text())
    md = (out / "ood.md").read_text()
    dec = data["decimals"]
    assert data["methods"] == list(ood.METHODS)
    assert set(data["summary"]) == set(ood.METHODS) == set(data["fits"])
    # every OOD set and the in-distribution studies are there, and only TEST-range indices are reported
    groups = {r["group"] for r in data["rows"]}
    assert groups == {"in", *ood.GROUPS}
    assert all(5000 <= r["index"] < 9000 for r in data["rows"])
    assert all(i < 1000 for v in data["training"].values() for i in v)
    n_in = sum(r["group"] == "in" for r in data["rows"])
    # every model had the same step budget; the ensemble's first member is the base model (trained once)
    sc = data["scale"]
    assert {r["iterations"] for r in data["runs"]} == {sc["iterations"]}
    assert len(data["runs"]) == 3 + sc["ensemble"] - 1
    for m in ood.METHODS:
        e = data["summary"][m]
        assert e["n_in"] == n_in and e["n_out"] == len(data["rows"]) - n_in
        for k in ood.METRICS:
            lo, hi = e[k]["ci95"]
            assert 0.0 <= lo <= hi <= 1.0 and 0.0 <= e[k]["value"] <= 1.0
        assert set(e["per_group"]) == set(ood.GROUPS)
        assert all(0.0 <= g["auc"]["value"] <= 1.0 for g in e["per_group"].values())
        assert all(np.isfinite(r["scores"][m]) and r["seconds"][m] > 0 for r in data["rows"])
        # accuracy, sensitivity and specificity are the JSON's scores against the JSON's tau
        tau = data["fits"][m]["tau"]
        s_in = np.array([r["scores"][m] for r in data["rows"] if r["group"] == "in"])
        s_out = np.array([r["scores"][m] for r in data["rows"] if r["group"] != "in"])
        assert e["sensitivity"]["value"] == pytest.approx(np.mean(s_out > tau))
        assert e["specificity"]["value"] == pytest.approx(np.mean(s_in <= tau))

    # the main table's numbers are the JSON's
    rows = _table(md, "Method")
    assert [r[0] for r in rows] == [ood.LABELS[m] for m in ood.METHODS]
    for row, m in zip(rows, ood.METHODS, strict=True):
        for cell, k in zip(row[1:5], ood.METRICS, strict=True):
            _check_ci_cell(cell, data["summary"][m][k], dec)
        assert row[5] == f"{data['fits'][m]['tau']:.4g}"
        assert row[6] == _shown(data["summary"][m]["seconds_per_study"], 2)
    # the near-OOD table (Table VI's question) and the per-set AUCs are the JSON's too
    for row, m in zip(_table(md, "Method (near-OOD)"), ood.METHODS, strict=True):
        assert row[0] == ood.LABELS[m]
        for cell, k in zip(row[1:], ood.METRICS, strict=True):
            _check_ci_cell(cell, data["summary"][m]["per_group"]["near"][k], dec)
    for row, m in zip(_table(md, "Method", nth=1), ood.METHODS, strict=True):
        pg = data["summary"][m]["per_group"]
        assert row[1:] == [f"{_shown(pg[g]['auc']['value'], dec)} ({_shown(pg[g]['flagged'], dec)})"
                           for g in ood.GROUPS]
    # the layer study: one row per stage, the numbers the JSON's; the production stage scores exactly
    # what the spectral gate (fitted through model.evaluate.fit_bank) scores
    layers = _table(md, "Stage")
    assert [r["layer"] for r in data["layers"]] == ["encoders.0", "encoders.1", "decoders.0"]
    for row, r in zip(layers, data["layers"], strict=True):
        assert row[0].split()[0] == r["layer"]
        for cell, k in zip(row[3:], ood.METRICS, strict=True):
            _check_ci_cell(cell, r[k], dec)
    prod = next(r for r in data["layers"] if r["production"])
    assert prod["layer"] == data["inference"]["signature_layer"] == "encoders.0"  # bank version 3
    np.testing.assert_allclose(prod["scores"], [r["scores"]["spectral"] for r in data["rows"]], atol=1e-9)
    assert prod["tau"] == pytest.approx(data["fits"]["spectral"]["tau"], abs=1e-12)
    # histograms, one per method
    for m in ood.METHODS:
        assert (out / f"oodm_{m}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--scale tiny --seeds 0" in md and "ood.md" in res.output

    # --report-only makes the same Markdown and the histograms again from the JSON alone
    (out / "ood.md").unlink()
    for m in ood.METHODS:
        (out / f"oodm_{m}.png").unlink()
    again = CliRunner().invoke(main, ["model", "experiment", "ood", "--out", str(out), "--report-only"],
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert (out / "ood.md").read_text() == md
    assert all((out / f"oodm_{m}.png").is_file() for m in ood.METHODS)


def test_one_seed_only(tmp_path: Path) -> None:
    from specgate.cli import main

    with pytest.raises(ValueError, match="give one seed"):
        ood.run(ood.SCALES["tiny"], tmp_path, seeds=(0, 1), progress=False)
    res = CliRunner().invoke(main, ["model", "experiment", "ood", "--scale", "tiny", "--out", str(tmp_path),
                                    "--seeds", "0,1"])
    assert res.exit_code == 2 and "give one seed" in res.output
