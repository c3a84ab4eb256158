"""``specgate model register | list | fit-ood | evaluate`` and the start-up checks on the ledger's models,
on both ledger backends (real SQLite and PostgreSQL), through the real CLI in-process."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from sqlalchemy import select

from ledger import audit
from ledger.schema import AuditEvent
from model.data.phantoms import write_msd_dataset
from model.ood import SpectralGate, sha256_file
from model.unet import SegNet, save_weights
from specgate._context import StartupError
from specgate.cli import AppContext, main
from specgate.settings import Settings
from tests.model_factories.torchscript_model import SPEC as TS_SPEC
from tests.model_factories.torchscript_model import write_torchscript_model

Run = Callable[..., Result]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained SegNet (one 96^3 window covers a phantom: a CPU runs it in about a second)."""
    torch.manual_seed(0)
    net = SegNet(base_features=4, levels=2).eval()
    path = tmp_path_factory.mktemp("model") / "liver.pt"
    save_weights(net, path, meta={"name": "liver-test", "version": "1.2", "labels": {"1": "organ"}})
    return path


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The site's images: an MSD folder of NIfTI files (3 CTs) and a folder of DICOM series (1 CT)."""
    from model.data.clinical import Geometry, write_clinical_set

    root = tmp_path_factory.mktemp("site")
    msd = write_msd_dataset(root / "msd", "ct_liver", 3, seed=3)
    clinical = write_clinical_set(root / "dicom", "ct_liver", 1, seed=3,
                                  geometry=Geometry((24, 64, 64), (5.0, 3.0, 3.0), (0.0, 0.0, 0.0)))
    return msd, clinical / "series"


def _runner(settings: Settings, **env: str) -> Run:
    def run(*args: str, expect: int | None = 0) -> Result:
        full = {"SPECGATE_DATA_DIR": str(settings.data_dir), "SPECGATE_DATABASE_URL": settings.db_url, **env}
        result = CliRunner().invoke(main, list(args), env=full, catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result
    return run


def _events(sessions, action: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)).scalars())


def test_register_and_list_round_trip(migrated, cli: Run, weights: Path, tmp_path: Path) -> None:
    _settings, _engine, sessions = migrated
    codes = tmp_path / "codes.csv"
    codes.write_text("label,code,meaning\norgan,10200004,Liver\n")
    out = cli("model", "register", "liver", "--segnet", str(weights), "--codes", str(codes)).output
    assert "registered liver: segnet" in out and "labels: 1=organ" in out
    assert "next: specgate model fit-ood liver" in out

    listed = json.loads(cli("model", "list", "--json").output)
    assert len(listed) == 1
    m = listed[0]
    assert (m["name"], m["state"], m["format"], m["path"]) == ("liver", "registered", "segnet", str(weights))
    assert m["files_sha256"] == {weights.name: sha256_file(weights)}
    assert m["labels"] == {"1": "organ"}
    assert m["codes"] == {"organ": ["10200004", "SCT", "Liver"]}
    assert m["bank_path"] is None and m["bank_sha256"] is None and m["registered_by"].startswith("operator:")
    table = cli("model", "list").output
    assert "liver" in table and "registered" in table

    [event] = _events(sessions, "model.registered")
    assert (event.object_type, event.object_id) == ("model", "liver")
    assert event.details["files_sha256"] == m["files_sha256"] and event.details["path"] == str(weights)
    with sessions() as s:
        assert audit.verify(s).ok


@pytest.mark.parametrize("case", ["missing file", "no such layer", "not a model", "name taken", "bad name",
                                  "two formats", "code of an unknown label", "not a SNOMED code"])
