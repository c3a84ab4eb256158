"""The drift chart's arithmetic (:mod:`ledger.drift`): the in-control average run length of the OODM
EWMA, simulated with the chart's own step function, agrees with the Brook-Evans Markov chain of
:func:`ledger.drift.ewma_arl` for the configured lambda and L (the ARL the settings promise), and a
shifted source is caught within the chain's run length; the metadata read from headers."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import Dataset

from ledger.drift import DriftConfig, SeriesMetadata, ewma_arl, limits, oodm_step


def _simulated_arl(cfg: DriftConfig, *, shift: float, chains: int, seed: int) -> tuple[float, float]:
    """Mean run length of ``chains`` independent charts (and its standard error), every chart fed
    standard normal scores + ``shift`` through :func:`oodm_step` until it passes the control limit."""
    rng = np.random.default_rng(seed)
    limit = limits(cfg).oodm
    ewma = np.zeros(chains)
    run = np.zeros(chains, dtype=np.int64)
    alive = np.ones(chains, dtype=bool)
    steps = 0
    while alive.any():
        steps += 1
        idx = np.flatnonzero(alive)
        ewma[idx] = oodm_step(ewma[idx], rng.standard_normal(idx.size) + shift, cfg)
        done = idx[ewma[idx] > limit]
        run[done] = steps
        alive[done] = False
        assert steps < 200_000, "a chart that never alarms"
    return float(run.mean()), float(run.std(ddof=1) / np.sqrt(chains))


@pytest.mark.parametrize(("lam", "L"), [(0.2, 2.5), (0.2, 3.0), (0.1, 2.7)])
def test_in_control_arl_of_the_chart_is_the_configured_one(lam: float, L: float) -> None:
    cfg = DriftConfig(ewma_lambda=lam, limit_l=L, stop_l=L + 1.0)
    expected = ewma_arl(cfg)
    simulated, se = _simulated_arl(cfg, shift=0.0, chains=3000, seed=11)
    # the Markov chain's discretisation is well under 1 %; the simulation's standard error is about 2 %
    assert abs(simulated - expected) < 4.0 * se + 0.01 * expected, (simulated, se, expected)


def test_a_shift_is_caught_in_the_chains_run_length() -> None:
    cfg = DriftConfig()
    for shift in (1.0, 3.0):
        expected = ewma_arl(cfg, shift=shift)
        simulated, se = _simulated_arl(cfg, shift=shift, chains=3000, seed=3)
        assert abs(simulated - expected) < 4.0 * se + 0.02 * expected, (shift, simulated, expected)
    assert ewma_arl(cfg, shift=3.0) < 3.0 < 700 < ewma_arl(cfg)  # 3 sd caught within 3 studies on average


def test_limits_follow_lambda_and_L() -> None:
    lim = limits(DriftConfig(ewma_lambda=0.2, limit_l=3.0, stop_l=4.5, rate_lambda=0.05))
    assert lim.oodm == pytest.approx(3.0 * (0.2 / 1.8) ** 0.5)
    assert lim.stop_oodm == pytest.approx(4.5 * (0.2 / 1.8) ** 0.5)
    assert lim.rate_sigma == pytest.approx((0.05 / 1.95) ** 0.5)
    with pytest.raises(ValueError, match="stop limit"):
        DriftConfig(limit_l=3.0, stop_l=3.0)


def test_series_metadata_from_headers() -> None:
    ds = Dataset()
    ds.StationName, ds.Manufacturer, ds.ManufacturerModelName = "CT-EAST", "ACME", "Scan 64"
    ds.SoftwareVersions = ["VA40", "syngo CT"]
    ds.SliceThickness, ds.PixelSpacing, ds.KVP, ds.ConvolutionKernel = "1.25", ["0.7", "0.7"], "120", ["Br40", "3"]
    meta = SeriesMetadata.from_headers([ds], modality="CT", spacing=(1.0, 0.5, 0.5))
    assert meta == SeriesMetadata(station_name="CT-EAST", manufacturer="ACME", manufacturer_model="Scan 64",
                                  software_versions="VA40\\syngo CT", modality="CT", slice_thickness=1.25,
                                  pixel_spacing=0.7, kvp=120.0, convolution_kernel="Br40\\3")
    bare = SimpleNamespace(KVP="not a number", StationName="")  # as a lenient read gives it back
    assert SeriesMetadata.from_headers([bare], modality="MR", spacing=(3.0, 1.5, 1.5)) == SeriesMetadata(
        modality="MR", pixel_spacing=1.5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"drift_limit_l": 4.0, "drift_stop_l": 3.5}, "drift_stop_l (3.5) must be above drift_limit_l (4.0)"),
    ({"drift_baseline_since": "2026-01-01T00:00:00Z"}, "drift_baseline_since needs drift_baseline_until"),
    ({"drift_notify_url": "file:///etc/passwd"}, "drift_notify_url must be an http(s) URL"),
    ({"drift_baseline_studies": 1}, "SPECGATE_DRIFT_BASELINE_STUDIES: Input should be greater than or equal to 2"),
])
def test_settings_refuse_nonsense(tmp_path, overrides: dict, message: str) -> None:
    from specgate.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.load(data_dir=tmp_path, **overrides)


def test_settings_build_the_drift_config(tmp_path) -> None:
    from specgate.settings import Settings

    s = Settings.load(data_dir=tmp_path, drift_baseline_studies=12, drift_limit_l=2.5, drift_stop_l=5.0,
                      drift_notify_url="https://hooks.example/drift")
    cfg = s.drift_config()
    assert (cfg.baseline_studies, cfg.limit_l, cfg.stop_l, cfg.notify_url) == (12, 2.5, 5.0, "https://hooks.example/drift")
    assert s.worker_config().pipeline.drift == cfg
