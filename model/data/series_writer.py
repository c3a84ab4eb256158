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

import numpy as np

from model._atomic import atomic_write

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


def write_series(volume: np.ndarray, spacing: Sequence[float], modality: str, out_dir: Path, *,
                 study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                 patient_id: str = "SYNTH0001", patient_name: str = "SYNTHETIC^PHANTOM",
                 series_description: str | None = None, body_part: str | None = None,
                 series_number: int = 1, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> SyntheticSeries:
    """Write ``volume`` (z, y, x; HU for CT, Bq/ml for PT) with ``spacing`` (z, y, x) in mm as one DICOM
    file per slice. ``origin`` is the patient position (x, y, z) of voxel (0, 0, 0)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        PositronEmissionTomographyImageStorage,
        generate_uid,
    )

    modality = modality.upper()
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage, "PT": PositronEmissionTomographyImageStorage}.get(modality)
    if sop_class is None:
        raise ValueError(f"modality must be CT, MR or PT, got {modality!r}")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {vol.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    if modality == "CT":
        slope, intercept = 1.0, -1024.0
    elif modality == "MR":
        lo, hi = float(vol.min()), float(vol.max())
        slope, intercept = max((hi - lo) / 4095.0, 1e-6), lo
    now = datetime.now(UTC)
    dz, dy, dx = (float(s) for s in spacing)
    paths: list[Path] = []
    for z in range(vol.shape[0]):
        if modality == "PT":
            slope, intercept = max(float(max(vol[z].max(), 0.0)) / 65535.0, 1e-6), 0.0
        top = 65535 if modality != "MR" else 4095
        stored = np.clip(np.rint((vol[z] - np.float32(intercept)) / np.float32(slope)), 0, top).astype(np.uint16)
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, z + 1
        ds.Manufacturer = "specgate synthetic"
        ds.PositionReferenceIndicator = ""
        if series_description:
            ds.SeriesDescription = series_description
        if body_part:
            ds.BodyPartExamined = body_part
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality != "PT" else ["ORIGINAL", "PRIMARY"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        zpos = float(origin[2]) + z * dz
        ds.ImagePositionPatient = [_ds(float(origin[0])), _ds(float(origin[1])), _ds(zpos)]
        ds.SliceLocation = _ds(zpos)
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.SliceThickness = _ds(dz)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        elif modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
            ds.MagneticFieldStrength = "3"
        else:  # PET Series, PET Isotope and PET Image modules
            ds.PatientWeight = "70"
            ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
            ds.Units, ds.CountsSource, ds.SeriesType = "BQML", "EMISSION", ["STATIC", "IMAGE"]
            ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
            ds.DecayCorrection, ds.RandomsCorrectionMethod, ds.ReconstructionMethod = "START", "DLYD", "OSEM"
            ds.NumberOfSlices = int(vol.shape[0])
            ds.AttenuationCorrectionMethod = "CT"
            drug = Dataset()
            drug.Radiopharmaceutical = "Fluorodeoxyglucose F^18^"
            drug.RadionuclideTotalDose = "370000000"
            drug.RadionuclideHalfLife = "6586.2"
            drug.RadiopharmaceuticalStartTime = "000000"
            ds.RadiopharmaceuticalInformationSequence = [drug]
            ds.FrameReferenceTime, ds.ActualFrameDuration, ds.ImageIndex = "0", 120000, z + 1
            ds.DecayFactor = "1"
        ds.PixelData = stored.tobytes()
        path = out_dir / f"{z + 1:05d}.dcm"
        paths.append(atomic_write(path, partial(ds.save_as, enforce_file_format=True)))
    return SyntheticSeries(study_uid, series_uid, paths, modality)
