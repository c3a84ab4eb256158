"""Loading volumes: NIfTI files, Medical Segmentation Decathlon folders, and DICOM series (through
:mod:`dicom_series`, the loader the worker uses, so both judge a series alike).

Every loader returns arrays in ``(z, y, x)`` order with the spacing in mm in the same order, so a volume
from any source can go straight to :func:`model.preprocess.preprocess` and the metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_series import Volume, find_series, load_series

__all__ = [
    "Case",
    "MSDDataset",
    "declared_label_names",
    "SeriesGeometry",
    "iter_cases",
    "iter_site_cases",
    "load_dicom_series",
    "load_nifti",
    "site_modalities",
]


@dataclass
class Case:
    """One image (and label, when known) in ``(z, y, x)`` order.

    ``label`` is the foreground (``uint8``, 1 wherever the ground truth names any label);
    ``label_map`` the ground truth's own values (``uint8``/``uint16``, 0 background), for the DSC of each
    label of a multi-label model; ``label_names`` what those values are (value -> name), where the
    dataset declares it (``dataset.json`` ``labels``, :func:`declared_label_names`).
    """

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    label: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    label_map: np.ndarray | None = None
    label_names: dict[int, str] | None = None


def declared_label_names(meta: Mapping[str, Any], where: str | os.PathLike[str]) -> dict[int, str] | None:
    """The foreground labels a ``dataset.json`` names (value -> name, background left out), in either
    layout: MSD's ``{"0": "background", "1": "liver"}`` or nnU-Net v2's ``{"background": 0, "liver": 1}``
    (a region of several values, nnU-Net v2's region-based training, names no single value: left out).
    None when it names none; ``ValueError`` naming ``where`` when ``labels`` is neither.

    >>> declared_label_names({"labels": {"0": "background", "1": "liver"}}, "d")
    {1: 'liver'}
    >>> declared_label_names({"labels": {"background": 0, "spleen": 1, "liver": 2}}, "d")
    {1: 'spleen', 2: 'liver'}
    >>> declared_label_names({"labels": ["liver"]}, "d/dataset.json")
    Traceback (most recent call last):
    ...
    ValueError: d/dataset.json: 'labels' must map values to names (MSD) or names to values (nnU-Net v2), got ['liver']
    """
    labels = meta.get("labels")
    if labels is None:
        return None
    bad = ValueError(f"{os.fspath(where)}: 'labels' must map values to names (MSD) or names to values "
                     f"(nnU-Net v2), got {labels!r}")
    if not isinstance(labels, Mapping):
        raise bad
    if all(isinstance(k, str) and k.strip().isdigit() for k in labels):  # MSD: "1": "liver"
        pairs = [(int(k), v) for k, v in labels.items()]
    elif all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):  # nnU-Net v2
        pairs = [(v, k) for k, v in labels.items() if isinstance(v, int)]
    else:
        raise bad
    if not all(isinstance(name, str) for _v, name in pairs):
        raise bad
    out = {int(v): str(name) for v, name in pairs if int(v) != 0}
    return out or None


def load_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as a ``(z, y, x)`` array and its spacing in mm (closest-canonical orientation)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(os.fspath(path)))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


class MSDDataset:
    """A Medical Segmentation Decathlon folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``.

    Only single-channel images are supported; labels other than 0 count as foreground.
    Cases are loaded on demand (``dataset[i]``), not at construction.
    """

    def __init__(self, root: str | os.PathLike[str], name: str | None = None) -> None:
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.root} is not an MSD dataset folder (no dataset.json)")
        self.meta = json.loads(meta_path.read_text())
        modality = self.meta.get("modality", {})
        if len(modality) != 1:
            raise ValueError(f"{self.root}: only single-channel datasets are supported, modality={modality!r}")
        self.modality = str(next(iter(modality.values()))).upper()
        if self.modality not in ("CT",):  # MSD writes e.g. "MRI", "T2", "ADC": all normalised like MR
            self.modality = "MR" if self.modality not in ("PT", "PET") else "PT"
        self.name = name or str(self.meta.get("name") or self.root.name)
        self.label_names = declared_label_names(self.meta, meta_path)
        self.entries = list(self.meta.get("training", []))
        if not self.entries:
            raise ValueError(f"{self.root}: dataset.json lists no training cases")

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Case]:
        """Cases one at a time, in order (each loaded when it is reached)."""
        return (self[i] for i in range(len(self)))

    def case_name(self, i: int) -> str:
        return Path(self.entries[i]["image"]).name.removesuffix(".nii.gz").removesuffix(".nii")

    def __getitem__(self, i: int) -> Case:
        """Case ``i``. An entry's image is a NIfTI file or a folder holding one DICOM series (modality and
        geometry then come from the DICOM); its label a NIfTI file or an ``.npz`` with a ``label`` array in
        the same (z, y, x) order."""
        e = self.entries[i]
        image_path = self.root / e["image"]
        meta: dict[str, Any] = {"dataset": self.name, "index": i}
        modality = self.modality
        if image_path.is_dir():
            image, geom, modality = load_dicom_series(image_path)
            spacing = geom.spacing
            meta["geometry"] = geom  # the volume is already a new float32 array: no copy below
        else:
            image, spacing = load_nifti(image_path)
            image = image.astype(np.float32)  # a new array (never a memory map)
        label = _load_label(self.root / e["label"])
        if label.shape != image.shape:
            raise ValueError(f"{self.root}: label shape {label.shape} != image shape {image.shape} for {e['image']}")
        return Case(
            name=self.case_name(i),
            image=image,
            spacing=spacing,
            modality=modality,
            label=(label > 0).astype(np.uint8),
            meta=meta,
            label_map=_label_values(label, self.root / e["label"]),
            label_names=self.label_names,
        )


def _label_values(label: np.ndarray, path: Path) -> np.ndarray:
    """A ground-truth label map's values as ``uint8`` (``uint16`` past 255); refused when they are not
    non-negative integers."""
    a = np.asarray(label)
    if a.dtype.kind not in "iub":
        rounded = np.rint(a)
        if not np.array_equal(rounded, a):
            raise ValueError(f"{path}: label values must be integers")
        a = rounded
    top = int(a.max()) if a.size else 0
    if a.size and int(a.min()) < 0:
        raise ValueError(f"{path}: negative label value {int(a.min())}")
    return a.astype(np.uint8 if top <= 255 else np.uint16)


def _load_label(path: Path) -> np.ndarray:
    """A label volume (z, y, x): NIfTI, or ``.npz`` with a ``label`` array."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "label" not in z:
                raise ValueError(f"{path}: no 'label' array in the .npz")
            label = np.asarray(z["label"])
        if label.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D label, got shape {label.shape}")
        return label
    return load_nifti(path)[0]


