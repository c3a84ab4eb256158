"""A ledger with drift charts to look at (the reports page's banner and chart): three CT sources send
in-distribution studies (OODM = tau * exp(N(-1.0, 0.2)), the shipped model's phantoms' spread), then one
of them goes soft (OODM about 1.5 tau, as the e2e test's blurred phantoms measure) until its stop rule
fires. Rows written through :func:`ledger.drift.observe`, the worker's own path. Used by
``test_drift_browser.py`` and ``docs/screenshot_drift.py``."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from ledger import drift, jobs
from ledger.db import session_scope
from ledger.drift import DriftConfig, SeriesMetadata
from ledger.schema import Study

TAU = 0.0315
CFG = DriftConfig(baseline_studies=10)
SOURCES = {
    "CT_EAST": SeriesMetadata(station_name="CT-EAST-1", manufacturer="ACME", manufacturer_model="Scan 64",
                              software_versions="VA40", modality="CT", slice_thickness=1.25, pixel_spacing=0.7,
                              kvp=120.0, convolution_kernel="B30f"),
    "CT_WEST": SeriesMetadata(station_name="CT-WEST-1", manufacturer="ACME", manufacturer_model="Scan 128",
                              software_versions="VB20", modality="CT", slice_thickness=1.0, pixel_spacing=0.68,
                              kvp=100.0, convolution_kernel="Br40"),
    "CT_NORTH": SeriesMetadata(station_name="CT-NORTH-2", manufacturer="ACME", manufacturer_model="Scan 64",
                               software_versions="VA44", modality="CT", slice_thickness=1.25, pixel_spacing=0.7,
                               kvp=120.0, convolution_kernel="B30f"),
}


def observe(sessions: Any, ae: str, oodm: float, meta: SeriesMetadata | None = None) -> drift.Watch:
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", calling_ae=ae)
        s.add(study)
        s.flush()
        job_id = jobs.create_job(s, study, actor="test").id
        return drift.observe(s, job_id, model="default", meta=meta or SOURCES[ae], oodm=oodm, tau=TAU,
                             is_ood=oodm > TAU, cfg=CFG)


def seed_drift(sessions: Any, *, seed: int = 4, rounds_after: int = 12) -> int:
    """Baselines, then CT_EAST drifts until its stop alarm; returns that alarm's id."""
    rng = np.random.default_rng(seed)
    for _ in range(CFG.baseline_studies + rounds_after):
        for ae in SOURCES:
            observe(sessions, ae, TAU * math.exp(rng.normal(-1.0, 0.2)))
    for _ in range(20):
        observe(sessions, "CT_WEST", TAU * math.exp(rng.normal(-1.0, 0.2)))
        watch = observe(sessions, "CT_EAST", TAU * math.exp(rng.normal(0.4, 0.2)))
        if watch.stop_alarm_id is not None:
            return watch.stop_alarm_id
    raise AssertionError("CT_EAST never reached its stop limit")
