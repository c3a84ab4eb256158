"""The hospital's own model, in each external format, through the real services (issue 19, "What must be
shown", first bullet).

For each format (TorchScript, nnU-Net v2, MONAI bundle) a model made here with the format's own tools
(``tests/model_factories``; the TorchScript module is traced by torch), registered with the real CLI
(``specgate model register``), its bank fitted with ``specgate model fit-ood`` on phantom DICOM series, and
selected by a ``[[rules]]`` entry of a TOML configuration file. Two CT studies go by C-STORE to a real
``specgate scp`` process (a phantom on its own 4-5 mm grid, and a phantom at a scanner's geometry: 3 x 1.75
x 1.75 mm, 160 x 160, a shifted field of view), a real ``specgate worker`` process runs them, and the
DICOM-SEG of each that reaches Orthanc (read back over Orthanc's REST API) is checked:

- its label map, voxel for voxel on the source grid, equals the format's own prediction on the same
  images (the series as the worker loads it): TorchScript, the spec's recipe written out directly (the
  reference computation of ``tests/unit/model/test_adapter_torchscript.py``); nnU-Net, ``nnUNetPredictor``
  on a NIfTI of the series (its folds auto-detected, test-time mirroring, as the registered model runs);
  MONAI, the bundle run as its authors run it (``python -m monai.bundle run``). No resampling difference
  is allowed: every format is compared for exact equality, on both grids;
- dcmqi's ``segimage2itkimage`` reads it back, with one segment per label named as the model names it, and
  each segment's voxels placed where the label map has them;
- ``dciodvfy`` reports no error.

Whether the study is released or held depends on the bank fitted from a few phantoms: the test asserts the
decision agrees with OODM vs tau, and approves a held result (``specgate jobs approve``) so that it reaches
Orthanc (the approval re-encodes the SEG: it is that SEG which is compared). A third study, one of the
bank's own series, must come out released at OODM 0: ``fit-ood`` read it exactly as the worker does.

Every process runs torch on one thread (``OMP_NUM_THREADS=1``): the services and this test share two cores.
Measured on a quiet 2-core machine: 148 s for the file (TorchScript 21 s, nnU-Net 69 s, MONAI 40 s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import highdicom
import numpy as np
import pytest
import redis
from pydicom import dcmread

from dicom_series import Volume, load_series
from ledger.db import open_engine, sessionmaker_for
from model.data.phantoms import phantom_study
from specgate.synthetic import SyntheticSeries, write_series
from tests.e2e.test_pipeline_e2e import (
    CALLER,
    Stack,
    _orthanc_id,
    _port_open,
    _redis_db_url,
    _result,
    _seg_uids_at,
)
from tests.peers import Orthanc, free_port, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = "site-model"
#: the bank's training images: phantom CT liver studies (``phantom_study`` seeds), and the study sent
BANK_SEEDS = (21, 22, 23)
STUDY_SEED = 1
#: slices kept of each phantom (its centre), so that nnU-Net's 8 mirrored passes x 2 folds stay cheap
SLICES = 24
#: the second study's grid (z, y, x): thin slices, a finer matrix, its field of view shifted
CLINICAL_GEOMETRY = ((40, 160, 160), (3.0, 1.75, 1.75), (2.0, -3.0, 4.0))


# ------------------------------------------------------------------------------------------ the models
@dataclass(frozen=True)
class SiteModel:
    """A model as a site brings it: what ``register`` is given, the label names it declares (value ->
    name), and its format's own prediction of a loaded series (``reference(volume, workdir)``)."""

    register_args: tuple[str, ...]
    labels: dict[int, str]
    reference: Callable[[Volume, Path], np.ndarray]
    rule_labels: tuple[str, ...] | None = None  # a one-label model: the rule chooses it, so it is named
    inference: dict[str, object] = field(default_factory=dict)  # what the worker's evidence must record