def test_register_refuses_naming_the_problem(migrated, cli: Run, weights: Path, tmp_path: Path,
                                              case: str) -> None:
    _settings, _engine, sessions = migrated
    args = ["model", "register", "liver", "--segnet", str(weights)]
    if case == "missing file":
        args[-1], expected = str(tmp_path / "gone.pt"), "gone.pt' does not exist"
    elif case == "no such layer":
        args += ["--layer", "decoder.nope"]
        expected = "layer 'decoder.nope' cannot be chosen"
    elif case == "not a model":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"not a network")
        args[-1], expected = str(junk), "junk.pt is not a loadable SegNet weights file"
    elif case == "name taken":
        cli(*args)
        expected = "a model named 'liver' is already registered (segnet"
    elif case == "bad name":
        args[2], expected = "my liver", "model name 'my liver' is not allowed"
    elif case == "two formats":
        args += ["--nnunet", str(tmp_path)]
        expected = "give exactly one of --segnet | --torchscript | --monai-bundle | --nnunet (given: --segnet, --nnunet)"
    elif case == "code of an unknown label":
        codes = tmp_path / "codes.json"
        codes.write_text(json.dumps({"spleen": "78961009"}))
        args += ["--codes", str(codes)]
        expected = "the model has no label 'spleen' (labels: 1=organ)"
    else:
        codes = tmp_path / "codes.json"
        codes.write_text(json.dumps({"organ": "10200005"}))
        args += ["--codes", str(codes)]
        expected = "'10200005' is not a SNOMED CT identifier"
    result = cli(*args, expect=None)
    assert result.exit_code != 0
    assert expected in " ".join(result.output.split()), result.output
    listed = json.loads(cli("model", "list", "--json").output)
    assert [m["name"] for m in listed] == (["liver"] if case == "name taken" else [])
    assert len(_events(sessions, "model.registered")) == (1 if case == "name taken" else 0)


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, _spec = write_torchscript_model(tmp_path_factory.mktemp("ts"))
    return net


def test_register_a_torchscript_model_and_refuse_its_bad_specs(migrated, cli: Run, torchscript: Path,
                                                               tmp_path: Path) -> None:
    good = tmp_path / "spec.toml"
    good.write_text(TS_SPEC)
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"liver": "10200004", "2": {"code": "78961009", "meaning": "Spleen"}}))
    out = cli("model", "register", "abdomen", "--torchscript", str(torchscript), "--spec", str(good),
              "--codes", str(codes)).output
    assert "labels: 1=liver, 2=spleen" in out
    [m] = json.loads(cli("model", "list", "--json").output)
    assert (m["format"], m["layer"], m["labels"]) == ("torchscript", "output:1", {"1": "liver", "2": "spleen"})
    assert m["codes"] == {"liver": ["10200004", "SCT", "liver"], "spleen": ["78961009", "SCT", "Spleen"]}

    refusals = {
        "no spacing": (TS_SPEC.replace("spacing = { CT = [4.0, 4.0, 4.0] }\n", ""), [], "spacing"),
        "unparsable": (TS_SPEC.replace("[input]", "[input"), [], "is not valid TOML"),
        "a submodule as layer": (TS_SPEC, ["--layer", "features"], "'features'"),
    }
    for n, (text, extra, expected) in enumerate(refusals.values()):
        spec = tmp_path / f"bad{n}.toml"
        spec.write_text(text)
        result = cli("model", "register", f"bad{n}", "--torchscript", str(torchscript), "--spec", str(spec),
                     *extra, expect=1)
        assert f"model 'bad{n}' refused:" in result.output and expected in result.output, result.output
    result = cli("model", "register", "nospec", "--torchscript", str(torchscript), expect=2)
    assert "--torchscript needs --spec FILE" in result.output
    assert [m["name"] for m in json.loads(cli("model", "list", "--json").output)] == ["abdomen"]


