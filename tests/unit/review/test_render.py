"""review.render: slices of a real (generated) DICOM series with the kept probability map over them, drawn as
PNG and read back with Pillow; grey values checked against the HU values the test wrote; the image cache
under concurrent first requests; the bank histogram as SVG.

The probability map is written by the worker's own ``save_probability``, so the reader in review is tested
against the format the worker really writes.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dicom_factory import SeriesSpec, classic_datasets, stored_values, write_datasets  # noqa: E402

from review.render import (  # noqa: E402
    CT_PRESETS,
    MASK_FILL_ALPHA,
    MASK_RGB,
    PROB_MIN,
    ImageCache,
    StudyImages,
    StudyImagesError,
    Window,
    bank_histogram_svg,
    read_probability,
    slice_png,
    slice_with_most_foreground,
)
from tests.peers import wait_for  # noqa: E402
from worker.objects import save_probability  # noqa: E402

SLICES, ROWS, COLS = 6, 64, 80  # not square: a transposed image has the wrong size
WIDE = Window(5200, 500)  # -2100..3100 HU: every HU of the series gets its own grey, none saturates


@dataclass
class Study:
    paths: list[Path]
    prob_path: Path
    hu: np.ndarray  # (z, y, x) float64, computed here from the stored values written
    mask: np.ndarray
    prob: np.ndarray


def grey(hu: np.ndarray, window: Window) -> np.ndarray:
    """The documented display formula, on the HU values the test wrote."""
    lo = window.level - window.width / 2
    return np.floor(np.clip((hu - lo) * 255.0 / window.width, 0, 255) + 0.5).astype(np.uint8)


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _write(tmp_path: Path, spec: SeriesSpec, values: np.ndarray, mask: np.ndarray, prob: np.ndarray) -> Study:
    datasets = classic_datasets(spec)  # in position order: k along the slice normal
    for k, ds in enumerate(datasets):
        ds.PixelData = values[k].astype(np.uint16).tobytes()
    paths = write_datasets(datasets, tmp_path / "series")
    prob_path = tmp_path / "prob.npz"
    save_probability(prob_path, prob, mask)
    hu = values.astype(np.float64) * spec.rescale_slope + spec.rescale_intercept
    return Study(paths, prob_path, hu, mask, prob)


def _result() -> tuple[np.ndarray, np.ndarray]:
    """A mask largest on slice 3 and off-centre (rows 10..29, columns 40..69), and a probability map with
    a confident core, an uncertain band above it and a faint patch below PROB_MIN elsewhere."""
    mask = np.zeros((SLICES, ROWS, COLS), dtype=bool)
    mask[2, 14:26, 45:65] = True
    mask[3, 10:30, 40:70] = True
    mask[4, 16:24, 50:60] = True
    prob = np.where(mask, 0.9, 0.0).astype(np.float32)
    prob[3, 4:10, 40:70] = 0.3
    prob[3, 45:55, 5:20] = 0.03
    return mask, prob


@pytest.fixture
def ct(tmp_path: Path) -> Study:
    """Slice 0 is a ramp of every HU from -2048 to 3071 (stored 0..5119, intercept -2048)."""
    spec = SeriesSpec(slices=SLICES, rows=ROWS, cols=COLS, modality="CT", rescale_intercept=-2048.0, seed=3)
    values = stored_values(spec).astype(np.int64)
    values[0] = np.arange(ROWS * COLS).reshape(ROWS, COLS)
    mask, prob = _result()
    return _write(tmp_path, spec, values, mask, prob)


@pytest.fixture
def mr(tmp_path: Path) -> Study:
    """Slice 0 holds only 0..99 while the others span 0..2999: a per-slice window would differ."""
    spec = SeriesSpec(slices=SLICES, rows=ROWS, cols=COLS, modality="MR", rescale_intercept=0.0, seed=4)
    values = stored_values(spec).astype(np.int64)
    values[0] = np.random.default_rng(5).integers(0, 100, (ROWS, COLS))
    mask, prob = _result()
    return _write(tmp_path, spec, values, mask, prob)


@pytest.fixture
def ct_images(ct: Study) -> StudyImages:
    return StudyImages.open(ct.paths, ct.prob_path)


# --------------------------------------------------------------------------------------- opening
def test_open_reads_the_series_and_the_worker_s_probability_map(ct: Study, ct_images: StudyImages) -> None:
    assert (ct_images.modality, ct_images.n_slices, ct_images.shape) == ("CT", SLICES, (SLICES, ROWS, COLS))
    assert ct_images.spacing == pytest.approx((2.5, 0.8, 0.7))
    np.testing.assert_array_equal(ct_images.volume.array, ct.hu)  # z=0 is the first slice along the normal
    np.testing.assert_array_equal(ct_images.mask, ct.mask)
    np.testing.assert_allclose(ct_images.probability(3), ct.prob[3], atol=0.5 / 255 + 1e-6)
    assert ct_images.nbytes == ct.hu.size * (4 + 1 + 1)
    assert ct_images.default_window == "soft_tissue"


def test_a_probability_map_of_another_shape_is_refused(ct: Study, tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    save_probability(other, np.zeros((SLICES, ROWS, COLS - 1)), np.zeros((SLICES, ROWS, COLS - 1), bool))
    with pytest.raises(StudyImagesError, match=rf"\({SLICES}, {ROWS}, {COLS}\).*\({SLICES}, {ROWS}, {COLS - 1}\)"):
        StudyImages.open(ct.paths, other)


def test_a_damaged_probability_file_is_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    shape = np.asarray((2, 4, 4), dtype=np.int64)
    np.savez_compressed(tmp_path / "short.npz", prob_fg_u8=np.zeros((2, 4, 4), np.uint8), scale=np.float32(1 / 255),
                        mask_bits=np.zeros(3, np.uint8), shape=shape)
    with pytest.raises(StudyImagesError, match="mask_bits holds 3 uint8 bytes.*needs 4"):
        read_probability(tmp_path / "short.npz")
    np.savez_compressed(tmp_path / "noscale.npz", prob_fg_u8=np.zeros((2, 4, 4), np.uint8),
                        mask_bits=np.zeros(4, np.uint8), shape=shape)
    with pytest.raises(StudyImagesError, match="missing scale"):
        read_probability(tmp_path / "noscale.npz")


# --------------------------------------------------------------------------------------- slices
@pytest.mark.parametrize("overlay", ["mask", "prob", "none"])
def test_png_has_the_slice_s_size(ct_images: StudyImages, overlay: str) -> None:
    image = Image.open(io.BytesIO(slice_png(ct_images, 3, overlay=overlay)))
    assert image.size == (COLS, ROWS)


def test_mask_overlay_colours_the_mask_and_leaves_the_rest_plain_grey(ct: Study, ct_images: StudyImages) -> None:
    rgb = decode(slice_png(ct_images, 3, window=WIDE, overlay="mask")).astype(int)
    plain = grey(ct.hu[3], WIDE).astype(int)
    mask = ct.mask[3]
    edge = np.zeros_like(mask)
    edge[10, 40:70] = edge[29, 40:70] = edge[10:30, 40] = edge[10:30, 69] = True
    inside = mask & ~edge
    np.testing.assert_array_equal(rgb[edge], np.broadcast_to(MASK_RGB, (edge.sum(), 3)))
    blended = plain[inside][:, None] * (1 - MASK_FILL_ALPHA) + np.asarray(MASK_RGB) * MASK_FILL_ALPHA
    assert np.abs(rgb[inside] - blended).max() <= 1
    far = np.ones_like(mask)
    far[8:32, 38:72] = False  # two pixels around the mask
    far[4:10, 40:70] = False
    np.testing.assert_array_equal(rgb[far], np.repeat(plain[far][:, None], 3, axis=1))


def test_no_overlay_is_the_plain_windowed_slice_without_colour(ct: Study, ct_images: StudyImages) -> None:
    image = Image.open(io.BytesIO(slice_png(ct_images, 3, window=WIDE, overlay="none")))
    rgb = np.asarray(image.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], grey(ct.hu[3], WIDE))


def test_probability_overlay_is_transparent_below_the_threshold(ct: Study, ct_images: StudyImages) -> None:
    rgb = decode(slice_png(ct_images, 3, window=WIDE, overlay="prob")).astype(int)
    plain = grey(ct.hu[3], WIDE)
    stored = np.round(ct.prob[3] * 255) / 255
    shown = stored >= PROB_MIN
    assert shown.sum() == 20 * 30 + 6 * 30
    np.testing.assert_array_equal(rgb[~shown], np.repeat(plain[~shown][:, None], 3, axis=1))
    coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    assert coloured[shown].mean() > 0.99  # a grey pixel that blends to grey may happen, rarely
    confident, uncertain = rgb[10:30, 40:70].reshape(-1, 3).mean(0), rgb[4:10, 40:70].reshape(-1, 3).mean(0)
    assert confident[1] > uncertain[1]  # plasma: yellow at 0.9, magenta at 0.3


@pytest.mark.parametrize("name", list(CT_PRESETS))
def test_each_ct_preset_maps_its_level_to_mid_grey_and_its_edges_to_black_and_white(
        ct: Study, ct_images: StudyImages, name: str) -> None:
    window = CT_PRESETS[name]
    pixels = np.asarray(Image.open(io.BytesIO(slice_png(ct_images, 0, window=name, overlay="none"))).convert("L"))
    ramp = ct.hu[0]

    def at(hu: float) -> int:
        (where,) = np.flatnonzero(ramp == hu)
        return int(pixels.ravel()[where])

    lo, hi = window.level - window.width / 2, window.level + window.width / 2
    assert at(window.level) in (127, 128)
    assert (at(lo), at(lo - 1), at(hi), at(hi + 1)) == (0, 0, 255, 255)
    quarter = round(window.width / 4)
    assert abs(at(lo + quarter) - quarter * 255 / window.width) <= 0.5
    assert abs(at(hi - quarter) - (255 - quarter * 255 / window.width)) <= 0.5
    np.testing.assert_array_equal(pixels, grey(ramp, window))


def test_ct_presets_are_the_conventional_windows() -> None:
    assert {k: (w.width, w.level) for k, w in CT_PRESETS.items()} == {
        "soft_tissue": (400, 40), "lung": (1500, -600), "bone": (1800, 400), "brain": (80, 40),
        "liver": (150, 60)}


def test_the_default_window_is_the_modality_s(ct: Study, ct_images: StudyImages, mr: Study) -> None:
    assert slice_png(ct_images, 3, overlay="none") == slice_png(ct_images, 3, window="soft_tissue", overlay="none")
    mr_images = StudyImages.open(mr.paths, mr.prob_path)
    assert mr_images.default_window == "auto"
    assert slice_png(mr_images, 3, overlay="none") == slice_png(mr_images, 3, window="auto", overlay="none")


def test_mr_auto_window_is_the_volume_s_percentiles_computed_once(mr: Study) -> None:
    images = StudyImages.open(mr.paths, mr.prob_path)
    p1, p99 = np.percentile(mr.hu, [1, 99])
    assert images.windows["auto"].bounds == pytest.approx((p1, p99))
    assert images.windows["full"].bounds == pytest.approx((mr.hu.min(), mr.hu.max()))
    dim = decode(slice_png(images, 0, window="auto", overlay="none"))[..., 0]
    np.testing.assert_array_equal(dim, grey(mr.hu[0], images.windows["auto"]))  # the volume's, not slice 0's
    assert dim.max() < 30
    # slices use the window computed at open, never one of their own: change it, and the slices follow
    other = Window(50, 25)
    changed = dataclasses.replace(images, windows=MappingProxyType({**images.windows, "auto": other}))
    np.testing.assert_array_equal(decode(slice_png(changed, 4, window="auto", overlay="none"))[..., 0],
                                  grey(mr.hu[4], other))


def test_unknown_names_and_slices_out_of_range_are_refused(ct_images: StudyImages, mr: Study) -> None:
    with pytest.raises(ValueError, match="'abdomen'"):
        slice_png(ct_images, 0, window="abdomen")
    with pytest.raises(ValueError, match="'lung'.*MR"):
        slice_png(StudyImages.open(mr.paths, mr.prob_path), 0, window="lung")
    with pytest.raises(ValueError, match="'outline'"):
        slice_png(ct_images, 0, overlay="outline")
    for z in (SLICES, -1):
        with pytest.raises(IndexError, match=rf"slice {z} is outside 0\.\.{SLICES - 1}"):
            slice_png(ct_images, z)


def test_the_page_opens_on_the_slice_with_most_foreground(ct: Study, ct_images: StudyImages) -> None:
    assert slice_with_most_foreground(ct_images) == 3
    no_mask = dataclasses.replace(ct_images.prob, mask=np.zeros_like(ct.mask))
    assert slice_with_most_foreground(dataclasses.replace(ct_images, prob=no_mask)) == 3  # the most probability
    nothing = dataclasses.replace(no_mask, prob_u8=np.zeros_like(ct_images.prob.prob_u8))
    assert slice_with_most_foreground(dataclasses.replace(ct_images, prob=nothing)) == SLICES // 2


# --------------------------------------------------------------------------------------- the cache
def test_cache_evicts_the_least_recently_used_by_bytes(ct_images: StudyImages) -> None:
    size = ct_images.nbytes
    loads: list[str] = []

    def loader(key: str):
        def load() -> StudyImages:
            loads.append(key)
            return ct_images
        return load

    cache = ImageCache(max_bytes=2 * size + size // 2)
    for key in ("a", "b", "a", "c"):  # "a" used again after "b": "b" is the least recently used
        assert cache.get(key, loader(key)) is ct_images
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions, stats.hits, stats.misses) == (2, 2 * size, 1, 1, 3)
    cache.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"] and "a" not in cache

    small = ImageCache(max_bytes=size // 2)  # one study bigger than the bound is still served, alone
    small.get("a", loader("a"))
    small.get("b", loader("b"))
    assert ("a" in small, "b" in small, small.stats().bytes) == (False, True, size)
    small.discard("b")
    assert small.stats().bytes == 0 and "b" not in small
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(max_bytes=0)


def test_concurrent_first_requests_load_a_key_once(ct_images: StudyImages) -> None:
    cache = ImageCache()
    calls: list[int] = []
    entered, release = threading.Event(), threading.Event()

    def load() -> StudyImages:
        calls.append(1)
        entered.set()
        assert release.wait(30)
        return ct_images

    results: list[StudyImages] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(17, load))) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        assert entered.wait(30)
        wait_for(lambda: cache.stats().waiting == 7, timeout=30, what="7 requests waiting on the first load")
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert len(calls) == 1
    assert len(results) == 8 and all(r is ct_images for r in results)
    stats = cache.stats()
    assert (stats.misses, stats.entries, stats.loading, stats.waiting) == (1, 1, 0, 0)
    assert cache.get(17, load) is ct_images and len(calls) == 1


def test_a_failed_load_reaches_every_waiter_and_is_not_cached(ct_images: StudyImages) -> None:
    cache = ImageCache()
    entered, release = threading.Event(), threading.Event()
    boom = FileNotFoundError("spool file gone")

    def failing() -> StudyImages:
        entered.set()
        assert release.wait(30)
        raise boom

    errors: list[BaseException] = []

    def request() -> None:
        try:
            cache.get("job", failing)
        except FileNotFoundError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert entered.wait(30)
        wait_for(lambda: cache.stats().waiting == 2, timeout=30, what="2 requests waiting on the failing load")
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert len(errors) == 3 and all(e is boom for e in errors)
    assert "job" not in cache and cache.stats().loading == 0
    assert cache.get("job", lambda: ct_images) is ct_images  # the next request tries again


# --------------------------------------------------------------------------------------- evidence
def _svg_text(svg: str) -> str:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return " ".join("".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text"))


BANK = list(np.random.default_rng(0).gamma(4.0, 0.01, 120))


def test_bank_histogram_is_inline_svg_with_tau_and_this_study() -> None:
    svg = bank_histogram_svg(BANK, 0.09, 0.07)
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg
    text = _svg_text(svg)
    assert "tau" in text and "this study" in text and "n=120" in text
    assert "OODM" in text and "training images" in text
    assert "beyond the axis" not in text


@pytest.mark.parametrize("oodm", [40.0, float("inf")])
def test_an_oodm_far_beyond_the_bank_is_marked_at_the_axis_edge(oodm: float) -> None:
    text = _svg_text(bank_histogram_svg(BANK, oodm, 0.07))
    assert "this study" in text and "beyond the axis" in text
    x_ticks = [float(t) for t in text.split() if "." in t and t.replace(".", "", 1).isdigit()]
    assert 0.1 <= max(x_ticks) < 1.0  # the OODM axis stays on the bank's scale, not stretched to 40


def test_bank_histogram_without_a_recorded_bank() -> None:
    text = _svg_text(bank_histogram_svg([], 0.05, 0.07))
    assert "tau" in text and "this study" in text and "no bank distribution" in text