def _torchscript(root: Path) -> SiteModel:
    """A TorchScript export (traced by torch) returning (logits, features), with hand-set weights so that
    its three classes all occur in a phantom: air, soft tissue (> -300 HU), dense (> ~80 HU: liver,
    spine), each decided on the 3^3 mean of the window-normalised image."""
    import torch
    from torch import nn

    from tests.unit.model.test_adapter_torchscript import SPEC, _reference

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.Conv3d(1, 4, 3, padding=1)
            self.head = nn.Conv3d(4, 3, 1)
            with torch.no_grad():
                self.mean.weight.fill_(1.0 / 27)
                self.mean.weight[2] *= -1.0
                self.mean.bias.copy_(torch.tensor([-0.35, -0.54, 0.35, 0.0]))
                self.head.weight.zero_()
                self.head.weight[0, 2] = 100.0
                self.head.weight[1, 0] = 100.0
                self.head.weight[2, 0], self.head.weight[2, 1] = 100.0, 1000.0
                self.head.bias.copy_(torch.tensor([0.0, 0.0, -0.5]))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = torch.relu(self.mean(x))
            return self.head(f), f

    root.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.trace(Dense().eval(), torch.zeros(1, 1, 8, 16, 16)), str(root / "tiny.ts"))
    spec = SPEC.replace('"liver", "rim"', '"soft_tissue", "dense_tissue"')
    assert spec != SPEC
    (root / "spec.toml").write_text(spec)

    def reference(volume: Volume, _work: Path) -> np.ndarray:
        module = torch.jit.load(str(root / "tiny.ts")).eval()
        per_class, _stitched, _body = _reference(module, volume.array, volume.spacing)
        return per_class.argmax(0).astype(np.uint8)

    return SiteModel(("--torchscript", str(root / "tiny.ts"), "--spec", str(root / "spec.toml")),
                     {1: "soft_tissue", 2: "dense_tissue"}, reference)


def _nnunet(root: Path) -> SiteModel:
    """nnU-Net's own planning and preprocessing, a short training of the network built from the plans
    (``tests/model_factories/nnunet_model.py``), fold 0 only: with the checkpoint's test-time mirroring
    (8 passes per window) a fold costs about 3 s a study here; fold ensembling is compared with
    ``nnUNetPredictor`` in ``tests/unit/model/test_nnunet_adapter.py``."""
    from tests.model_factories.nnunet_model import build_nnunet_model

    model_dir = build_nnunet_model(root, iterations=30, folds=1).model_dir

    def reference(volume: Volume, work: Path) -> np.ndarray:
        from tests.unit.model.test_nnunet_adapter import _own_prediction

        case = SimpleNamespace(image=volume.array, spacing=volume.spacing)
        return np.asarray(_own_prediction(model_dir, case, work / "nnunet", None), dtype=np.uint8)

    return SiteModel(("--nnunet", str(model_dir)), {1: "liver"}, reference, rule_labels=("liver",),
                     inference={"folds": [0], "mirrored_passes": 8})


def _monai(root: Path) -> SiteModel:
    """A MONAI bundle: the Model Zoo's layout, its UNet trained briefly (``tests/model_factories``)."""
    import nibabel as nib

    from tests.model_factories.monai_bundle import LABELS, write_bundle, write_nifti

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = write_bundle(root / "phantom_liver", iterations=32)

    def reference(volume: Volume, work: Path) -> np.ndarray:
        write_nifti(volume.array, volume.spacing, work / "monai" / "data" / "case.nii.gz")
        run = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
             "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
             "--dataset_dir", str(work / "monai" / "data"), "--output_dir", str(work / "monai" / "out")],
            capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        ref = nib.load(str(work / "monai" / "out" / "case_seg.nii.gz"))
        return np.asarray(ref.dataobj).transpose(2, 1, 0).astype(np.uint8)  # type: ignore[attr-defined]

    return SiteModel(("--monai-bundle", str(bundle)), {int(k): v for k, v in LABELS.items() if k != "0"}, reference)


MODELS: dict[str, Callable[[Path], SiteModel]] = {
    "torchscript": _torchscript, "nnunet-v2": _nnunet, "monai-bundle": _monai}


