"""Synthetic DICOM series for the demo, the evaluation sets, the benchmarks and the tests (no downloads).

:func:`write_series` writes a ``(z, y, x)`` volume as a classic single-frame CT, MR or PET series with real
geometry (Image Position/Orientation Patient, Pixel Spacing, Slice Thickness), 16-bit stored values with
Rescale Slope/Intercept, and every module a PACS expects. Patient data are synthetic placeholders.

- CT: Hounsfield units, slope 1, intercept -1024 (unsigned pixels, as most scanners store them);
- MR: one slope and intercept for the series, 12 bits;
- PT: Bq/ml, a slope per slice and intercept 0 (the PET Image module requires it), with the PET Series,
  Isotope and Image modules.

Decimal strings (positions, spacings) are written in at most 16 characters, as the DS VR allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model._atomic import atomic_write

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

__all__ = ["SyntheticSeries", "write_series"]


@dataclass(frozen=True)
class SyntheticSeries:
    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]
    modality: str


def _ds(v: float) -> str:
    """A decimal string of at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if len(s) <= 16 else f"{v:.10g}"


@dataclass(frozen=True)
class _Series:
    """What every slice of one series shares."""

    modality: str
    sop_class: UID
    study_uid: str
    series_uid: str
    frame_uid: str
    patient_id: str
    patient_name: str
    series_description: str | None
    body_part: str | None
    series_number: int
    date: str  # YYYYMMDD
    time: str  # HHMMSS
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # patient (x, y, z) of voxel (0, 0, 0)
    shape: tuple[int, int, int]  # (z, y, x)


def _sop_class(modality: str) -> UID:
    """The Image Storage SOP class of ``modality`` (CT, MR or PT)."""
    from pydicom.uid import CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage

    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage, "PT": PositronEmissionTomographyImageStorage}.get(modality)
    if sop_class is None:
        raise ValueError(f"modality must be CT, MR or PT, got {modality!r}")
    return sop_class


def _series_rescale(vol: np.ndarray, modality: str) -> tuple[float, float] | None:
    """The series' (slope, intercept): CT 1, -1024; MR the volume's range on 12 bits; PT None (one per slice)."""
    if modality == "CT":
        return 1.0, -1024.0
    if modality == "MR":
        lo, hi = float(vol.min()), float(vol.max())
        return max((hi - lo) / 4095.0, 1e-6), lo
    return None


def _pet_rescale(plane: np.ndarray) -> tuple[float, float]:
    """A PET slice's (slope, intercept): its maximum on 16 bits, intercept 0."""
    return max(float(max(plane.max(), 0.0)) / 65535.0, 1e-6), 0.0


def _stored_values(plane: np.ndarray, slope: float, intercept: float, modality: str) -> np.ndarray:
    """A slice's unsigned 16-bit stored values (12 bits for MR), clipped."""
    top = 65535 if modality != "MR" else 4095
    return np.clip(np.rint((plane - np.float32(intercept)) / np.float32(slope)), 0, top).astype(np.uint16)


def _ct_modules(ds: Dataset, s: _Series, z: int) -> None:
    """CT Image: HU, kVp, a soft-tissue window."""
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.WindowCenter, ds.WindowWidth = "40", "400"


def _mr_modules(ds: Dataset, s: _Series, z: int) -> None:
    """MR Image: a 3D spin echo at 3 T."""
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
    ds.MagneticFieldStrength = "3"


def _pet_modules(ds: Dataset, s: _Series, z: int) -> None:
    """PET Series, PET Isotope and PET Image modules."""
    from pydicom.dataset import Dataset

    ds.PatientWeight = "70"
    ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
    ds.Units, ds.CountsSource, ds.SeriesType = "BQML", "EMISSION", ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.DecayCorrection, ds.RandomsCorrectionMethod, ds.ReconstructionMethod = "START", "DLYD", "OSEM"
    ds.NumberOfSlices = s.shape[0]
    ds.AttenuationCorrectionMethod = "CT"
    drug = Dataset()
    drug.Radiopharmaceutical = "Fluorodeoxyglucose F^18^"
    drug.RadionuclideTotalDose = "370000000"
    drug.RadionuclideHalfLife = "6586.2"
    drug.RadiopharmaceuticalStartTime = "000000"
    ds.RadiopharmaceuticalInformationSequence = [drug]
    ds.FrameReferenceTime, ds.ActualFrameDuration, ds.ImageIndex = "0", 120000, z + 1
    ds.DecayFactor = "1"


_MODALITY_MODULES = {"CT": _ct_modules, "MR": _mr_modules, "PT": _pet_modules}


def _slice_dataset(s: _Series, z: int, stored: np.ndarray, slope: float, intercept: float) -> Dataset:
    """Slice ``z`` of the series (``stored``: its pixel values) as a DICOM file's dataset, new SOP Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = s.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = s.sop_class, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = s.patient_name, s.patient_id, "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = s.study_uid, s.series_uid, s.frame_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = s.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = s.time
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = s.modality, s.series_number, z + 1
    ds.Manufacturer = "specgate synthetic"
    ds.PositionReferenceIndicator = ""
    if s.series_description:
        ds.SeriesDescription = s.series_description
    if s.body_part:
        ds.BodyPartExamined = s.body_part
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if s.modality != "PT" else ["ORIGINAL", "PRIMARY"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    dz, dy, dx = s.spacing
    zpos = s.origin[2] + z * dz
    ds.ImagePositionPatient = [_ds(s.origin[0]), _ds(s.origin[1]), _ds(zpos)]
    ds.SliceLocation = _ds(zpos)
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(dz)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = s.shape[1], s.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    _MODALITY_MODULES[s.modality](ds, s, z)
    ds.PixelData = stored.tobytes()
    return ds


def write_series(volume: np.ndarray, spacing: Sequence[float], modality: str, out_dir: Path, *,
                 study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                 patient_id: str = "SYNTH0001", patient_name: str = "SYNTHETIC^PHANTOM",
                 series_description: str | None = None, body_part: str | None = None,
                 series_number: int = 1, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> SyntheticSeries:
    """Write ``volume`` (z, y, x; HU for CT, Bq/ml for PT) with ``spacing`` (z, y, x) in mm as one DICOM
    file per slice. ``origin`` is the patient position (x, y, z) of voxel (0, 0, 0)."""
    from pydicom.uid import generate_uid

    modality = modality.upper()
    sop_class = _sop_class(modality)
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {vol.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.now(UTC)
    dz, dy, dx = (float(s) for s in spacing)
    series = _Series(modality, sop_class, study_uid, series_uid, frame_uid, patient_id, patient_name,
                     series_description, body_part, series_number, now.strftime("%Y%m%d"), now.strftime("%H%M%S"),
                     (dz, dy, dx), (float(origin[0]), float(origin[1]), float(origin[2])),
                     (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2])))
    rescale = _series_rescale(vol, modality)
    paths: list[Path] = []
    for z in range(vol.shape[0]):
        slope, intercept = rescale if rescale is not None else _pet_rescale(vol[z])
        ds = _slice_dataset(series, z, _stored_values(vol[z], slope, intercept, modality), slope, intercept)
        paths.append(atomic_write(out_dir / f"{z + 1:05d}.dcm", partial(ds.save_as, enforce_file_format=True)))
    return SyntheticSeries(study_uid, series_uid, paths, modality)
