"""review.render with a multi-label result: the label map and its legend read from ``prob.npz`` (the
arrays written by the worker's ``worker.segments.review_arrays``), each label drawn in its colour, the
legend's volumes; a file with only a label map, and damaged legends."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dicom_factory import SeriesSpec, classic_datasets, write_datasets  # noqa: E402

from dicom_node.config import SeriesRule  # noqa: E402
from model.adapters.base import Label  # noqa: E402
from review.render import (  # noqa: E402
    MASK_FILL_ALPHA,
    StudyImages,
    StudyImagesError,
    Window,
    read_probability,
    slice_png,
    slice_with_most_foreground,
)
from store.results import fallback_rgb  # noqa: E402
from worker.segments import PALETTE, review_arrays, segments_for  # noqa: E402

SLICES, ROWS, COLS = 5, 40, 48
FLAT = Window(400, 40)
LABELS = (Label(1, "liver"), Label(2, "spleen"), Label(3, "kidney_left"), Label(7, "lesion"))


def _label_map() -> np.ndarray:
    lm = np.zeros((SLICES, ROWS, COLS), dtype=np.uint8)
    lm[2, 5:20, 5:25] = 1
    lm[2, 25:35, 30:44] = 2
    lm[2, 5:12, 30:40] = 3  # not sent by the rule below: must not be drawn or listed
    lm[3, 10:14, 10:14] = 7
    return lm


def _write(tmp_path: Path, arrays: dict[str, np.ndarray], *, mask_bits: bool = False) -> tuple[list[Path], Path]:
    spec = SeriesSpec(slices=SLICES, rows=ROWS, cols=COLS, modality="CT", rescale_intercept=-1024.0, seed=7)
    datasets = classic_datasets(spec)
    for ds in datasets:  # a flat 40 HU image: every pixel the same grey, so colours can be checked exactly
        ds.PixelData = np.full((ROWS, COLS), 1064, dtype=np.uint16).tobytes()
    paths = write_datasets(datasets, tmp_path / "series")
    shape = (SLICES, ROWS, COLS)
    extra = {"mask_bits": np.packbits(_label_map() > 0, axis=None)} if mask_bits else {}
    np.savez_compressed(tmp_path / "prob.npz", prob_fg_u8=np.zeros(shape, np.uint8), scale=np.float32(1 / 255),
                        shape=np.asarray(shape, dtype=np.int64), **extra, **arrays)
    return paths, tmp_path / "prob.npz"


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _blended(rgb: tuple[int, int, int], grey: int = 128) -> list[int]:
    return [int(grey * (1 - MASK_FILL_ALPHA) + c * MASK_FILL_ALPHA + 0.5) for c in rgb]


def test_each_label_is_drawn_in_its_colour_and_listed_with_its_volume(tmp_path: Path) -> None:
    segments = segments_for(SeriesRule(name="r", labels=("liver", "spleen", "lesion")), LABELS)
    paths, prob = _write(tmp_path, review_arrays(_label_map(), segments))
    images = StudyImages.open(paths, prob)

    legend = images.legend
    assert [(lab.value, lab.name, lab.rgb) for lab in legend] == [(1, "liver", PALETTE[0]), (2, "spleen", PALETTE[1]),
                                                                  (7, "lesion", PALETTE[6])]
    voxel_ml = float(np.prod(images.spacing)) / 1000
    assert [lab.voxels for lab in legend] == [15 * 20, 10 * 14, 16]
    assert [lab.largest_slice for lab in legend] == [2, 2, 3]
    assert legend[0].volume_ml == pytest.approx(300 * voxel_ml) and legend[0].hex == "#e6194b"
    assert slice_with_most_foreground(images) == 2

    png = _rgb(slice_png(images, 2, window=FLAT, overlay="mask"))
    assert png.shape == (ROWS, COLS, 3)
    assert png[0, 0].tolist() == [128, 128, 128]  # background: the grey slice
    assert png[10, 10].tolist() == _blended(PALETTE[0])  # inside the liver
    assert png[5, 10].tolist() == list(PALETTE[0])  # its outline, opaque
    assert png[30, 35].tolist() == _blended(PALETTE[1])  # inside the spleen
    assert png[25, 35].tolist() == list(PALETTE[1])
    assert png[8, 35].tolist() == [128, 128, 128]  # the left kidney: not sent, not drawn
    lesion = _rgb(slice_png(images, 3, window=FLAT, overlay="mask"))
    assert lesion[12, 12].tolist() == _blended(PALETTE[6]) and lesion[10, 12].tolist() == list(PALETTE[6])
    plain = _rgb(slice_png(images, 2, window=FLAT, overlay="none"))
    assert (plain == 128).all()


def test_a_file_with_only_a_label_map_lists_its_values(tmp_path: Path) -> None:
    paths, prob = _write(tmp_path, {"labels": _label_map()}, mask_bits=True)
    read = read_probability(prob)
    assert [(lab.value, lab.name, lab.rgb) for lab in read.legend] == [
        (v, f"label {v}", fallback_rgb(v)) for v in (1, 2, 3, 7)]
    np.testing.assert_array_equal(read.mask, _label_map() > 0)
    assert len({lab.rgb for lab in read.legend}) == 4
    images = StudyImages.open(paths, prob)
    png = _rgb(slice_png(images, 2, window=FLAT))
    assert png[8, 35].tolist() == _blended(fallback_rgb(3))


@pytest.mark.parametrize(("change", "message"), [
    ({"label_colors": np.zeros((2, 3), np.uint8)}, r"label_colors must be \(3, 3\) uint8 RGB"),
    ({"label_names": np.array(["a", "b"])}, "label_names must be 3 strings"),
    ({"label_values": np.array([1, 1, 2], np.uint16)}, r"label_values must be distinct integers >= 1, got \[1, 1, 2\]"),
    ({"labels": np.zeros((SLICES, ROWS, COLS - 1), np.uint8)}, r"labels has shape \(5, 40, 47\)"),
    ({"labels": np.zeros((SLICES, ROWS, COLS), np.int32)}, "must be uint8 or uint16"),
])
def test_a_damaged_legend_is_refused_naming_what_is_wrong(tmp_path: Path, change: dict, message: str) -> None:
    segments = segments_for(SeriesRule(name="r", labels=("liver", "spleen", "lesion")), LABELS)
    arrays = {**review_arrays(_label_map(), segments), **change}
    _, prob = _write(tmp_path, arrays)
    with pytest.raises(StudyImagesError, match=message):
        read_probability(prob)


def test_without_labels_or_mask_bits_the_file_is_not_a_probability_map(tmp_path: Path) -> None:
    _, prob = _write(tmp_path, {})
    with pytest.raises(StudyImagesError, match="missing mask_bits"):
        read_probability(prob)