# ------------------------------------------------------------------------------------------ the stack
@pytest.fixture
def stack(tmp_path: Path, pg_url: str) -> Iterator[Stack]:
    """The e2e stack of ``test_pipeline_e2e`` (PostgreSQL, Redis, Orthanc as the destination), migrated,
    with no service started yet: the model must be registered and its bank fitted first, as a site does
    (the services refuse to start on a rule naming a model without a bank)."""
    broker_url = _redis_db_url()
    r = redis.Redis.from_url(broker_url)
    r.flushdb()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    scp_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "SPECGATE_DATA_DIR": str(tmp_path / "data"),
        "SPECGATE_DATABASE_URL": pg_url,
        "SPECGATE_BROKER_URL": broker_url,
        "SPECGATE_SCP_PORT": str(scp_port),
        "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
        "SPECGATE_DESTINATIONS": f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "SPECGATE_STUDY_QUIET_SECONDS": "2",
        "SPECGATE_WORKER_HEARTBEAT_SECONDS": "1",
        "SPECGATE_WORKER_STALE_SECONDS": "60",
        "SPECGATE_RECONCILE_INTERVAL_SECONDS": "2",
        "SPECGATE_SCU_BACKOFF_SECONDS": "0.2",
        "SPECGATE_SCU_TIMEOUT": "5",
        "SPECGATE_LOG_LEVEL": "DEBUG",
        # one torch thread a process: the scp, the worker and this test's reference runs share 2 cores, and
        # a 2-thread torch on a busy machine spins (a fit-ood measured at 47 s a case, 1.5 s when alone)
        "OMP_NUM_THREADS": "1",
    })
    engine = open_engine(pg_url)
    st = Stack(tmp_path, env, scp_port, orthanc, sessionmaker_for(engine))
    st.cli("db", "upgrade")
    try:
        yield st
    finally:
        for name in list(st.procs):
            st.kill(name, signal.SIGTERM)
        orthanc.stop()
        engine.dispose()
        r.flushdb()


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's torch and its children (the MONAI bundle's own run) on one thread, as the services."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(stack: Stack, *args: str, timeout: float = 300) -> str:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "specgate", *args], env=stack.env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"specgate {' '.join(args[:2])}: {time.monotonic() - t0:.1f} s")
    return out.stdout


