"""The worker (``dicom_series.load_series``, called by ``worker.pipeline.run_job``) and ``model.data`` (what
``specgate model evaluate`` reads) give one series the same verdict: both accept it with the same volume,
or both refuse it with the same reason code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dicom_factory import SeriesSpec, classic_datasets, write_datasets  # noqa: E402

from dicom_series import SeriesError, load_series  # noqa: E402
from model.data.volumes import iter_cases, load_dicom_series  # noqa: E402

SPEC = SeriesSpec(slices=12)


def _shift_from(k: int, fraction: float) -> Callable[[list[Dataset]], None]:
    """Slices k.. move ``fraction`` of a slice gap along the normal: one gap off by that fraction."""

    def damage(ds: list[Dataset]) -> None:
        for d in ds[k:]:
            x, y, z = (float(v) for v in d.ImagePositionPatient)
            d.ImagePositionPatient = [x, y, z + fraction * SPEC.slice_spacing]

    return damage


def _gantry_tilt(ds: list[Dataset]) -> None:
    for k, d in enumerate(ds):  # 5 degrees
        x, y, z = (float(v) for v in d.ImagePositionPatient)
        d.ImagePositionPatient = [x, y + k * SPEC.slice_spacing * np.tan(np.radians(5)), z]


def _mixed_orientation(ds: list[Dataset]) -> None:
    ds[4].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _drop_slice(ds: list[Dataset]) -> None:
    del ds[5]


def _other_frame_of_reference(ds: list[Dataset]) -> None:
    ds[3].FrameOfReferenceUID = "1.2.3.4.5.998"


CASES = [
    pytest.param(_shift_from(6, 0.03), None, id="spacing-3-percent-off-accepted"),
    pytest.param(_shift_from(6, 0.08), "uneven_slices", id="spacing-8-percent-off"),
    pytest.param(_gantry_tilt, "gantry_tilt", id="gantry-tilt"),
    pytest.param(_mixed_orientation, "mixed_orientation", id="mixed-orientation"),
    pytest.param(_drop_slice, "missing_slices", id="missing-slice"),
    pytest.param(_other_frame_of_reference, "mixed_series", id="two-frames-of-reference"),
]


@pytest.mark.parametrize(("damage", "code"), CASES)
def test_worker_and_model_data_agree(tmp_path: Path, damage: Callable[[list[Dataset]], None],
                                     code: str | None) -> None:
    datasets = classic_datasets(SPEC)
    damage(datasets)
    folder = tmp_path / "series"
    paths = write_datasets(datasets, folder)

    if code is None:
        volume = load_series(paths)
        image, geom, modality = load_dicom_series(folder)
        np.testing.assert_array_equal(image, volume.array)
        assert geom.spacing == volume.spacing and modality == volume.modality
        assert geom.sop_instance_uids == tuple(ref.sop_instance_uid for ref in volume.slices)
        (case,) = iter_cases(tmp_path)
        np.testing.assert_array_equal(case.image, volume.array)
        return

    with pytest.raises(SeriesError) as worker:
        load_series(paths)
    with pytest.raises(SeriesError) as model_data:
        load_dicom_series(folder)
    with pytest.raises(SeriesError) as evaluate:
        list(iter_cases(tmp_path))
    assert worker.value.reason_code == code, str(worker.value)
    assert model_data.value.reason_code == evaluate.value.reason_code == code
