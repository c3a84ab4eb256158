"""Synthetic DICOM studies for the demo, the benchmarks and the end-to-end tests (no downloads).

:func:`write_series` writes a ``(z, y, x)`` volume as a classic single-frame CT or MR series with real
geometry (Image Position/Orientation Patient, Pixel Spacing, Slice Thickness), 16-bit stored values with
Rescale Slope/Intercept, and every module a PACS expects. Patient data are synthetic placeholders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["SyntheticSeries", "write_series"]


@dataclass(frozen=True)
class SyntheticSeries:
    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]
    modality: str


def write_series(volume: np.ndarray, spacing: Sequence[float], modality: str, out_dir: Path, *,
                 study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                 patient_id: str = "SYNTH0001", patient_name: str = "SYNTHETIC^PHANTOM",
                 series_description: str | None = None, body_part: str | None = None,
                 series_number: int = 1, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> SyntheticSeries:
    """Write ``volume`` (z, y, x; HU for CT) with ``spacing`` (z, y, x) in mm as one DICOM file per slice."""
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {vol.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    if modality == "CT":
        slope, intercept = 1.0, -1024.0
        stored = np.clip(np.round(vol - intercept), 0, 65535).astype(np.uint16)
        sop_class = CTImageStorage
    else:
        lo, hi = float(vol.min()), float(vol.max())
        slope = max((hi - lo) / 4095.0, 1e-6)
        intercept = lo
        stored = np.clip(np.round((vol - intercept) / slope), 0, 4095).astype(np.uint16)
        sop_class = MRImageStorage
    now = datetime.now(UTC)
    dz, dy, dx = (float(s) for s in spacing)
    paths: list[Path] = []
    for z in range(vol.shape[0]):
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
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + z * dz]
        ds.SliceLocation = float(origin[2]) + z * dz
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
            ds.MagneticFieldStrength = "3"
        ds.PixelData = stored[z].tobytes()
        path = out_dir / f"{z + 1:05d}.dcm"
        tmp = path.with_name(path.name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return SyntheticSeries(study_uid, series_uid, paths, modality)