def _phantom(kind: str, seed: int, out: Path, description: str) -> SyntheticSeries:
    """A phantom CT study, its central :data:`SLICES` slices, as DICOM files."""
    case = phantom_study(kind, seed=seed)
    z0 = max(0, (case.image.shape[0] - SLICES) // 2)
    return write_series(case.image[z0:z0 + SLICES], case.spacing, case.modality, out,
                        series_description=description, patient_id="TEST-E2E")


def _clinical(out: Path, description: str) -> SyntheticSeries:
    """A CT at a scanner's geometry (thinner slices, finer pixels, a shifted field of view), as production
    receives it: the model's grid is then no multiple of the source grid."""
    from model.data.clinical import Geometry, clinical_case

    case, _ = clinical_case("ct_liver", 0, 10_005, geometry=Geometry(*CLINICAL_GEOMETRY))
    return write_series(case.image, case.spacing, case.modality, out, series_description=description,
                        patient_id="TEST-E2E")


def _config(path: Path, fmt: str, model: SiteModel) -> Path:
    lines = ["[[rules]]", f'name = "site-{fmt}"', 'modalities = ["CT"]', 'series_description = "^e2e "',
             f'model = "{MODEL}"', "min_slices = 16"]
    if model.rule_labels is not None:
        lines.append("labels = [" + ", ".join(f'"{n}"' for n in model.rule_labels) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ reading back
def _seg_label_map(seg: highdicom.seg.Segmentation, volume: Volume, labels: dict[int, str]) -> np.ndarray:
    """The SEG's segments as one label map on the source grid, each segment drawn with the value of the
    model's label of its name."""
    by_name = {name: value for value, name in labels.items()}
    got = seg.get_pixels_by_source_instance([ref.sop_instance_uid for ref in volume.slices],
                                            assert_missing_frames_are_empty=True)
    out = np.zeros(volume.shape, np.uint8)
    for k, item in enumerate(seg.SegmentSequence):
        assert int(item.SegmentNumber) == k + 1
        plane = got[..., k].astype(bool)
        assert not (out[plane] > 0).any(), "segments overlap"
        out[plane] = by_name[str(item.SegmentLabel)]
    return out


def _dcmqi(path: Path, volume: Volume, out: Path) -> dict[str, np.ndarray]:
    """dcmqi's reading of the SEG: segment label -> its voxels placed on the source grid."""
    import SimpleITK as sitk

    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    assert Path(exe).exists(), "dcmqi (segimage2itkimage) is missing: it comes with the dev extra (make setup)"
    out.mkdir(parents=True)
    subprocess.run([exe, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd", "-p", "seg"],
                   check=True, capture_output=True, timeout=120)
    meta = json.loads((out / "seg-meta.json").read_text())
    inverse = np.linalg.inv(volume.affine)
    found: dict[str, np.ndarray] = {}
    for k, attributes in enumerate(meta["segmentAttributes"], start=1):
        (attr,) = attributes
        number = int(attr["labelID"])
        image = sitk.ReadImage(str(out / f"seg-{k}.nrrd"))
        got = sitk.GetArrayFromImage(image)
        placed = np.zeros(volume.shape, dtype=bool)
        for plane in range(got.shape[0]):
            z, y, x = (inverse @ np.append(image.TransformIndexToPhysicalPoint((0, 0, plane)), 1.0))[:3]
            assert np.allclose([y, x], [0, 0], atol=1e-3) and abs(z - round(z)) < 1e-3
            placed[int(round(z))] = got[plane] == number
        found[str(attr["SegmentLabel"])] = placed
    return found


def _check_study(stack: Stack, study: SyntheticSeries, model: SiteModel, what: str, work: Path) -> None:
    """The study's job ends sent (approved if the gate held it), and the SEG that Orthanc holds equals the
    format's own prediction, reads back through dcmqi with the model's label names and passes dciodvfy."""
    from tests.unit.worker.test_dicom_seg import dciodvfy

    job = stack.wait_state(study.study_instance_uid, {"sent", "held", "failed"}, timeout=240)
    assert str(job.state) != "failed", (job.reason_code, job.reason_detail, stack.log("worker"))
    assert job.rule_name is not None and job.rule_name.startswith("site-")
    res = _result(stack, job.id)
    # released or held: the bank of three phantoms decides, and the decision is OODM vs tau
    assert res.is_ood == (res.oodm > res.tau)
    evidence = json.loads(stack.file(str(res.evidence_path)).read_text())
    assert {k: evidence["grid"].get(k) for k in model.inference} == model.inference, evidence["grid"]
    if str(job.state) == "held":
        assert res.is_ood and evidence["gate_reason"] == "oodm_above_tau", evidence["gate_reason"]
        _cli(stack, "jobs", "approve", str(job.id), "--user", "dr.house")
        job = stack.wait_state(study.study_instance_uid, {"sent", "failed"}, timeout=120)
    else:
        assert not res.is_ood and evidence["gate_reason"] is None
    assert str(job.state) == "sent", (job.reason_code, job.reason_detail)
    decision = "held, approved" if res.is_ood else "released"

    # the SEG (and its SR) the PACS holds, read back
    orthanc = stack.orthanc
    assert orthanc is not None
    assert _seg_uids_at(orthanc, study.study_instance_uid) == [res.seg_sop_instance_uid]
    assert _seg_uids_at(orthanc, study.study_instance_uid, "SR") == [res.sr_sop_instance_uid]
    raw = orthanc.get(f"/instances/{_orthanc_id(orthanc, res.seg_sop_instance_uid)}/file")
    work.mkdir(parents=True, exist_ok=True)
    held_path = work / "orthanc-seg.dcm"
    held_path.write_bytes(raw)
    seg = highdicom.seg.Segmentation.from_dataset(dcmread(io.BytesIO(raw)))
    assert seg.StudyInstanceUID == study.study_instance_uid
    if res.is_ood:
        assert "dr.house" in str(seg.ContentCreatorName)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(model.labels.values())

    volume = load_series(study.paths)  # the series as the worker loads it
    ours = _seg_label_map(seg, volume, model.labels)
    theirs = model.reference(volume, work / "reference")
    assert theirs.shape == ours.shape == volume.shape
    found = dict(zip(*(v.tolist() for v in np.unique(theirs, return_counts=True)), strict=True))
    assert set(found) - {0}, "the model found nothing: the comparison would be between empty maps"
    assert set(found) <= {0, *model.labels}
    differ = int((ours != theirs).sum())
    assert differ == 0, f"{differ} of {ours.size} voxels differ from the format's own prediction"

    read = _dcmqi(held_path, volume, work / "dcmqi")
    assert list(read) == list(model.labels.values())
    for value, name in model.labels.items():
        np.testing.assert_array_equal(read[name], theirs == value, err_msg=f"dcmqi, segment {name!r}")

    errors, warns = dciodvfy(held_path)
    assert errors == [], "\n".join(errors + warns)
    print(f"{what}: {volume.shape} at {volume.spacing} mm: {decision} (OODM {res.oodm:.4f} vs tau "
          f"{res.tau:.4f}); label voxels {found}, equal to the format's own")


# ------------------------------------------------------------------------------------------ the test
# the most expensive format gets more than the default 300 s when the machine is shared (about 100 s idle)
@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.timeout(600)) if f == "nnunet-v2" else f
                                 for f in MODELS])
