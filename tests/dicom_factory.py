"""Small synthetic DICOM series for tests, written with pydicom.

A :class:`SeriesSpec` describes the geometry and the stored values; :func:`classic_datasets` builds one
single-frame CT/MR dataset per slice (in position order), :func:`enhanced_dataset` the equivalent
multi-frame Enhanced CT/MR instance, and :func:`write_datasets` writes them under random file names
in a shuffled order, so a reader that relies on file names or listing order is caught.

The values are known in advance: :func:`stored_values` gives the stored pixel values (z, rows, cols)
and :func:`expected_volume` the rescaled ones, so a loader can be compared voxel by voxel.

>>> spec = SeriesSpec(slices=4, rows=8, cols=8)
>>> [int(ds.InstanceNumber) for ds in classic_datasets(spec)]
[1, 2, 3, 4]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "SeriesSpec",
    "CT_IMAGE",
    "MR_IMAGE",
    "ENHANCED_CT_IMAGE",
    "ENHANCED_MR_IMAGE",
    "stored_values",
    "expected_volume",
    "slice_positions",
    "classic_datasets",
    "enhanced_dataset",
    "write_datasets",
    "write_series",
    "clone",
]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def _uid(seed: int, *parts: object) -> str:
    # NB generate_uid ignores entropy_srcs when prefix is None: keep pydicom's default prefix.
    return generate_uid(entropy_srcs=["dicom_factory", "|".join([str(seed), *map(str, parts)])])


@dataclass(frozen=True)
class SeriesSpec:
    """What to generate. Positions: ``origin + k * slice_spacing * normal`` for slice k (normal = row x col)."""

    slices: int = 20
    rows: int = 32
    cols: int = 32
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (between rows, between columns), as in DICOM
    slice_spacing: float = 2.5
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    origin: tuple[float, float, float] = (-12.5, -20.0, 30.0)
    modality: str = "CT"
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    seed: int = 0
    study_instance_uid: str = field(default="")
    series_instance_uid: str = field(default="")
    frame_of_reference_uid: str = field(default="")

    def __post_init__(self) -> None:
        for name, kind in (("study_instance_uid", "study"), ("series_instance_uid", "series"),
                           ("frame_of_reference_uid", "for")):
            if not getattr(self, name):
                object.__setattr__(self, name, _uid(self.seed, kind))

    def with_(self, **changes: object) -> SeriesSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_cosine, float), np.asarray(self.col_cosine, float))


def slice_positions(spec: SeriesSpec) -> np.ndarray:
    """ImagePositionPatient of each slice, in slice order: (slices, 3)."""
    k = np.arange(spec.slices, dtype=float)[:, None]
    return np.asarray(spec.origin, float)[None, :] + k * spec.slice_spacing * spec.normal[None, :]


def stored_values(spec: SeriesSpec) -> np.ndarray:
    """Stored (unsigned 16-bit) values; slice k carries k in its first pixel so slices are told apart."""
    rng = np.random.default_rng(spec.seed)
    values = rng.integers(0, 3000, size=(spec.slices, spec.rows, spec.cols), dtype=np.uint16)
    values[:, 0, 0] = np.arange(spec.slices, dtype=np.uint16)
    return values


def expected_volume(spec: SeriesSpec) -> np.ndarray:
    """What a loader must return for ``spec``: stored * slope + intercept, float32."""
    return (stored_values(spec).astype(np.float64) * spec.rescale_slope + spec.rescale_intercept).astype(
        np.float32
    )


def _fmt(values: Sequence[float]) -> list[str]:
    return [f"{float(v):.10g}" for v in values]


def _common(ds: Dataset, spec: SeriesSpec) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Factory^Phantom"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.Modality = spec.modality
    ds.SeriesInstanceUID = spec.series_instance_uid
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "specgate-tests"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0


def _mr_attributes(ds: Dataset) -> None:
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = "500"
    ds.EchoTime = "15"
    ds.EchoTrainLength = "1"


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def classic_datasets(spec: SeriesSpec) -> list[Dataset]:
    """One single-frame CT Image / MR Image dataset per slice, in position order (k = 0 first)."""
    sop_class = CT_IMAGE if spec.modality == "CT" else MR_IMAGE
    values = stored_values(spec)
    positions = slice_positions(spec)
    out = []
    for k in range(spec.slices):
        ds = Dataset()
        sop_uid = _uid(spec.seed, "classic", spec.series_instance_uid, k)
        ds.file_meta = _file_meta(sop_class, sop_uid)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        _common(ds, spec)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = _fmt(positions[k])
        ds.ImageOrientationPatient = _fmt([*spec.row_cosine, *spec.col_cosine])
        ds.PixelSpacing = _fmt(spec.pixel_spacing)
        ds.SliceThickness = _fmt([spec.slice_spacing])[0]
        if spec.modality == "CT":
            ds.KVP = "120"
        else:
            _mr_attributes(ds)
        ds.RescaleIntercept = _fmt([spec.rescale_intercept])[0]
        ds.RescaleSlope = _fmt([spec.rescale_slope])[0]
        if spec.modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = values[k].tobytes()
        out.append(ds)
    return out


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for key, value in attrs.items():
        setattr(item, key, value)
    return item


def enhanced_dataset(spec: SeriesSpec, frame_order: Sequence[int] | None = None) -> Dataset:
    """The same series as one Enhanced CT / Enhanced MR instance.

    ``frame_order[f]`` is the slice stored as frame f+1 (default: position order), so a reader that takes
    frames in stored order instead of by position is caught. Rescale is per frame
    (PixelValueTransformationSequence in each per-frame item); orientation and spacing are shared.
    """
    order = list(range(spec.slices)) if frame_order is None else list(frame_order)
    if sorted(order) != list(range(spec.slices)):
        raise ValueError(f"frame_order must be a permutation of range({spec.slices}), got {order}")
    sop_class = ENHANCED_CT_IMAGE if spec.modality == "CT" else ENHANCED_MR_IMAGE
    sop_uid = _uid(spec.seed, "enhanced", spec.series_instance_uid)
    values = stored_values(spec)
    positions = slice_positions(spec)

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    _common(ds, spec)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AcquisitionNumber = 1
    ds.NumberOfFrames = spec.slices
    ds.ManufacturerModelName = "factory"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "0"

    dim_org_uid = _uid(spec.seed, "dimorg", spec.series_instance_uid)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_org_uid)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dim_org_uid,
            DimensionIndexPointer=0x00200032,
            FunctionalGroupPointer=0x00209113,
        )
    ]

    shared = Dataset()
    shared.PixelMeasuresSequence = [
        _item(PixelSpacing=_fmt(spec.pixel_spacing), SliceThickness=_fmt([spec.slice_spacing])[0])
    ]
    shared.PlaneOrientationSequence = [
        _item(ImageOrientationPatient=_fmt([*spec.row_cosine, *spec.col_cosine]))
    ]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    for f, k in enumerate(order):
        item = Dataset()
        item.FrameContentSequence = [_item(DimensionIndexValues=[f + 1])]
        item.PlanePositionSequence = [_item(ImagePositionPatient=_fmt(positions[k]))]
        transform = _item(
            RescaleIntercept=_fmt([spec.rescale_intercept])[0],
            RescaleSlope=_fmt([spec.rescale_slope])[0],
            RescaleType="HU" if spec.modality == "CT" else "US",
        )
        item.PixelValueTransformationSequence = [transform]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = values[order].tobytes()
    return ds


def write_datasets(
    datasets: Sequence[Dataset], directory: Path, rng: np.random.Generator | None = None
) -> list[Path]:
    """Write each dataset under a random name; return the paths shuffled (``rng``: default seed 0)."""
    rng = np.random.default_rng(0) if rng is None else rng
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        name = f"{rng.integers(0, 2**62):016x}.dcm"
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    order = rng.permutation(len(paths))
    return [paths[i] for i in order]


def write_series(spec: SeriesSpec, directory: Path, *, enhanced: bool = False) -> list[Path]:
    """:func:`classic_datasets` (or the :func:`enhanced_dataset`) of ``spec`` written to ``directory``."""
    datasets = [enhanced_dataset(spec)] if enhanced else classic_datasets(spec)
    return write_datasets(datasets, directory)


def clone(ds: Dataset) -> Dataset:
    """A deep copy, for tests that damage one dataset of a series."""
    return copy.deepcopy(ds)