def test_fit_ood_writes_the_bank_into_the_data_dir_and_records_its_hash(migrated, cli: Run,
                                                                        weights: Path,
                                                                        site_data: tuple[Path, Path]) -> None:
    settings, _engine, sessions = migrated
    msd, dicom = site_data
    cli("model", "register", "liver", "--segnet", str(weights))
    res = cli("model", "fit-ood", "liver", "--data", str(msd), "--data", str(dicom), "--device", "cpu")
    assert "bank of 4 signatures" in res.output and "the model is live" in res.output

    [m] = json.loads(cli("model", "list", "--json").output)
    bank = Path(m["bank_path"])
    assert m["state"] == "live" and bank.is_file()
    assert bank.parent == settings.data_dir / "models" / "liver"
    assert m["bank_sha256"] == sha256_file(bank) and bank.name == f"ood-bank-{m['bank_sha256'][:16]}.npz"
    gate = SpectralGate.load(bank, weights_sha256=sha256_file(weights))  # tied to the registered file
    assert gate.bank.shape[0] == 4 and gate.meta["modalities"] == ["CT"]
    assert gate.meta["inference"]["block"] == 96 and gate.meta["registered_model"] == "liver"
    [event] = _events(sessions, "model.bank_fitted")
    assert event.object_id == "liver" and event.details["bank_sha256"] == m["bank_sha256"]
    assert event.details["previous"] == {"bank_path": None, "bank_sha256": None, "state": "registered"}
    assert event.details["signatures"] == 4

    # the worker's own loader takes this bank for these weights: fitted through exactly its path
    from worker.model_runtime import Segmenter

    seg = Segmenter.open(weights, bank)
    assert seg.gate.tau == pytest.approx(gate.tau)

    # evaluate NAME: the registered weights and bank; figures under DATA_DIR/evaluation/NAME
    res = cli("model", "evaluate", "liver", "--data", str(msd), "--device", "cpu", "--json")
    liver = json.loads(res.stdout)["datasets"]["ct_liver"]
    assert liver["n"] == 3 and liver["dsc_per_label"] == {"organ": liver["dsc"]}  # one label: the foreground
    assert (settings.data_dir / "evaluation" / "liver" / "metrics.json").is_file()

    # fitting again keeps the earlier bank where the audit trail says it was, and records both hashes
    res = cli("model", "fit-ood", "liver", "--data", str(msd), "--c", "3", "--device", "cpu")
    [m2] = json.loads(cli("model", "list", "--json").output)
    assert m2["bank_sha256"] != m["bank_sha256"] and bank.is_file() and Path(m2["bank_path"]).is_file()
    assert _events(sessions, "model.bank_fitted")[-1].details["previous"]["bank_sha256"] == m["bank_sha256"]
    with sessions() as s:
        assert audit.verify(s).ok


def test_fit_ood_refuses_what_it_cannot_use(migrated, cli: Run, weights: Path, tmp_path: Path,
                                            site_data: tuple[Path, Path]) -> None:
    msd, _dicom = site_data
    res = cli("model", "fit-ood", "nobody", "--data", str(msd), expect=2)
    assert "no model is registered as 'nobody' (registered: none)" in res.output
    cli("model", "register", "liver", "--segnet", str(weights))
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("model", "fit-ood", "liver", "--data", str(empty), expect=2)
    assert "holds no images" in res.output
    res = cli("model", "fit-ood", "liver", "--data", str(msd), "--weights", str(weights), expect=2)
    assert "--weights: not for a registered model" in res.output
    res = cli("model", "fit-ood", "liver", "--data", str(msd), "--like", str(empty), expect=2)
    assert f"{empty} holds no DICOM series" in " ".join(res.output.split())
    # a weights file takes --like as a registered model does, through the same reader
    res = cli("model", "fit-ood", "--weights", str(weights), "--out", str(tmp_path / "b.npz"), "--data", str(msd),
              "--like", str(empty), expect=2)
    assert f"{empty} holds no DICOM series" in " ".join(res.output.split())
    # the registered file changed: its bank would judge another model
    copy = tmp_path / "liver.pt"
    copy.write_bytes(weights.read_bytes())
    cli("model", "register", "moved", "--segnet", str(copy))
    torch.manual_seed(1)
    save_weights(SegNet(base_features=4, levels=2), copy)
    res = cli("model", "fit-ood", "moved", "--data", str(msd), expect=1)
    assert "model 'moved': its files changed since it was registered (liver.pt)" in res.output


