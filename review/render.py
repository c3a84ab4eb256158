"""The study page's pictures: one slice of the source series with the model's result over it, as PNG, and
the gate's evidence (the bank's own OODM distribution with this study marked) as inline SVG.

Slices are drawn on request from what the worker kept: the original DICOM files in the spool (read with
:func:`dicom_series.load_series`, the one loader the worker segmented from, so a voxel here is the voxel
the model saw) and the probability map ``prob.npz`` (read by :func:`read_probability`; the format is
written by the worker's ``save_probability``, which this package does not import). A multi-label result
adds its label map and legend to that file (keys in :func:`read_probability`, written by
``worker.segments.review_arrays``); each label is then drawn in its own colour, and
:attr:`StudyImages.legend` lists the labels with their volumes for the study page.

Why Pillow and NumPy, not matplotlib, for slices: a radiologist holds the arrow key and expects the next
slice at once. On this project's 2-core machine (``bench/review_slices.py``, a 512x512 CT slice): the
plain slice takes a median 4-5 ms, with the mask 8-11 ms, with the probability heat map 11-15 ms, with
the mask in the lung window (noisy air: larger files) 16-18 ms; p95 at most 27 ms, against the issue's
100 ms. Windowing is ~0.3 ms of NumPy; most of the time is Pillow's PNG encoder. The same slice drawn by
matplotlib (``imshow`` + ``contour`` + ``savefig``, no pyplot) measured a median 131 ms. PNG
``compress_level=1`` against Pillow's default 6 measured 18 ms against 39 ms for a noisy 512x512 RGB
slice, for files ~20 % smaller at 6: not worth it on a LAN.

Opening a study (``load_series`` of every file plus ``prob.npz``) measured 0.27 s for 120 slices and
1.1 s for 300 (files in the page cache; a cold spool disk is slower), and a 300-slice CT holds 472 MB
here; so :class:`ImageCache` keeps the studies being read, bounded by bytes.

    >>> Window(400, 40).bounds
    (-160.0, 240.0)
    >>> windows_for("CT")["lung"]
    Window(width=1500.0, level=-600.0)
"""

from __future__ import annotations

import dataclasses
import io
import math
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from os import PathLike
from types import MappingProxyType

import numpy as np

from dicom_series import Volume, load_series
from store.results import MASK_RGB, LabelInfo, ProbabilityMap, ResultFileError, read_probability

__all__ = [
    "CT_PRESETS",
    "DEFAULT_CACHE_BYTES",
    "OVERLAYS",
    "CacheStats",
    "ImageCache",
    "LabelInfo",
    "MASK_FILL_ALPHA",
    "MASK_RGB",
    "PROB_MIN",
    "ProbabilityMap",
    "StudyImages",
    "StudyImagesError",
    "Window",
    "bank_histogram_svg",
    "read_probability",
    "slice_png",
    "slice_with_most_foreground",
    "windows_for",
]

DEFAULT_CACHE_BYTES = 2 * 1024**3
"""2 GiB: four 512x512x300 CTs (each ~470 MB here: float32 volume, uint8 probability, bool mask)."""

OVERLAYS = ("mask", "prob", "none")

MASK_FILL_ALPHA = 0.35
"""Opacity of the fill inside the mask: the anatomy under it stays readable; the outline is opaque."""
PROB_MIN = 0.05
"""Probabilities below this are not drawn: the heat map would otherwise tint the whole body faintly."""
PNG_COMPRESS_LEVEL = 1


#: the kept files of one job do not agree with each other (shapes), or ``prob.npz`` is not one
StudyImagesError = ResultFileError