@dataclass(frozen=True)
class SeriesGeometry:
    """Where a series lies in patient space (LPS), enough to write results back."""

    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    sop_instance_uids: tuple[str, ...]  # in slice order

    @classmethod
    def of(cls, volume: Volume) -> SeriesGeometry:
        def xyz(v: np.ndarray) -> tuple[float, float, float]:
            return float(v[0]), float(v[1]), float(v[2])

        row, col, normal = volume.direction
        return cls(
            origin=volume.origin,
            row_direction=xyz(row),
            column_direction=xyz(col),
            slice_direction=xyz(normal),
            spacing=volume.spacing,
            sop_instance_uids=tuple(ref.sop_instance_uid for ref in volume.slices),
        )


def load_dicom_series(
    files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
) -> tuple[np.ndarray, SeriesGeometry, str]:
    """One DICOM series (its files, or a folder holding only them) -> ``(volume (z, y, x) float32,
    geometry, modality)``, read by :func:`dicom_series.load_series`, the loader the worker uses.

    A series the worker refuses is refused here for the same reason: a :class:`dicom_series.SeriesError`
    (a ``ValueError``) with the same ``reason_code``.
    """
    if isinstance(files, str | os.PathLike):
        paths = sorted(p for p in Path(files).iterdir() if p.is_file())
    else:
        paths = [Path(p) for p in files]
    volume = load_series(paths)
    image = volume.array
    image.setflags(write=True)  # the array was allocated by load_series and the Volume ends here: ours now
    return image, SeriesGeometry.of(volume), volume.modality


def iter_cases(path: str | os.PathLike[str]) -> Iterator[Case]:
    """Cases from an MSD dataset folder, or from a folder of DICOM series (no labels)."""
    p = Path(path)
    if (p / "dataset.json").is_file():
        ds = MSDDataset(p)
        for i in range(len(ds)):
            yield ds[i]
        return
    groups = find_series(p)
    if not groups:
        raise ValueError(f"{p} is neither an MSD dataset folder nor a folder of DICOM series")
    for n, (_uid, files) in enumerate(sorted(groups.items())):
        vol, geom, modality = load_dicom_series(files)
        yield Case(name=f"series_{n:03d}", image=vol, spacing=geom.spacing, modality=modality,
                   meta={"geometry": geom})


_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_NIFTI_SUFFIXES))


def _nifti_cases(files: Sequence[Path], modality: str, strip: str = "",
                 labels: Path | None = None, ending: str = "",
                 label_names: dict[int, str] | None = None) -> Iterator[Case]:
    """Each file one case; with ``labels``, its ground truth ``labels/<case><ending>`` when there is one
    (nnU-Net v2's ``labelsTr``), whose values ``label_names`` names."""
    for f in files:
        image, spacing = load_nifti(f)
        name = f.name.removesuffix(".gz").removesuffix(".nii").removesuffix(strip)
        case = Case(name=name, image=image.astype(np.float32), spacing=spacing, modality=modality,
                    meta={"file": str(f)})
        gt = labels / f"{name}{ending}" if labels is not None else None
        if gt is not None and gt.is_file():
            values = _label_values(load_nifti(gt)[0], gt)
            if values.shape != case.image.shape:
                raise ValueError(f"{gt}: label shape {values.shape} != image shape {case.image.shape}")
            case.label, case.label_map = (values > 0).astype(np.uint8), values
            case.label_names = label_names
        yield case