def test_a_rule_naming_an_unregistered_or_bankless_model_stops_start_up(migrated, weights: Path,
                                                                       site_data: tuple[Path, Path]) -> None:
    settings, _engine, _sessions = migrated
    rules = json.dumps([{"name": "liver-ct", "model": "liver"}, {"name": "any", "model": "default"}])
    run = _runner(settings, SPECGATE_RULES=rules)
    for command in ("worker", "scp"):
        res = run(command, expect=1)
        assert ("refusing to start: rule 'liver-ct' names model 'liver', which is neither configured (models: "
                "default) nor registered in the ledger (registered: none)") in " ".join(res.output.split())
    run("model", "register", "liver", "--segnet", str(weights))
    for command in ("worker", "scp"):
        res = run(command, expect=1)
        assert ("rule 'liver-ct' names model 'liver', which is registered without an OOD bank: every result "
                "would be unjudged; fit one with 'specgate model fit-ood liver --data DIR'") \
            in " ".join(res.output.split())

    app = AppContext(Settings.load(data_dir=settings.data_dir, database_url=settings.db_url,
                                   rules=[{"name": "liver-ct", "model": "liver"}]))
    try:
        assert [m.name for m in app.worker_config().models] == ["default"]  # not routable yet: not served
        run("model", "fit-ood", "liver", "--data", str(site_data[0]), "--device", "cpu")
        app.check_routing()  # live now: no error
        [m] = app.registered_models()
        bank = Path(m.bank_path or "")
        saved = bank.read_bytes()
        bank.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        with pytest.raises(StartupError, match=f"rule 'liver-ct' names model 'liver', whose OOD bank {re.escape(str(bank))} "
                                               r"is not the one the ledger recorded \(SHA-256 [0-9a-f]{64}, recorded "
                                               rf"{m.bank_sha256}\)"):
            app.check_routing()
        bank.unlink()
        res = run("worker", expect=1)
        assert f"whose OOD bank {bank} is missing" in " ".join(res.output.split())
        bank.write_bytes(saved)
        app.check_routing()
        spec = app.worker_config().models[-1]
        # the worker's own loader opens the registered model with the bank fitted for it, and gates a study
        from model.data.phantoms import phantom_case
        from worker.model_runtime import Segmenters

        case = phantom_case("ct_liver", 3, 0)
        out = Segmenters(app.worker_config().models)("liver").segment(case.image, "CT", spacing=case.spacing)
        assert out.tau == pytest.approx(SpectralGate.load(Path(m.bank_path or "")).tau) and out.oodm >= 0
        assert (spec.name, spec.format, spec.path, spec.weights, spec.bank, spec.layer) == (
            "liver", "segnet", weights, weights, Path(m.bank_path or ""), m.layer)
    finally:
        app.close()


