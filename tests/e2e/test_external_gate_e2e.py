"""The gate behind a model it did not come with (issue 19, "What must be shown", second bullet).

The model is the shipped MONAI bundle ``model/weights/monai_liver_ct``: a MONAI ``UNet`` trained by the
bundle's own ``configs/train.json`` (``python -m monai.bundle run``, ``model/weights/build_monai_bundle.py``)
on CT liver phantoms of its own seed, long enough to segment them. specgate knows nothing of it but its
files. A site registers it with the real CLI (``specgate model register --monai-bundle``), fits its bank
with ``specgate model fit-ood`` on the bundle's training images written as DICOM series and re-gridded
to the grids of the site's two CT scanners (``--like``, read from one series of each), and routes CT to
it; a second rule routes MR to it too (a misconfigured route, or a protocol the rule did not foresee).
Then held-out studies (phantom indices from 1000: never seen by the training or the bank) at clinical
scanner geometry (``model.data.clinical``: 512 x 512 CT, a 256-320 MR matrix, the field of view shifted)
go by C-STORE to a real ``specgate scp`` and are run by a real ``specgate worker``:

- two CT liver studies are **released** (OODM at or below tau), and the liver of the DICOM-SEG that
  reaches Orthanc overlaps the phantom's own liver (DSC >= 0.8 on the source grid);
- a chest CT (same modality, an anatomy the model never saw) is **held for its OODM** (above tau), and
  nothing of it reaches Orthanc;
- an MR study is **held** (its OODM above tau, or a modality the bank never saw: the evidence names which).

Every process runs torch on one thread; measured on a quiet 2-core machine: see the module's last print.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import highdicom
import numpy as np
import pytest
from pydicom import dcmread

from dicom_series import load_series
from model.data.clinical import clinical_case
from model.data.phantoms import phantom_case
from model.data.series_writer import SyntheticSeries, write_series
from model.scores import dice
from model.weights.build_monai_bundle import BUNDLE, HELD_OUT_FIRST, SEED
from tests.e2e.test_model_formats_e2e import one_thread, stack  # noqa: F401 (fixtures)
from tests.e2e.test_pipeline_e2e import Stack, _orthanc_id, _port_open, _result, _seg_uids_at
from tests.peers import wait_for

pytestmark = pytest.mark.slow

MODEL = "liver-ct"
#: training images in the bank (the bundle's first 12 of 24: the test's time), each also re-gridded to one
#: of the two scanners' grids that ``--like`` reads from series of other phantoms (indices 2000-2001)
BANK_IMAGES = 12
LIKE_INDICES = (2000, 2001)


def _cli(st: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "specgate", *args], env=st.env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _write(case_image: np.ndarray, spacing: tuple[float, float, float], modality: str, out: Path,
           description: str) -> SyntheticSeries:
    return write_series(case_image, spacing, modality, out, series_description=description, patient_id="TEST-E2E")


def _config(path: Path) -> Path:
    path.write_text("\n".join([
        "[[rules]]", 'name = "abdomen-ct"', 'modalities = ["CT"]', 'series_description = "^e2e "',
        f'model = "{MODEL}"', "min_slices = 16", "",
        "[[rules]]", 'name = "mr-to-the-ct-model"', 'modalities = ["MR"]', 'series_description = "^e2e "',
        f'model = "{MODEL}"', "min_slices = 16", ""]))
    return path


@pytest.mark.timeout(1200)
def test_the_gate_releases_held_out_liver_ct_and_holds_what_the_model_never_saw(stack: Stack, tmp_path: Path,  # noqa: F811
                                                                               one_thread: None) -> None:  # noqa: F811
    t0 = time.monotonic()
    reg = _cli(stack, "model", "register", MODEL, "--monai-bundle", str(BUNDLE))
    assert f"registered {MODEL}: monai-bundle" in reg.stdout and "labels: 1=liver" in reg.stdout, reg.stdout
    assert "layer: model.1;" in reg.stdout and "signature's layer" not in reg.stderr, reg.stdout + reg.stderr

    bank = tmp_path / "bank"
    for i in range(BANK_IMAGES):  # the bundle's own training images, as DICOM series
        c = phantom_case("ct_liver", SEED, i)
        _write(c.image, c.spacing, c.modality, bank / f"case{i:03d}", "liver-ct training")
    like = tmp_path / "like"  # one series from each of the site's two CT scanners: only their grids are read
    for k, index in enumerate(LIKE_INDICES):
        c, _ = clinical_case("ct_liver", SEED, index)
        _write(c.image, c.spacing, c.modality, like / f"scanner{k}", "a site scanner")
        del c
    fitted = _cli(stack, "model", "fit-ood", MODEL, "--data", str(bank), "--like", str(like), "--regrids", "1").stdout
    assert "the model is live" in fitted and f"bank of {2 * BANK_IMAGES} signatures" in fitted, fitted
    t_bank = time.monotonic()

    config = _config(tmp_path / "specgate.toml")
    stack.start("scp", "--config", str(config), "scp")
    wait_for(lambda: _port_open(stack.scp_port), timeout=60, what="specgate scp listening")
    stack.start("worker", "--config", str(config), "worker")

    studies: dict[str, tuple[SyntheticSeries, np.ndarray]] = {}
    for name, kind, index in (("liver-a", "ct_liver", HELD_OUT_FIRST), ("liver-b", "ct_liver", HELD_OUT_FIRST + 1),
                              ("chest", "ct_lung", HELD_OUT_FIRST), ("mr", "mr_prostate", HELD_OUT_FIRST)):
        case, geom = clinical_case(kind, SEED, index)
        series = _write(case.image, case.spacing, case.modality, tmp_path / name, f"e2e {name}")
        studies[name] = (series, case.label)
        print(f"{name}: {kind} {index} at {geom.shape} x {geom.spacing} mm")
        del case
    for series, _ in studies.values():
        assert set(stack.send(series.paths)) == {0}

    orthanc = stack.orthanc
    assert orthanc is not None
    for name in ("liver-a", "liver-b"):
        series, truth = studies[name]
        job = stack.wait_state(series.study_instance_uid, {"sent", "held", "failed"}, timeout=600)
        res = _result(stack, job.id)
        evidence = json.loads(stack.file(str(res.evidence_path)).read_text())
        assert str(job.state) == "sent" and not res.is_ood, (name, job.state, res.oodm, res.tau, job.reason_code)
        assert evidence["gate_reason"] is None and res.oodm <= res.tau
        raw = orthanc.get(f"/instances/{_orthanc_id(orthanc, res.seg_sop_instance_uid)}/file")
        seg = highdicom.seg.Segmentation.from_dataset(dcmread(io.BytesIO(raw)))
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver"]
        volume = load_series(series.paths)
        liver = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in volume.slices],
                                                  assert_missing_frames_are_empty=True)[..., 0].astype(bool)
        score = dice(liver, truth)
        assert score >= 0.8, f"{name}: the released liver has DSC {score:.3f} against the phantom's"
        print(f"{name}: released, OODM {res.oodm / res.tau:.2f} tau, liver DSC {score:.3f}")

    for name, reasons in (("chest", {"oodm_above_tau"}), ("mr", {"oodm_above_tau", "modality_not_in_bank"})):
        series, _ = studies[name]
        job = stack.wait_state(series.study_instance_uid, {"sent", "held", "failed"}, timeout=600)
        res = _result(stack, job.id)
        evidence = json.loads(stack.file(str(res.evidence_path)).read_text())
        assert str(job.state) == "held" and res.is_ood, (name, job.state, res.oodm, res.tau, job.reason_code)
        assert evidence["gate_reason"] in reasons, (name, evidence["gate_reason"])
        assert _seg_uids_at(orthanc, series.study_instance_uid) == []
        print(f"{name}: held ({evidence['gate_reason']}), OODM {res.oodm / res.tau:.2f} tau")
    print(f"registered + bank {t_bank - t0:.0f} s, studies {time.monotonic() - t_bank:.0f} s")
