"""model.evaluate: the spectral detector's figures (OODM alone) apart from the gate's decisions (OODM and the
modality rule), in the JSON and in the printed report."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from model.evaluate import CaseOutput, evaluate_cases, format_report
from model.ood import SpectralGate


def _case(modality: str, oodm: float) -> SimpleNamespace:
    """A case whose signature lies at distance ``oodm`` from the bank's nearest signature (``e0``)."""
    sig = np.array([1.0, 0.0, 0.0]) + np.array([0.0, oodm, 0.0])
    return SimpleNamespace(image=np.zeros((2, 2, 2), np.float32), spacing=(1.0, 1.0, 1.0), modality=modality,
                           signature=sig, label=None)


def _predict(case: SimpleNamespace) -> CaseOutput:
    return CaseOutput(foreground=np.zeros(case.image.shape, np.float32), signature=case.signature)


@pytest.fixture
def gate() -> SpectralGate:
    # a bank of CT and MR signatures far apart from each other; tau 0.5; PET never seen
    return SpectralGate(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), tau=0.5, c=2.5,
                        meta={"modalities": ["CT", "MR"]})


def test_a_pet_case_below_tau_is_held_by_the_modality_rule_and_ranked_by_its_oodm(gate: SpectralGate) -> None:
    ids = {"ct": [_case("CT", 0.1), _case("CT", 0.3)]}
    # one PET below tau (held by the modality rule alone), below an in-distribution CT's OODM; one far above
    ood = {"pet": [_case("PT", 0.2), _case("PT", 0.9)]}
    m = evaluate_cases(_predict, gate, ids, ood)

    assert m["oodm"]["pet"] == [0.2, 0.9]
    # the gate's decisions: both PET held (one by the modality rule alone), both CT released
    assert m["decisions"] == {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "n_in": 2, "n_out": 2,
                              "held_for_modality": 1}
    assert m["datasets"]["pet"]["flagged_ood"] == 2 and m["datasets"]["pet"]["held_for_modality"] == 1
    assert m["datasets"]["pet"]["oodm_above_tau"] == 1
    # the spectral detector alone: the PET at 0.2 is released at tau and ranks below the CT at 0.3
    # (pairs PET > CT: 0.9 > 0.1, 0.9 > 0.3, 0.2 > 0.1; not 0.2 > 0.3: AUC 3/4)
    assert m["spectral"] == {"accuracy": 0.75, "sensitivity": 0.5, "specificity": 1.0, "auc": 0.75,
                             "n_in": 2, "n_out": 2}
    assert "ood" not in m  # no figure that mixes the two

    report = format_report(m)
    assert ("spectral OOD detection (OODM alone): accuracy=0.750 sensitivity=0.500 specificity=1.000 "
            "AUC=0.750 (in=2, OOD=2)") in report
    assert ("gate decisions (OODM > tau or modality not in the bank): accuracy=1.000 sensitivity=1.000 "
            "specificity=1.000 (held for the modality alone: 1 of 2 OOD)") in report
    assert "pet                OOD    2" in report and " 2/2  0.40-1.80" in report


def test_an_in_distribution_case_of_an_unseen_modality_counts_against_the_decisions(gate: SpectralGate) -> None:
    """The modality rule holds a released-by-OODM case given as in distribution: the decisions' specificity
    drops, the spectral figures do not."""
    m = evaluate_cases(_predict, gate, {"ct": [_case("CT", 0.1)], "pet_in": [_case("PT", 0.1)]},
                       {"far": [_case("CT", 0.9)]})
    assert m["spectral"]["specificity"] == 1.0 and m["spectral"]["auc"] == 1.0
    assert m["decisions"]["specificity"] == 0.5 and m["decisions"]["held_for_modality"] == 0
    assert m["datasets"]["pet_in"]["flagged_ood"] == 1 and m["datasets"]["pet_in"]["oodm_above_tau"] == 0


def test_the_calibration_band_is_stated_in_millimetres(gate: SpectralGate) -> None:
    """The ECE band is ``band`` voxels on each case's own grid: the report says how many mm that was."""
    label = np.zeros((8, 8, 8), bool)
    label[2:6, 2:6, 2:6] = True

    def case(spacing: tuple[float, float, float]) -> SimpleNamespace:
        return SimpleNamespace(image=np.zeros(label.shape, np.float32), spacing=spacing, modality="CT",
                               signature=np.array([1.0, 0.0, 0.0]), label=label)

    def predict(c: SimpleNamespace) -> CaseOutput:
        return CaseOutput(foreground=np.where(c.label, 0.9, 0.1).astype(np.float32), signature=c.signature)

    m = evaluate_cases(predict, gate, {"ct": [case((5.0, 4.0, 4.0)), case((3.0, 1.6, 1.6))]}, band=10)
    assert m["datasets"]["ct"]["ece_band_mm"] == [16.0, 50.0]
    header, row = format_report(m).splitlines()[:2]
    assert "ECEbandmm" in header and " 16.0-50.0  0/2 " in row