def _modality_of_channel(name: str) -> str:
    """nnU-Net v2's channel name (``dataset.json`` ``channel_names["0"]``) as a modality: "CT" is CT (its
    CT normalisation), anything else (T2, ADC, MRI, noNorm...) is normalised as MR."""
    return "CT" if name.strip().upper() == "CT" else "MR"


def iter_site_cases(path: str | os.PathLike[str], modality: str | None = None) -> Iterator[Case]:
    """A site's images, one case at a time, in whichever layout they come:

    - an MSD folder (``dataset.json`` with ``training``): :class:`MSDDataset`;
    - an nnU-Net v2 raw dataset (``dataset.json`` with ``channel_names``, images
      ``imagesTr/<case>_0000<file_ending>``): single-channel only, the modality from the channel's name,
      the ground truth ``labelsTr/<case><file_ending>`` where there is one;
    - a folder of NIfTI files (``.nii``/``.nii.gz``): every file one image, of ``modality``;
    - a folder of DICOM series (any depth): each series read by :func:`dicom_series.load_series`, the
      worker's loader, with the modality its headers state.

    ``modality`` ("CT"/"MR") is needed only for bare NIfTI files, which do not record one. Raises
    ``ValueError`` naming the folder when none of these fits.
    """
    p = Path(path)
    meta_path = p / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "training" in meta:
            yield from MSDDataset(p)
            return
        channels = meta.get("channel_names")
        if not isinstance(channels, dict) or not channels:
            raise ValueError(f"{meta_path} is neither an MSD dataset.json ('training') nor an nnU-Net v2 one "
                             "('channel_names')")
        if len(channels) != 1:
            raise ValueError(f"{meta_path}: only single-channel images are supported, channel_names={channels!r}")
        ending = str(meta.get("file_ending", ".nii.gz"))
        files = sorted((p / "imagesTr").glob(f"*_0000{ending}"))
        if not files:
            raise ValueError(f"{p}: no images imagesTr/*_0000{ending}")
        yield from _nifti_cases(files, _modality_of_channel(str(next(iter(channels.values())))), strip="_0000",
                                labels=p / "labelsTr", ending=ending,
                                label_names=declared_label_names(meta, meta_path))
        return
    if not p.is_dir():
        raise ValueError(f"{p} is not a folder")
    niftis = _nifti_files(p)
    if niftis:
        if modality is None:
            raise ValueError(f"{p} holds NIfTI files, which do not record their modality: give it (CT or MR)")
        yield from _nifti_cases(niftis, modality.upper())
        return
    groups = find_series(p)
    if not groups:
        raise ValueError(f"{p} holds no images: neither an MSD or nnU-Net dataset, NIfTI files nor DICOM series")
    for n, (_uid, files) in enumerate(sorted(groups.items())):
        vol, geom, mod = load_dicom_series(files)
        yield Case(name=f"{p.name}/series_{n:03d}", image=vol, spacing=geom.spacing, modality=mod,
                   meta={"geometry": geom})


def site_modalities(path: str | os.PathLike[str], modality: str | None = None) -> list[str]:
    """The modality of each image :func:`iter_site_cases` would yield from ``path``, in its order, from
    the folder's ``dataset.json`` and DICOM headers only (no pixels): how many images there are of which
    modality before any is loaded (a progress bar's total). Raises ``ValueError`` as it does."""
    import pydicom

    def header_modality(f: Path) -> str:
        return str(pydicom.dcmread(f, stop_before_pixels=True).get("Modality", "") or "").upper()

    p = Path(path)
    meta_path = p / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "training" in meta:
            ds = MSDDataset(p)
            out = []
            for e in ds.entries:
                image = p / e["image"]
                files = sorted(f for f in image.iterdir() if f.is_file()) if image.is_dir() else []
                out.append(header_modality(files[0]) if files else ds.modality)
            return out
        channels = meta.get("channel_names")
        if not isinstance(channels, dict) or len(channels) != 1:
            return [c.modality for c in iter_site_cases(p, modality)]  # refused there, naming the problem
        ending = str(meta.get("file_ending", ".nii.gz"))
        n = len(list((p / "imagesTr").glob(f"*_0000{ending}")))
        return [_modality_of_channel(str(next(iter(channels.values()))))] * n
    if not p.is_dir():
        raise ValueError(f"{p} is not a folder")
    niftis = _nifti_files(p)
    if niftis:
        if modality is None:
            raise ValueError(f"{p} holds NIfTI files, which do not record their modality: give it (CT or MR)")
        return [modality.upper()] * len(niftis)
    groups = find_series(p)
    if not groups:
        raise ValueError(f"{p} holds no images: neither an MSD or nnU-Net dataset, NIfTI files nor DICOM series")
    return [header_modality(files[0]) for _uid, files in sorted(groups.items())]
