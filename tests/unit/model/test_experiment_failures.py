"""The failure experiment: its design choice on synthetic spectra, and its tiny scale through the CLI."""

import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from model.experiments.failures import SHIPPABLE, Design, FittedDesign, choose, signature


def _row(kind, index, good_layer_spectrum, other_spectrum, dsc, variant=-1, clean=True, n=1000):
    """A case whose 'encoders.0' spectrum is given and whose 'decoders.2' spectrum is the same for all."""
    row = {"kind": kind, "index": index, "variant": variant, "dsc": dsc, "clean_known": clean}
    for layer, s in (("encoders.0", good_layer_spectrum), ("decoders.2", other_spectrum)):
        row[layer] = {"canvas": list(s), "body": list(s), "n_canvas": n, "n_body": n // 2}
    return row


def _spectrum(rng, tilt):
    base = np.exp(-np.arange(6) * (1.0 + tilt))
    return base * np.exp(rng.normal(scale=0.01, size=6))


def test_choose_takes_the_layer_that_separates_failures_from_good_studies():
    rng = np.random.default_rng(0)
    def same():  # the decoder's spectrum: one distribution for every case
        return _spectrum(rng, 0.0)

    bank = [_row("ct_liver" if i % 2 else "mr_prostate", i, _spectrum(rng, 0.0), same(), 0.99) for i in range(12)]
    good = [_row("mr_prostate", 1000 + i, _spectrum(rng, 0.0), same(), 0.95) for i in range(6)]
    bad = [_row("mr_prostate", 1100 + i, _spectrum(rng, 0.8), same(), 0.05, clean=False) for i in range(6)]
    pick, table = choose(bank, good + bad, ["encoders.0", "decoders.2"], n_boot=50)
    assert pick.layer == "encoders.0" and pick.layer in SHIPPABLE
    best = table[0]
    assert best["j"] == pytest.approx(2.0) and best["held_bad"] == 1.0 and best["released_good"] == 1.0
    assert [t["j"] for t in table] == sorted((t["j"] for t in table), reverse=True)
    # ties broken towards the paper's C, a pooled threshold, the re-gridded bank
    assert (pick.c, pick.threshold, pick.bank) == (2.5, "pooled", "regridded")
    # the decoder, blind to the difference here, releases most bad studies
    dec = FittedDesign(Design("decoders.2", "mean", "canvas", "regridded", "pooled", 2.5), bank)
    assert sum(dec.ratio(r) > 1.0 for r in bad) <= 1


def test_sum_spectrum_is_the_mean_one_scaled_by_the_voxel_count():
    s = np.array([3.0, 2.0, 1.0, 0.5])
    row = {"encoders.0": {"canvas": list(s), "n_canvas": 400}}
    summed = signature(row, "encoders.0", "sum", "canvas")
    log = np.log(s * 20.0)  # sqrt(400)
    np.testing.assert_allclose(summed, log / np.linalg.norm(log))
    centred = signature(row, "encoders.0", "centred", "canvas")
    c = np.log(s) - np.log(s).mean()
    np.testing.assert_allclose(centred, c / np.linalg.norm(c))
    # a gain on the feature map leaves the centred signature alone, not the mean one
    gained = {"encoders.0": {"canvas": list(s * 1.25), "n_canvas": 400}}
    np.testing.assert_allclose(signature(gained, "encoders.0", "centred", "canvas"), centred)
    assert np.linalg.norm(signature(gained, "encoders.0", "mean", "canvas")
                          - signature(row, "encoders.0", "mean", "canvas")) > 1e-3


def test_tiny_scale_through_the_cli(tmp_path):
    """The tiny scale on the shipped weights: the report's tables are the JSON's numbers."""
    from specgate.cli import main

    out = tmp_path / "f"
    res = CliRunner().invoke(main, ["model", "experiment", "failures", "--scale", "tiny", "--out", str(out), "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "failures.json").read_text())
    md = (out / "failures.md").read_text()
    assert (out / "failures_scatter.png").stat().st_size > 1000
    assert data["n"] == {"bank": 6, "validation": 7, "test": 7}
    assert data["chosen"]["design"]["layer"] in SHIPPABLE
    assert f"**Chosen on validation:** {data['chosen']['label']}." in md
    assert all(5000 <= c["index"] < 9000 for c in data["cases"])  # reported on the test range only
    for name, r in data["results"].items():
        t = r["test"]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        if t["n_bad"]:
            assert f"{100 * t['held_bad']:.0f} % ({100 * t['held_bad_ci'][0]:.0f}-{100 * t['held_bad_ci'][1]:.0f})" \
                   f" of {t['n_bad']}" in line
        auc = r["auc_test"]
        assert (f"| {auc:.3f} |" in line) if auc is not None and math.isfinite(auc) else "| - |" in line
        # each case's ratio is the one the row's category summary counts
        held = sum(c[f"ratio_{name.replace(' ', '_')}"] > 1 for c in data["cases"])
        assert held == sum(c["held"] for c in r["categories"])
    assert len(re.findall(r"^\| encoders\.\d|^\| decoders\.\d", md, re.M)) == 7  # the layer study: every stage
