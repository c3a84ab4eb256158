"""The calibration experiment (paper Table II) at its ``tiny`` scale through the CLI, the report helpers
against hand-computed values, and the hard phantoms."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from model.data.hard import DIFFICULTIES, Difficulty, difficulty, hard_case
from model.data.phantoms import phantom_case
from model.experiments import calibration
from model.experiments.report import (
    bootstrap_ci,
    jsonable,
    markdown_table,
    mean_sd,
    paired_t,
    write_report,
)

# ----------------------------------------------------------------------------------------------------
# report helpers, against values worked out by hand


def test_mean_sd_by_hand() -> None:
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; sample variance 5 / 3
    mu, sd, n = mean_sd([1.0, 2.0, 3.0, 4.0, None, float("nan")])  # type: ignore[list-item]
    assert (mu, n) == (2.5, 4)
    assert sd == pytest.approx(math.sqrt(5 / 3), abs=1e-12)
    assert mean_sd([]) == (pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True), 0)
    assert math.isnan(mean_sd([7.0])[1])


def test_paired_t_by_hand() -> None:
    a, b = [0.80, 0.82, 0.85, 0.90], [0.78, 0.80, 0.84, 0.86]
    # differences 0.02 0.02 0.01 0.04: mean 0.0225; deviations -0.0025 -0.0025 -0.0125 0.0175;
    # sum of squares 4.75e-4, sample sd sqrt(4.75e-4 / 3); t = mean / (sd / sqrt(4))
    sd = math.sqrt(4.75e-4 / 3)
    t_hand = 0.0225 / (sd / 2)
    r = paired_t(a, b)
    assert r.t == pytest.approx(t_hand, rel=1e-9)
    assert r.n == 4 and r.mean_diff == pytest.approx(0.0225)
    # two-sided p from Student's t with 3 degrees of freedom: 2 * (1 - F(t)), F from its closed form
    p_hand = 1 - (2 / math.pi) * (math.atan(t_hand / math.sqrt(3)) + math.sqrt(3) * t_hand / (3 + t_hand**2))
    assert r.p == pytest.approx(p_hand, rel=1e-9)
    assert 0.0 <= r.p <= 1.0


def test_paired_t_degenerate_cases() -> None:
    assert (paired_t([1, 2, 3], [1, 2, 3]).t, paired_t([1, 2, 3], [1, 2, 3]).p) == (0.0, 1.0)
    same_shift = paired_t([2, 3, 4], [1, 2, 3])
    assert same_shift.p == 0.0 and same_shift.t == math.inf
    assert math.isnan(paired_t([1.0], [2.0]).p)
    assert paired_t([1.0, float("nan"), 3.0, 4.0], [0.0, 1.0, 1.0, 3.5]).n == 3  # the NaN pair is left out
    with pytest.raises(ValueError, match="differ in length"):
        paired_t([1, 2], [1, 2, 3])


def test_bootstrap_ci_contains_the_mean_for_a_fixed_seed() -> None:
    values = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.2, 0.65])
    lo, hi = bootstrap_ci(values, seed=7)
    assert lo < values.mean() < hi
    assert (lo, hi) == bootstrap_ci(values, seed=7)  # the seed fixes the resamples
    assert values.min() <= lo and hi <= values.max()
    assert bootstrap_ci([3.0, 3.0]) == (3.0, 3.0)


def test_report_markdown_is_made_from_the_json_on_disk(tmp_path: Path) -> None:
    seen = {}

    def render(data: dict) -> str:
        seen.update(data)
        return markdown_table(["x"], [[str(data["x"])]])

    js, md = write_report(tmp_path, "demo", {"x": np.float32(0.5), "missing": float("nan")}, render)
    assert json.loads(js.read_text()) == {"x": 0.5, "missing": None} == seen
    assert md.read_text() == "| x |\n| --- |\n| 0.5 |\n"
    assert jsonable((np.int64(3), [np.inf])) == [3, [None]]


# ----------------------------------------------------------------------------------------------------
# hard phantoms


def test_hard_case_is_a_pure_function_and_harder() -> None:
    a = hard_case("mr_prostate", 5, 2, "hard")
    b = hard_case("mr_prostate", 5, 2, "hard")
    base = phantom_case("mr_prostate", 5, 2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.image.shape == base.image.shape and a.spacing == base.spacing
    assert not np.array_equal(a.label, base.label)  # the boundary jittered
    lab = base.label.astype(bool)
    ring = ndimage.binary_dilation(lab, iterations=2) & ~lab
    step = lambda img: abs(np.median(img[lab]) - np.median(img[ring]))  # noqa: E731
    assert step(a.image) < 0.6 * step(base.image)  # lower contrast
    std = hard_case("mr_prostate", 5, 2, "standard")
    assert np.array_equal(std.image, base.image)


def test_difficulty_levels_are_validated() -> None:
    assert difficulty(0) == DIFFICULTIES["standard"]
    assert difficulty(1.0) == DIFFICULTIES["hard"]
    with pytest.raises(ValueError, match="neither a level"):
        difficulty(1.5)
    with pytest.raises(ValueError, match="contrast must be in"):
        Difficulty(contrast=0.0)


# ----------------------------------------------------------------------------------------------------
# the experiment through the CLI

_CELL = re.compile(r"^(\*\*)?(-?\d+\.\d+|-) ± (-?\d+\.\d+|-)(\*\*)?$")


def _parse_table(md: str) -> list[list[str]]:
    """The first Markdown table's body rows, cells stripped."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Training"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _shown(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def test_tiny_scale_through_the_cli(tmp_path: Path) -> None:
    from specgate.cli import main

    out = tmp_path / "calib"
    res = CliRunner().invoke(main, ["model", "experiment", "calibration", "--scale", "tiny", "--out", str(out),
                                    "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output  # (its time is the report's to say, not a test's to assert)

    data = json.loads((out / "calibration.json").read_text())
    md = (out / "calibration.md").read_text()
    kinds = [k for k, _ in calibration.SCALES["tiny"].cases]
    assert list(data["summary"]) == kinds
    assert len(data["scale"]["seeds"]) >= 2 and data["scale"]["folds"] == 3
    # every case of every dataset is tested once per seed by each model
    n_cases = sum(n for _, n in calibration.SCALES["tiny"].cases)
    assert len(data["rows"]) == 2 * n_cases * len(data["scale"]["seeds"])
    # every model had the same step budget
    assert {r["iterations"] for r in data["runs"]} == {data["scale"]["iterations"]}

    # the table's numbers are the JSON's, rounded to the JSON's decimals
    rows = _parse_table(md)
    assert len(rows) == 2 * len(kinds)
    dec = data["decimals"]
    for row in rows:
        model = "single" if row[0].startswith("one model per") else "multi"
        k = row[1]
        summ = data["summary"][k]
        assert int(row[2]) == summ["n_cases"]
        for cell, metric in zip(row[3:], calibration.METRICS, strict=True):
            m = _CELL.match(cell)
            assert m, cell
            e = summ[metric][model]
            assert m.group(2) == _shown(e["mean"], dec[metric])
            assert m.group(3) == _shown(e["sd"], dec[metric])
            assert bool(m.group(1)) == (summ[metric]["better"] == model)
    # the p-values are probabilities, and the ones in the text are the JSON's
    for k in kinds:
        for metric in calibration.METRICS:
            p = data["summary"][k][metric]["t_test"]["p"]
            assert p is None or 0.0 <= p <= 1.0
            if p is not None:
                assert f"p={p:.4f}" in md
    # the band is stated in millimetres too
    assert "mm" in md and set(data["band_mm"]) == set(kinds)
    # reliability diagrams, one per dataset
    for k in kinds:
        png = out / f"reliability_{k}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "calibration.md" in res.output
    assert "--scale tiny --seeds 0,1" in md

    # --report-only makes the same Markdown and the diagrams again from the JSON alone
    (out / "calibration.md").unlink()
    for k in kinds:
        (out / f"reliability_{k}.png").unlink()
    again = CliRunner().invoke(main, ["model", "experiment", "calibration", "--out", str(out), "--report-only"],
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert (out / "calibration.md").read_text() == md
    assert all((out / f"reliability_{k}.png").is_file() for k in kinds)


def test_seeds_option_is_validated(tmp_path: Path) -> None:
    from specgate.cli import main

    res = CliRunner().invoke(main, ["model", "experiment", "calibration", "--scale", "tiny", "--out",
                                    str(tmp_path), "--seeds", "1,1"])
    assert res.exit_code == 2 and "distinct non-negative integers" in res.output
