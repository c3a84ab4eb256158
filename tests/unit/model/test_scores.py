import numpy as np
import pytest

from model.scores import assd, dice, hd95, ood_detection_metrics, roc_auc


def _box(shape=(10, 10, 10), lo=(2, 2, 2), hi=(6, 6, 6)):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_dice():
    a = _box()
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(a, np.roll(a, 1, 0)) == pytest.approx(0.75)
    assert dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))) == 1.0


def test_surface_distances_in_mm():
    a = _box()
    b = np.roll(a, 1, axis=0)
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, b, (1.0, 2.0, 2.0)) == pytest.approx(1.0)
    # a shifted 4-voxel cube: side faces coincide (0), end faces are one slice apart (d)
    d = assd(a, b, (2.0, 1.0, 1.0))
    assert 0 < d < 2.0
    assert np.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, (1, 1))


def test_assd_hand_computed_for_one_voxel():
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros((5, 5, 5), bool)
    a[1, 2, 2] = True
    b[3, 2, 2] = True
    assert assd(a, b, (1.5, 1, 1)) == pytest.approx(3.0)
    assert hd95(a, b, (1.5, 1, 1)) == pytest.approx(3.0)


def test_auc_and_detection_metrics():
    assert roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert roc_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert roc_auc([0.1, 0.3], [0.2, 0.3]) == pytest.approx((1 + 0.5 + 1) / 4)
    m = ood_detection_metrics([0.1, 0.2, 0.5], [0.4, 0.6], tau=0.45)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3) and m["accuracy"] == 0.6
