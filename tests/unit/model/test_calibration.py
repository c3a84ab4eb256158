import numpy as np
import pytest

from model.calibration import boundary_band, calibration_bins, ece_mce, reliability_diagram, surface


def _cube():
    label = np.zeros((5, 5, 5), bool)
    label[1:4, 1:4, 1:4] = True
    return label


def test_surface_and_band():
    label = _cube()
    s = surface(label)
    assert s.sum() == 26 and not s[2, 2, 2]  # every cube voxel but the centre touches background
    band = boundary_band(label, 1)
    # the 27 cube voxels plus the 54 background voxels face-adjacent to the cube
    assert band.sum() == 81
    assert not band[0, 0, 0]  # corner: only diagonally adjacent
    assert boundary_band(label, 0).sum() == 26


def test_ece_mce_hand_computed():
    label = _cube()
    # inside band: 27 fg voxels at p=0.9 (conf .9, correct) and 54 bg voxels at p=0.2 (conf .8, correct)
    ece, mce = ece_mce(np.where(label, 0.9, 0.2), label, band=1, bins=10)
    assert ece == pytest.approx(27 / 81 * 0.1 + 54 / 81 * 0.2)
    assert mce == pytest.approx(0.2)


def test_wrong_predictions_count_as_inaccurate():
    label = np.zeros((3, 3, 3), bool)
    label[1, 1, 1] = True
    p = np.full(label.shape, 0.3)
    p[1, 1, 1] = 0.3  # the fg voxel is predicted background with confidence 0.7 -> wrong
    # band=1 around the single voxel: itself and its 6 face neighbours; all conf 0.7 -> bin 7
    b = calibration_bins(p, label, band=1, bins=10)
    assert b.counts[7] == 7 and b.counts.sum() == 7
    assert b.accuracy[7] == pytest.approx(6 / 7)
    ece, mce = ece_mce(p, label, band=1, bins=10)
    assert ece == pytest.approx(abs(6 / 7 - 0.7))
    assert mce == pytest.approx(abs(6 / 7 - 0.7))


def test_two_bins_mixed():
    label = np.zeros((1, 1, 4), bool)
    label[0, 0, :2] = True
    p = np.array([0.95, 0.65, 0.1, 0.55]).reshape(1, 1, 4)
    b = calibration_bins(p, label, band=None, bins=2)
    # confidences .95 .65 .9 .55 all fall in bin [0.5, 1]; correct: T T T F
    assert b.counts.tolist() == [0, 4]
    assert b.ece == pytest.approx(abs(0.75 - (0.95 + 0.65 + 0.9 + 0.55) / 4))


def test_empty_label_gives_nan():
    ece, mce = ece_mce(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))
    assert np.isnan(ece) and np.isnan(mce)


def test_reliability_diagram_png(tmp_path):
    label = _cube()
    out = tmp_path / "rel.png"
    pooled = reliability_diagram([np.where(label, 0.9, 0.2)] * 2, [label] * 2, out, band=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pooled.counts.sum() == 162