# --------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """A display window in the series' native units (HU for CT): ``width`` and ``level`` (centre).

    Grey value of a voxel ``x``: ``floor(clip((x - lo) * 255 / width, 0, 255) + 0.5)`` with
    ``lo = level - width / 2``, computed in float64. So ``level`` maps to mid-grey (127.5, drawn 128),
    ``level - width/2`` and below to 0, ``level + width/2`` and above to 255. (DICOM's VOI LUT formula,
    PS3.3 C.11.2.1.2, centres on ``level - 0.5`` and divides by ``width - 1``: within 2 grey levels of
    this for every preset here; the symmetric form is the one a W/L reading states.)
    """

    width: float
    level: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.width) and math.isfinite(self.level)) or self.width <= 0:
            raise ValueError(f"a window needs a finite width > 0 and a finite level, got "
                             f"width={self.width!r} level={self.level!r}")
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "level", float(self.level))

    @classmethod
    def from_range(cls, lo: float, hi: float) -> Window:
        """The window from ``lo`` to ``hi``; a flat range (a constant image) gets width 1."""
        width = float(hi) - float(lo)
        return cls(width if width > 0 else 1.0, (float(lo) + float(hi)) / 2)

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.level - self.width / 2, self.level + self.width / 2)

    def grey(self, values: np.ndarray) -> np.ndarray:
        """``values`` (any shape) -> uint8 grey, by the formula above."""
        lo = self.level - self.width / 2
        g = (np.asarray(values, dtype=np.float64) - lo) * 255.0 / self.width
        np.clip(g, 0.0, 255.0, out=g)
        g += 0.5
        return g.astype(np.uint8)  # truncation after +0.5: round half up


CT_PRESETS: Mapping[str, Window] = MappingProxyType({
    "soft_tissue": Window(400, 40),
    "lung": Window(1500, -600),
    "bone": Window(1800, 400),
    "brain": Window(80, 40),
    "liver": Window(150, 60),
})
"""Conventional CT windows in HU. The first is CT's default."""


def windows_for(modality: str, array: np.ndarray | None = None) -> Mapping[str, Window]:
    """The named windows a series of ``modality`` offers, the default first.

    CT: :data:`CT_PRESETS` (HU is a calibrated scale, so fixed windows mean the same on every scanner).
    Anything else (MR, PET): MR intensities have no absolute scale, so its windows come from the volume
    itself: ``"auto"``, the 1st to 99th percentile of every voxel (a few bright vessels or fat do not
    wash the image out), and ``"full"``, minimum to maximum. Both are computed here, once per study
    (:meth:`StudyImages.open` calls this), never per slice: slices would otherwise flicker in brightness
    as the radiologist steps through them. ``array`` is required for those.
    """
    if modality.upper() == "CT":
        return CT_PRESETS
    if array is None:
        raise ValueError(f"the {modality} windows are computed from the volume: pass its array")
    if array.size == 0:
        raise ValueError(f"cannot compute {modality} windows of an empty volume {array.shape}")
    p1, p99 = (float(v) for v in np.percentile(array, [1.0, 99.0]))
    return MappingProxyType({"auto": Window.from_range(p1, p99),
                             "full": Window.from_range(float(array.min()), float(array.max()))})