def test_a_registered_model_of_each_format_through_scp_worker_and_orthanc(fmt: str, stack: Stack, tmp_path: Path,
                                                                        one_thread: None) -> None:
    t0 = time.monotonic()
    model = MODELS[fmt](tmp_path / "model")
    t_model = time.monotonic()

    registered = _cli(stack, "model", "register", MODEL, *model.register_args)
    assert f"registered {MODEL}: {fmt}" in registered, registered
    assert "labels: " + ", ".join(f"{v}={n}" for v, n in model.labels.items()) in registered, registered
    bank = tmp_path / "bank"
    members = [_phantom("ct_liver", seed, bank / f"s{seed}", f"e2e {fmt} bank") for seed in BANK_SEEDS]
    fitted = _cli(stack, "model", "fit-ood", MODEL, "--data", str(bank))
    assert "the model is live" in fitted, fitted
    [listed] = json.loads(_cli(stack, "model", "list", "--json"))
    assert listed["format"] == fmt and listed["bank_sha256"] and listed["state"] == "live", listed
    t_registered = time.monotonic()

    config = _config(tmp_path / "specgate.toml", fmt, model)
    stack.start("scp", "--config", str(config), "scp")
    wait_for(lambda: _port_open(stack.scp_port), timeout=60, what="specgate scp listening")
    stack.start("worker", "--config", str(config), "worker")
    studies = {"phantom": _phantom("ct_liver", STUDY_SEED, tmp_path / "study", f"e2e {fmt}"),
               "clinical": _clinical(tmp_path / "clinical", f"e2e {fmt} clinical")}
    for study in studies.values():
        assert set(stack.send(study.paths)) == {0}
    assert set(stack.send(members[0].paths)) == {0}  # one of the bank's own images, sent as a study
    for name, study in studies.items():
        _check_study(stack, study, model, f"{fmt} {name}", tmp_path / name)
    # fit-ood read that series exactly as the worker does: the worker's signature is the bank's own
    job = stack.wait_state(members[0].study_instance_uid, {"sent", "held", "failed"}, timeout=240)
    res = _result(stack, job.id)
    assert res.oodm < 1e-9 and str(job.state) == "sent", (res.oodm, job.state, job.reason_code)
    print(f"{fmt} bank member: released, OODM {res.oodm:.1e}")
    t_end = time.monotonic()
    print(f"{fmt}: model built {t_model - t0:.1f} s, registered + bank {t_registered - t_model:.1f} s, "
          f"services + two studies + checks {t_end - t_registered:.1f} s")