def test_evaluate_writes_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: Path,
                                            site_data: tuple[Path, Path]) -> None:
    """Without --out, the figures go to DATA_DIR/evaluation, whatever the working directory (the command
    read ``ctx.obj.data_dir``, which does not exist, and wrote to ./specgate-eval)."""
    msd, _dicom = site_data
    bank = tmp_path / "bank.npz"
    data_dir = tmp_path / "data"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = {"SPECGATE_DATA_DIR": str(data_dir)}
    res = CliRunner().invoke(main, ["model", "fit-ood", "--weights", str(weights), "--data", str(msd),
                                    "--out", str(bank), "--device", "cpu"], env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["model", "evaluate", "--weights", str(weights), "--bank", str(bank),
                                    "--data", str(msd), "--device", "cpu", "--json"], env=env,
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (data_dir / "evaluation" / "metrics.json").is_file()
    assert f"figures and metrics.json in {data_dir / 'evaluation'}" in res.stderr
    assert list(cwd.iterdir()) == []


def test_the_ledger_refuses_bad_rows_naming_the_value(migrated) -> None:
    from ledger import models
    from ledger.db import session_scope

    _settings, _engine, sessions = migrated
    good = {"version": "1", "format": "segnet", "path": "/m/a.pt", "files_sha256": {"a.pt": "0" * 64},
            "labels": {1: "liver"}, "layer": "decoders.1", "settings": {}, "actor": "operator:test"}
    bad = [({"name": "default"}, "model name 'default' is reserved"),
           ({"files_sha256": {"a.pt": "XYZ"}}, "model 'm': SHA-256 of 'a.pt' 'XYZ' is not a lower-case hex SHA-256"),
           ({"labels": {0: "background"}}, "model 'm': label value 0 is not a positive integer"),
           ({"labels": {}}, "model 'm': the model declares no labels")]
    for change, message in bad:
        with pytest.raises(models.ModelRegistryError, match=re.escape(message)), session_scope(sessions) as s:
            models.register(s, **{"name": "m", **good, **change})  # type: ignore[arg-type]
    with session_scope(sessions) as s:
        models.register(s, name="m", **good)  # type: ignore[arg-type]
    with pytest.raises(models.ModelRegistryError, match="no model is registered as 'n' \\(registered: m\\)"), \
            session_scope(sessions) as s:
        models.set_bank(s, "n", bank_path="/b.npz", bank_sha256="1" * 64, actor="operator:test")
    with pytest.raises(models.ModelRegistryError, match="bank SHA-256 'nope'"), session_scope(sessions) as s:
        models.set_bank(s, "m", bank_path="/b.npz", bank_sha256="nope", actor="operator:test")
    with session_scope(sessions) as s:
        assert models.require(s, "m").state == "registered" and models.require(s, "m").bank_path is None
        assert audit.verify(s).ok and audit.count(s) == 1


class _Thresholds(torch.nn.Module):
    """A three-class model that segments the phantoms by intensity (CT window [-1000, 1000] -> [0, 1]):
    background below 0.4 (-200 HU), "liver" from there to 0.535 (70 HU: the body), "spleen" above (the
    organ); its features (the signature) are the intensity and its excess over 0.5."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([40.0 * (0.4 - x), torch.zeros_like(x), 400.0 * (x - 0.535)], dim=1)
        return logits, torch.cat([x, torch.relu(x - 0.5) * 10.0], dim=1)


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ts3")
    torch.jit.save(torch.jit.trace(_Thresholds().eval(), torch.zeros(1, 1, 8, 16, 16)), str(d / "net.ts"))
    (d / "spec.toml").write_text(TS_SPEC)
    return d / "net.ts", d / "spec.toml"


@pytest.fixture(scope="module")
def scanners(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Series from the site's scanners: three CT grids (one of them twice) and an MR grid."""
    from model.data.series_writer import write_series

    root = tmp_path_factory.mktemp("scanners")
    grids = [("CT", (24, 64, 64), (5.0, 3.0, 3.0)), ("CT", (30, 48, 48), (4.0, 4.5, 4.5)),
             ("CT", (20, 56, 56), (6.0, 3.5, 3.5)), ("CT", (24, 64, 64), (5.0, 3.0, 3.0)),
             ("MR", (16, 40, 40), (3.0, 2.0, 2.0))]
    for n, (modality, shape, spacing) in enumerate(grids):
        write_series(np.full(shape, 40.0 if modality == "CT" else 300.0, np.float32), spacing, modality,
                     root / f"s{n}")
    return root


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out CTs with a two-label ground truth (MSD layout): 1 the body outside the organ, 2 the organ."""
    import nibabel as nib

    folder = write_msd_dataset(tmp_path_factory.mktemp("held"), "ct_liver", 2, seed=5, first_index=100)
    for entry in json.loads((folder / "dataset.json").read_text())["training"]:
        image = nib.load(folder / entry["image"])
        organ = np.asarray(nib.load(folder / entry["label"]).dataobj) > 0
        hu = np.asarray(image.dataobj)
        truth = np.where(organ, 2, np.where(hu > -500, 1, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(truth, image.affine), str(folder / entry["label"]))
    doc = json.loads((folder / "dataset.json").read_text())
    doc["labels"] = {"0": "background", "1": "liver", "2": "spleen"}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder


def test_fit_ood_like_regrids_to_the_sites_scanners_and_evaluate_runs_any_format(
        migrated, cli: Run, thresholds: tuple[Path, Path], site_data: tuple[Path, Path], scanners: Path,
        multilabel: Path, tmp_path: Path) -> None:
    from model.adapters import open_adapter
    from model.data.volumes import iter_site_cases
    from model.scores import dice

    settings, _engine, sessions = migrated
    ts, spec = thresholds
    msd, _dicom = site_data
    cli("model", "register", "abdomen", "--torchscript", str(ts), "--spec", str(spec))
    res = cli("model", "evaluate", "abdomen", "--data", str(multilabel), expect=1)
    assert "model 'abdomen' has no OOD bank yet: specgate model fit-ood abdomen --data DIR" in res.output
    res = cli("model", "fit-ood", "abdomen", "--data", str(msd), "--regrids", "2", expect=2)
    assert "--regrids needs --like DIR" in res.output

    res = cli("model", "fit-ood", "abdomen", "--data", str(msd), "--like", str(scanners), "--regrids", "2",
              "--seed", "3", "--device", "cpu")
    assert "bank of 9 signatures (3 images, each also re-gridded to up to 2 of 4 scanner geometries)" in res.output
    assert "/9 " in res.stderr  # the progress bar counts every re-gridding
    [m] = json.loads(cli("model", "list", "--json").output)
    adapter = open_adapter("torchscript", ts, spec=str(spec))
    gate = SpectralGate.load(Path(m["bank_path"]), weights_sha256=adapter.model_sha256())
    assert gate.bank.shape[0] == 3 * (1 + 2) and gate.meta["images"] == 3
    rec = gate.meta["regrids"]
    assert (rec["per_image"], rec["seed"]) == (2, 3)
    geometries = {(g["modality"], tuple(g["shape"]), tuple(g["spacing"])): g for g in rec["geometries"]}
    assert set(geometries) == {("CT", (24, 64, 64), (5.0, 3.0, 3.0)), ("CT", (30, 48, 48), (4.0, 4.5, 4.5)),
                               ("CT", (20, 56, 56), (6.0, 3.5, 3.5)), ("MR", (16, 40, 40), (3.0, 2.0, 2.0))}
    assert geometries[("CT", (24, 64, 64), (5.0, 3.0, 3.0))]["series"] == 2
    assert sum(g["images"] for g in rec["geometries"] if g["modality"] == "CT") == 6
    assert geometries[("MR", (16, 40, 40), (3.0, 2.0, 2.0))]["images"] == 0
    [event] = _events(sessions, "model.bank_fitted")
    assert event.details["regrids"] == rec and event.details["signatures"] == 9
    # without --like: one signature per image, as before
    cli("model", "fit-ood", "abdomen", "--data", str(msd), "--device", "cpu")
    [m2] = json.loads(cli("model", "list", "--json").output)
    plain = SpectralGate.load(Path(m2["bank_path"]))
    assert plain.bank.shape[0] == 3 and "regrids" not in plain.meta
    assert "regrids" not in _events(sessions, "model.bank_fitted")[-1].details

    # evaluate NAME: the TorchScript model through its adapter, DSC per label by the model's label names
    lung = write_msd_dataset(tmp_path / "ood", "ct_lung", 2, seed=5, first_index=100)
    res = cli("model", "evaluate", "abdomen", "--data", str(multilabel), "--ood", str(lung), "--device", "cpu",
              "--json")
    report = json.loads(res.stdout)
    held = report["datasets"]["ct_liver"]
    expected: dict[str, list[float]] = {"liver": [], "spleen": []}
    for case in iter_site_cases(multilabel):
        pred = adapter.predict(case.image, case.spacing, case.modality)
        for value, name in ((1, "liver"), (2, "spleen")):
            expected[name].append(dice(pred.labels == value, case.label_map == value))
    assert held["dsc_per_label"] == {k: pytest.approx(float(np.mean(v)), abs=1e-4) for k, v in expected.items()}
    assert held["labels_matched_by"] == "name"  # the folder's dataset.json names its labels
    assert 0.3 < held["dsc_per_label"]["spleen"] < 1.0 and 0.3 < held["dsc_per_label"]["liver"] < 1.0
    assert held["ece"] is not None and held["mce"] is not None and held["n"] == 2
    assert report["spectral"]["n_in"] == 2 and report["spectral"]["n_out"] == 2 and report["spectral"]["auc"] is not None
    assert report["gate"]["bank_size"] == 3 and report["inference"]["model"]["format"] == "torchscript"
    assert set(report["oodm"]) == {"ct_liver", "ct_lung"} and report["datasets"]["ct_lung"]["in_distribution"] is False
    out = settings.data_dir / "evaluation" / "abdomen"
    assert json.loads((out / "metrics.json").read_text()) == report
    assert (out / "reliability_ct_liver.png").is_file() and (out / "oodm_histogram.png").is_file()
    table = cli("model", "evaluate", "abdomen", "--data", str(multilabel), "--ood", str(lung), "--device", "cpu",
                "--out", str(tmp_path / "ev")).stdout
    assert "DSC per label: liver=" in table and "spleen=" in table and "spectral OOD detection (OODM alone):" in table
    res = cli("model", "evaluate", "abdomen", "--data", str(multilabel), "--spacing", "CT=1,1,1", expect=2)
    assert "--spacing: not for a registered model" in res.output
    # a case the model cannot run is named (the spec has no MR spacing)
    prostate = write_msd_dataset(tmp_path / "mr", "mr_prostate", 1, seed=5)
    res = cli("model", "evaluate", "abdomen", "--data", str(prostate), "--device", "cpu", expect=1)
    assert "model 'abdomen' failed on dataset 'mr_prostate', case 'mr_prostate_000' (MR" in res.output
    assert "no spacing for modality 'MR'" in res.output