# --------------------------------------------------------------------------------------- the files
@dataclass(frozen=True, eq=False)
class StudyImages:
    """Everything needed to draw one job's slices. Build it with :meth:`open`; the constructor checks
    that the parts agree and does no I/O.

    ``windows`` are the named windows this series offers (:func:`windows_for`, already computed) and
    ``default_window`` the one a page opens with. Axes are the loader's: ``(z, y, x)``, z=0 the first
    slice along the slice normal (row cosine x column cosine): for an axial series in the usual
    orientation the normal points to the head, so z=0 is the slice nearest the feet.
    """

    volume: Volume
    prob: ProbabilityMap
    windows: Mapping[str, Window]
    default_window: str

    def __post_init__(self) -> None:
        if self.volume.shape != self.prob.shape:
            raise StudyImagesError(f"the series is {self.volume.shape} (z, y, x) but its probability map is "
                                   f"{self.prob.shape}: they are not from the same series or version")
        if self.default_window not in self.windows:
            raise ValueError(f"default window {self.default_window!r} is not one of {sorted(self.windows)}")

    @classmethod
    def open(cls, series_paths: Sequence[str | PathLike[str]], prob_path: str | PathLike[str]) -> StudyImages:
        """Load the series (every file of it, any order) and the kept probability map.

        Raises :class:`dicom_series.SeriesError` for a series that cannot be loaded, FileNotFoundError
        for a missing file and :class:`StudyImagesError` when the two do not fit together. MR windows
        are computed here (a percentile pass over the volume, once per study).
        """
        volume = load_series(series_paths)
        prob = read_probability(prob_path)
        windows = windows_for(volume.modality, volume.array)
        return cls(volume=volume, prob=prob, windows=windows, default_window=next(iter(windows)))

    @property
    def modality(self) -> str:
        return self.volume.modality

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) in mm."""
        return self.volume.spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def n_slices(self) -> int:
        return self.volume.shape[0]

    @property
    def mask(self) -> np.ndarray:
        return self.prob.mask

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (what :class:`ImageCache` counts)."""
        return int(self.volume.array.nbytes + self.prob.nbytes)

    @cached_property
    def legend(self) -> tuple[LabelInfo, ...]:
        """A multi-label result's labels (empty for a one-mask result), in the SEG's order, each with its
        voxels, volume in mL (voxel count times the series' voxel volume) and the slice where it is largest
        (the first such; the middle slice for a label with no voxel): computed once, on first use, slice by
        slice (a 512x512x300 label map is never widened)."""
        if self.prob.labels is None:
            return ()
        size = max(int(self.prob.labels.max(initial=0)), max(lab.value for lab in self.prob.legend)) + 1
        per_slice = np.stack([np.bincount(plane.ravel(), minlength=size) for plane in self.prob.labels])
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        out = []
        for lab in self.prob.legend:
            column = per_slice[:, lab.value]
            voxels = int(column.sum())
            out.append(dataclasses.replace(lab, voxels=voxels, volume_ml=voxels * voxel_ml,
                                           largest_slice=int(np.argmax(column)) if voxels else self.n_slices // 2))
        return tuple(out)

    def probability(self, z: int) -> np.ndarray:
        """The foreground probability of slice ``z`` as float32 in [0, 1]."""
        return self.prob.prob_u8[self._z(z)].astype(np.float32) * np.float32(self.prob.scale)

    def window(self, window: str | Window | None) -> Window:
        """A named window of this series, an explicit :class:`Window`, or None for the default."""
        if isinstance(window, Window):
            return window
        name = self.default_window if window is None else window
        found = self.windows.get(name)
        if found is None:
            raise ValueError(f"unknown window preset {name!r} for {self.modality}; "
                             f"one of {', '.join(self.windows)}")
        return found

    @cached_property
    def foreground_per_slice(self) -> np.ndarray:
        """Mask voxels per slice (int64, one per z): computed once, on first use."""
        return np.count_nonzero(self.prob.mask.reshape(self.n_slices, -1), axis=1)

    def _z(self, z: int) -> int:
        index = operator.index(z)
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} is outside 0..{self.n_slices - 1} ({self.n_slices} slices)")
        return index


def slice_with_most_foreground(images: StudyImages) -> int:
    """The slice the study page opens on: the most mask voxels (the first such slice on a tie); with an
    empty mask the slice of highest summed probability; with no probability at all the middle slice."""
    counts = images.foreground_per_slice
    if counts.max() > 0:
        return int(np.argmax(counts))
    sums = images.prob.prob_u8.reshape(images.n_slices, -1).sum(axis=1, dtype=np.int64)
    return int(np.argmax(sums)) if sums.max() > 0 else images.n_slices // 2


# --------------------------------------------------------------------------------------- slices
_PLASMA = np.array([  # matplotlib's "plasma" at 0, 1/8 .. 1: perceptually even, no black end to vanish
    (13, 8, 135), (76, 2, 161), (126, 3, 168), (170, 35, 149), (204, 71, 120),
    (230, 108, 92), (248, 149, 64), (253, 197, 39), (240, 249, 33)], dtype=np.float64)


@lru_cache(maxsize=8)
def _heat_lut(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """For every stored uint8 value: its heat colour (256, 3) float32 and opacity (256,) float32.

    Opacity 0 below :data:`PROB_MIN`, then rising from 0.35 to 0.7 with the probability, so uncertain
    fringes tint the anatomy and confident voxels cover it more.
    """
    p = np.clip(np.arange(256, dtype=np.float64) * scale, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_PLASMA))
    rgb = np.stack([np.interp(p, stops, _PLASMA[:, c]) for c in range(3)], axis=1)
    alpha = np.where(p >= PROB_MIN, 0.35 + 0.35 * p, 0.0)
    return rgb.astype(np.float32), alpha.astype(np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return mask & ~inner


def _blend(rgb: np.ndarray, where: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> None:
    """``rgb[where] = round(grey * (1 - alpha) + colour * alpha)`` in place (rgb is still grey there);
    ``colour`` is one (3,) colour or one per pixel, ``alpha`` one value or one per pixel."""
    grey = rgb[where][:, :1].astype(np.float32)
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim:
        a = a[:, None]
    rgb[where] = (grey * (1 - a) + colour * a + 0.5).astype(np.uint8)


def slice_png(images: StudyImages, z: int, *, window: str | Window | None = None, overlay: str = "mask") -> bytes:
    """Slice ``z`` of the series as PNG bytes, windowed, with the model's result drawn over it.

    ``z``: the volume index 0..n-1 in the loader's order (:class:`StudyImages`: z=0 is the first slice
    along the slice normal, the feet end of a usual axial series); out of range -> IndexError naming the
    range. ``window``: a preset name of this series (``images.windows``), a :class:`Window`, or None for
    the series' default; an unknown name -> ValueError naming it. ``overlay``:

    * ``"mask"``: the mask filled in :data:`MASK_RGB` at :data:`MASK_FILL_ALPHA`, with its outline (mask
      pixels with a 4-neighbour outside it) opaque, so the boundary the model drew is exact to the pixel;
      a multi-label result: each label of the legend filled in its own colour at the same opacity, with
      its outline (label pixels with a 4-neighbour of another value) opaque in that colour;
    * ``"prob"``: the foreground probability as a heat map (plasma colours), blended, not drawn below
      :data:`PROB_MIN`;
    * ``"none"``: the plain windowed slice (a greyscale PNG).

    Orientation: row 0 at the top and column 0 at the left, as the DICOM pixel data is stored; no flips
    and no resampling (one image pixel per DICOM pixel; non-square pixels are the page's to scale).
    The output is deterministic, so the caller may cache it or send an ETag.
    """
    if overlay not in OVERLAYS:
        raise ValueError(f"unknown overlay {overlay!r}; one of {', '.join(OVERLAYS)}")
    index = images._z(z)
    grey = images.window(window).grey(images.volume.array[index])
    if overlay == "none":
        return _encode(grey)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if overlay == "mask" and images.prob.labels is not None:
        _draw_labels(rgb, images.prob.labels[index], images.prob.legend)
    elif overlay == "mask":
        mask = images.prob.mask[index]
        if mask.any():
            edge = _outline(mask)
            _blend(rgb, mask & ~edge, np.asarray(MASK_RGB, dtype=np.float32), MASK_FILL_ALPHA)
            rgb[edge] = MASK_RGB
    else:
        colours, alphas = _heat_lut(images.prob.scale)
        stored = images.prob.prob_u8[index]
        shown = alphas[stored] > 0
        if shown.any():
            values = stored[shown]
            _blend(rgb, shown, colours[values], alphas[values])
    return _encode(rgb)


def _draw_labels(rgb: np.ndarray, labels: np.ndarray, legend: Sequence[LabelInfo]) -> None:
    """Each legend label of one slice's ``labels`` in its colour, in place on the grey ``rgb``: filled at
    :data:`MASK_FILL_ALPHA` (the same rounding as :func:`_blend`), its outline (a 4-neighbour of another
    value, or the image border) opaque. Whole-frame arithmetic through look-up tables, not boolean
    selections: 20 labels on a 512x512 slice measured 9 ms here against 24 ms selected."""
    size = max(int(labels.max(initial=0)), max(lab.value for lab in legend)) + 1
    colours = np.zeros((size, 3), dtype=np.float32)
    alphas = np.zeros(size, dtype=np.float32)
    for lab in legend:
        colours[lab.value] = lab.rgb
        alphas[lab.value] = MASK_FILL_ALPHA
    a = alphas[labels]
    if not a.any():
        return
    edge = np.ones(labels.shape, dtype=bool)
    inner = edge[1:-1, 1:-1]
    centre = labels[1:-1, 1:-1]
    inner[...] = ((centre == labels[:-2, 1:-1]) & (centre == labels[2:, 1:-1])
                  & (centre == labels[1:-1, :-2]) & (centre == labels[1:-1, 2:]))
    np.logical_not(inner, out=inner)
    a[edge & (a > 0)] = 1.0
    grey = rgb[:, :, :1].astype(np.float32)
    rgb[...] = (grey * (1 - a[:, :, None]) + colours[labels] * a[:, :, None] + 0.5).astype(np.uint8)


def _encode(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


# --------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int  # loads started
    evictions: int
    loading: int  # keys being loaded now
    waiting: int  # requests waiting for another request's load of the same key


class _Load:
    """One key's load in flight: the requests that arrive meanwhile wait for its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: StudyImages | None = None
        self.error: BaseException | None = None


class ImageCache:
    """A thread-safe LRU of :class:`StudyImages`, keyed by what the caller gives (the job id: each version
    of a study is its own job row, so a newer version is never drawn from an older one's arrays), bounded
    by bytes.

    A web server keeps one for the process. :meth:`get` returns the cached images or calls ``load`` to
    make them; concurrent first requests for one key (the page and its first slices arrive together) run
    ``load`` once, the others wait for it and get the same object, or the same exception. Loads of
    different keys run in parallel, outside the lock. After a load, least recently used entries are
    dropped until the total is within ``max_bytes``; the entry just loaded is always kept, so a single
    study larger than the bound is still served (the bound is then exceeded by that one study).

        >>> cache = ImageCache(max_bytes=1024**3)
        >>> cache.stats().entries
        0
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, StudyImages] = OrderedDict()
        self._loads: dict[Hashable, _Load] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._waiting = 0

    def get(self, key: Hashable, load: Callable[[], StudyImages]) -> StudyImages:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return found
            pending = self._loads.get(key)
            owner = pending is None
            if pending is None:
                pending = self._loads[key] = _Load()
                self._misses += 1
            else:
                self._waiting += 1
        if not owner:
            return self._wait(pending)
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._loads[key]
            pending.error = exc
            pending.done.set()
            raise
        with self._lock:
            del self._loads[key]
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
                self._evictions += 1
        pending.value = value
        pending.done.set()
        return value

    def _wait(self, pending: _Load) -> StudyImages:
        try:
            pending.done.wait()
        finally:
            with self._lock:
                self._waiting -= 1
        if pending.error is not None:
            raise pending.error
        assert pending.value is not None
        return pending.value

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (a decided or superseded job); a load of it in flight still completes."""
        with self._lock:
            dropped = self._entries.pop(key, None)
            if dropped is not None:
                self._bytes -= dropped.nbytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(entries=len(self._entries), bytes=self._bytes, max_bytes=self.max_bytes,
                              hits=self._hits, misses=self._misses, evictions=self._evictions,
                              loading=len(self._loads), waiting=self._waiting)


# --------------------------------------------------------------------------------------- evidence
_SVG_LOCK = threading.Lock()  # rc_context changes matplotlib's global rcParams: one figure at a time


def bank_histogram_svg(loo_oodm: Sequence[float], oodm: float, tau: float, *, width_in: float = 5.6,
                       height_in: float = 2.8) -> str:
    """The bank's own leave-one-out OODMs as a histogram, tau as a dashed line and this study's OODM as a
    solid one, as an ``<svg>`` element to inline in a page (no XML prolog, no DOCTYPE; text kept as
    text, so it is selectable and searchable).

    An OODM far beyond the bank (more than twice the larger of tau and the bank's maximum, or not
    finite) would squash the histogram into one bar; the axis then stops at 1.3 times that value and the
    study is drawn at its right edge, marked "beyond the axis" with its value. An empty bank (a result
    from before the evidence recorded it) draws tau and the study alone.

    Drawn with matplotlib's object API (``Figure``, never pyplot: no global figure, no GUI backend), under
    a lock because the text setting is process-global.
    """
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loo = np.asarray([v for v in loo_oodm if math.isfinite(v)], dtype=np.float64)
    top = max(float(loo.max()) if loo.size else 0.0, float(tau) if math.isfinite(tau) else 0.0)
    top = top if top > 0 else 1.0
    beyond = not math.isfinite(oodm) or oodm > 2 * top
    x_max = 1.3 * top if beyond else 1.1 * max(top, float(oodm))

    with _SVG_LOCK, rc_context({"svg.fonttype": "none", "svg.hashsalt": "specgate", "font.size": 8}):
        fig = Figure(figsize=(width_in, height_in), dpi=100)
        ax = fig.add_subplot()
        if loo.size:
            bins = int(np.clip(np.sqrt(loo.size) * 2, 8, 40))
            ax.hist(loo, bins=bins, range=(0.0, x_max), color="#9db4c8", edgecolor="#5a7189", linewidth=0.5,
                    label=f"bank, leave-one-out (n={loo.size})")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.02, 0.5, "no bank distribution recorded for this result", transform=ax.transAxes,
                    color="#555555")
            ax.set_yticks([])
        if math.isfinite(tau):
            ax.axvline(tau, color="#333333", linestyle="--", linewidth=1.2, label=f"tau = {tau:.4g}")
        if beyond:
            x = 0.985 * x_max
            ax.axvline(x, color=_hex(MASK_RGB), linewidth=2.0, label=f"this study = {oodm:.4g}")
            ax.annotate(f"this study: {oodm:.4g}, beyond the axis \u2192", xy=(x, 0.75),
                        xycoords=("data", "axes fraction"), xytext=(-6, 0), textcoords="offset points",
                        ha="right", va="center", color=_hex(MASK_RGB), fontsize=8,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
        else:
            ax.axvline(oodm, color=_hex(MASK_RGB), linewidth=2.0, label=f"this study = {oodm:.4g}")
        ax.set_xlim(0.0, x_max)
        ax.set_xlabel("OODM (distance to the nearest training signature)")
        ax.set_ylabel("training images")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False, fontsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    svg = out.getvalue()
    return svg[svg.index("<svg"):]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
