"""The shipped default model: its bank flags unseen kinds, and its card shows what `evaluate` prints."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from model.ood import BankMismatchError, SpectralGate, sha256_file
from model.weights import (
    BANK_PATH,
    CARD_PATH,
    WEIGHTS_PATH,
    card_metrics,
    default_weights_sha256,
    load_default,
)
from model.weights.build import write_evaluation_sets
from specgate._cli_model import model_group


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ids, ood = write_evaluation_sets(root / "data")
    args = ["evaluate", "--weights", str(WEIGHTS_PATH), "--bank", str(BANK_PATH), "--out", str(root / "out"),
            "--device", "cpu"]
    for p in ids:
        args += ["--data", str(p)]
    for p in ood:
        args += ["--ood", str(p)]
    res = CliRunner().invoke(model_group, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    return res.stdout, metrics, root / "out"


def test_files_fit_the_budget_and_load():
    total = sum(p.stat().st_size for p in WEIGHTS_PATH.parent.iterdir() if p.is_file())
    assert total <= 20e6
    net, gate = load_default()
    assert net.config["base_features"] == 14 and not net.training
    assert gate.weights_sha256 == default_weights_sha256() == sha256_file(WEIGHTS_PATH)
    assert gate.bank.shape[1] == 14


def test_bank_refuses_other_weights(tmp_path):
    with pytest.raises(BankMismatchError, match="refit"):
        SpectralGate.load(BANK_PATH, weights_sha256="0" * 64)
    other = tmp_path / "other.pt"
    other.write_bytes(WEIGHTS_PATH.read_bytes() + b"\0")  # a different file: other SHA-256
    res = CliRunner().invoke(model_group, ["evaluate", "--weights", str(other), "--bank", str(BANK_PATH),
                                           "--data", str(tmp_path)])
    assert res.exit_code != 0 and "SHA-256" in res.output


def test_unseen_kinds_are_flagged_and_held_out_pass(evaluation):
    _out, m, _ = evaluation
    ood = m["ood"]
    assert ood["auc"] >= 0.95
    assert ood["sensitivity"] == 1.0  # every unseen-modality / unseen-organ phantom is flagged
    assert ood["specificity"] >= 0.75
    for name in ("mr_hippocampus", "pt_tumour"):
        assert m["datasets"][name]["flagged_ood"] == m["datasets"][name]["n"]
    tau = m["gate"]["tau"]
    assert max(max(m["oodm"][k]) for k in ("ct_liver", "ct_lung")) < tau < min(
        min(m["oodm"][k]) for k in ("mr_hippocampus", "pt_tumour"))


def test_in_distribution_segmentation_works(evaluation):
    _out, m, _ = evaluation
    assert m["datasets"]["ct_liver"]["dsc"] > 0.9
    assert m["datasets"]["ct_lung"]["dsc"] > 0.9
    assert m["datasets"]["mr_prostate"]["dsc"] > 0.5


def test_figures_are_written(evaluation):
    _out, _m, out = evaluation
    for name in ("oodm_histogram.png", "reliability_ct_liver.png", "reliability_pt_tumour.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def _numbers(text):
    return re.findall(r"-?\d+\.\d+|\d+", text)


def test_model_card_shows_what_evaluate_prints(evaluation):
    printed, m, _ = evaluation
    card = CARD_PATH.read_text()
    table = card.split("```\n", 2)[1].split("```", 1)[0].strip()
    printed_table = printed.strip()
    # same rows, same words; numbers equal to their last printed digit (CPU kernels may differ in 1e-7)
    assert re.sub(r"-?\d+\.\d+|\d+", "#", table) == re.sub(r"-?\d+\.\d+|\d+", "#", printed_table)
    for a, b in zip(_numbers(table), _numbers(printed_table), strict=True):
        unit = 10.0 ** -len(a.split(".")[1]) if "." in a else 0
        assert abs(float(a) - float(b)) <= unit + 1e-9, (a, b)
    cm = card_metrics()
    assert cm["gate"] == m["gate"] and cm["ood"] == pytest.approx(m["ood"], abs=2e-3)
    for name, d in cm["datasets"].items():
        fresh = m["datasets"][name]
        assert d["flagged_ood"] == fresh["flagged_ood"] and d["n"] == fresh["n"]
        for k in ("dsc", "hd95", "assd", "ece", "mce"):
            assert d[k] == pytest.approx(fresh[k], abs=2e-3, rel=1e-3), (name, k)
    np.testing.assert_allclose(
        [v for k in sorted(cm["oodm"]) for v in cm["oodm"][k]],
        [v for k in sorted(m["oodm"]) for v in m["oodm"][k]], atol=2e-4)


@pytest.mark.parametrize("kind,expect_ood", [("ct_liver", False), ("mr_hippocampus", True), ("pt_tumour", True)])
def test_demo_studies_are_routed_as_the_demo_expects(kind, expect_ood):
    """What `specgate demo` sends: one in-distribution study, and unseen organ / modality studies."""
    from model.data.phantoms import phantom_study
    from model.infer import sliding_window
    from model.preprocess import preprocess

    net, gate = load_default()
    case = phantom_study(kind, seed=7)
    stored = np.round(case.image).astype(np.int16).astype(np.float32)  # as a DICOM series would carry it
    res = sliding_window(net, preprocess(stored, case.modality), out_dtype=np.float16)
    assert gate.is_ood(res.signature) == expect_ood, gate.score(res.signature)
