"""worker.dicom_seg: a mask on a loaded series -> DICOM-SEG, read back strictly, checked by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import config as pydicom_config
from pydicom.uid import UID

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dicom_factory import SeriesSpec, classic_datasets, enhanced_dataset, write_datasets  # noqa: E402

from dicom_node.config import SeriesRule  # noqa: E402
from dicom_series import Volume, load_series  # noqa: E402
from model.adapters.base import Label  # noqa: E402
from specgate.settings import ModelFiles, Settings  # noqa: E402
from worker.anatomy import AnatomyCode  # noqa: E402
from worker.atomic import write_dicom  # noqa: E402
from worker.dicom_seg import derive_uid, encode_seg  # noqa: E402
from worker.labels import GateEvidence, ModelIdentity, Release  # noqa: E402
from worker.segments import SegmentDefinition, segments_for  # noqa: E402

SHA = "3f" * 32
CATEGORY = ("123037004", "SCT", "Anatomical Structure")
LIVER = ("10200004", "SCT", "Liver")


@pytest.fixture
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back as highdicom's own tests do: any invalid value raises."""
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.RAISE)
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.RAISE)


def _mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Every slice different (a box whose corner moves with z); slices 0-2 and the last 3 empty."""
    mask = np.zeros(shape, dtype=bool)
    for z in range(3, shape[0] - 3):
        mask[z, z % 7 : z % 7 + 9, 2 * (z % 5) : 2 * (z % 5) + 11] = True
    return mask


SEGMENT = SegmentDefinition(1, "Liver", (200, 80, 40), AnatomyCode(type=LIVER, category=CATEGORY),
                            description="Liver parenchyma")
MODEL = ModelIdentity("specgate-unet", "1.2.0", SHA)
RELEASED = (GateEvidence(oodm=0.031, tau=0.052, c=2.5, is_ood=False), Release("gate"))
APPROVED = (GateEvidence(oodm=0.0875, tau=0.052, c=2.5, is_ood=True, gate_reason="oodm_above_tau"),
            Release("approved", reviewer="Jones^Anna", decided_at=datetime(2026, 3, 4, 10, 30, tzinfo=UTC)))


def _encode(volume: Volume, mask: np.ndarray, job: str = "job-1", *, segment: SegmentDefinition = SEGMENT,
            model: ModelIdentity = MODEL, result: tuple[GateEvidence, Release] = RELEASED) -> hd.seg.Segmentation:
    evidence, release = result
    return encode_seg(
        volume,
        mask,
        segments=(segment,),
        model=model,
        evidence=evidence,
        release=release,
        sop_instance_uid=derive_uid("site-a", volume.study_instance_uid, job, "1", "seg"),
        series_instance_uid=derive_uid("site-a", volume.study_instance_uid, job, "1", "series"),
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports on ``path``."""
    exe = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def _shuffled_classic(tmp_path: Path) -> Volume:
    spec = SeriesSpec(slices=20, rows=32, cols=32, row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, -1.0, 0.0))
    datasets = classic_datasets(spec)
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = (7 * k) % 20 + 1  # scrambled: the SEG must follow positions, not numbers
    return load_series(write_datasets(datasets, tmp_path / "ct", rng=np.random.default_rng(11)))


def _shuffled_multiframe(tmp_path: Path) -> Volume:
    spec = SeriesSpec(slices=20, rows=32, cols=32, modality="MR", rescale_intercept=0.0)
    order = list(np.random.default_rng(5).permutation(spec.slices))
    return load_series(write_datasets([enhanced_dataset(spec, frame_order=order)], tmp_path / "mr"))


SERIES = {"classic-shuffled": _shuffled_classic, "enhanced-shuffled-frames": _shuffled_multiframe}


@pytest.mark.parametrize("kind", list(SERIES))
def test_round_trip_frames_land_on_their_source_slices(tmp_path: Path, strict_reading: None, kind: str) -> None:
    volume = SERIES[kind](tmp_path)
    mask = _mask(volume.shape)
    path = write_dicom(_encode(volume, mask), tmp_path / "seg.dcm")

    seg = hd.seg.segread(path)
    nonempty = np.flatnonzero(mask.any(axis=(1, 2)))
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == nonempty.size  # empty frames omitted
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid

    # each stored frame: its source reference -> z, its position == the geometry of z, its pixels == mask[z]
    z_of = {(ref.sop_instance_uid, ref.frame_number): z for z, ref in enumerate(volume.slices)}
    seen = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence
        assert len(source) == 1
        frame_number = int(source[0].ReferencedFrameNumber) if "ReferencedFrameNumber" in source[0] else None
        z = z_of[(source[0].ReferencedSOPInstanceUID, frame_number)]
        assert source[0].ReferencedSOPClassUID == volume.slices[z].sop_class_uid
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            (volume.affine @ [z, 0, 0, 1])[:3],
            atol=1e-4,
        )
        np.testing.assert_array_equal(seg.get_stored_frame(i + 1).astype(bool), mask[z])
        seen.append(z)
    assert sorted(seen) == nonempty.tolist()

    # highdicom's own lookup through the references gives the mask back, empty slices included
    if volume.is_multiframe:
        got = seg.get_pixels_by_source_frame(
            volume.slices[0].sop_instance_uid,
            [ref.frame_number for ref in volume.slices],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
    else:
        got = seg.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in volume.slices],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
    np.testing.assert_array_equal(got[..., 0].astype(bool), mask)

    # every source instance is referenced
    referenced = {
        inst.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    assert referenced == {ref.sop_instance_uid for ref in volume.slices}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid


def test_segment_and_algorithm_identification(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    ds = pydicom.dcmread(write_dicom(_encode(volume, _mask(volume.shape)), tmp_path / "seg.dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.Modality == "SEG" and int(ds.SeriesNumber) == 9001 and ds.Manufacturer == "specgate"
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "Liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "specgate-unet" and algorithm.AlgorithmVersion == "1.2.0"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert algorithm.AlgorithmParameters == f"weights_sha256={SHA}"
    assert "PHANTOM-001" == ds.PatientID  # copied from the source, as the standard asks


@pytest.mark.parametrize("kind", list(SERIES))
def test_dciodvfy_reports_no_errors(tmp_path: Path, kind: str) -> None:
    volume = SERIES[kind](tmp_path)
    path = write_dicom(_encode(volume, _mask(volume.shape)), tmp_path / "seg.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)
    print(f"dciodvfy warnings ({kind}):", warnings)


def test_dciodvfy_check_can_fail(tmp_path: Path) -> None:
    """The parser above really sees dciodvfy's errors: a SEG without SegmentationType has one."""
    volume = _shuffled_classic(tmp_path)
    seg = _encode(volume, _mask(volume.shape))
    del seg.SegmentationType
    errors, _ = dciodvfy(write_dicom(seg, tmp_path / "broken.dcm"))
    assert any("SegmentationType" in e or "Segmentation Type" in e for e in errors), errors


def test_source_without_type2_patient_attributes(tmp_path: Path) -> None:
    """Sources that leave out type 2 attributes (as some modalities do) still give a valid SEG."""
    datasets = classic_datasets(SeriesSpec(slices=10))
    for ds in datasets:
        for kw in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber"):
            delattr(ds, kw)
    volume = load_series(write_datasets(datasets, tmp_path / "ct"))
    path = write_dicom(_encode(volume, _mask(volume.shape)), tmp_path / "seg.dcm")
    assert "PatientSex" not in volume.headers[0]  # the volume's headers are left alone
    errors, _ = dciodvfy(path)
    assert errors == []
    assert pydicom.dcmread(path).PatientSex == ""


def test_empty_mask_still_valid(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    path = write_dicom(_encode(volume, np.zeros(volume.shape, dtype=bool)), tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert not seg.pixel_array.any()
    assert dciodvfy(path)[0] == []


def test_same_job_same_uids(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    mask = _mask(volume.shape)
    a, b, c = _encode(volume, mask), _encode(volume, mask), _encode(volume, mask, job="job-2")
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID


def test_derive_uid() -> None:
    uid = derive_uid("site-a", "1.2.3", "42", "1")
    assert uid == derive_uid("site-a", "1.2.3", "42", "1")
    assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert uid != derive_uid("site-a", "1.2.3", "42", "2")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    # fixed forever: a resend after an upgrade must still be the same object
    assert derive_uid("specgate") == derive_uid("specgate")
    out = subprocess.run(
        [sys.executable, "-c", "from worker.dicom_seg import derive_uid; print(derive_uid('site-a', '1.2.3', '42', '1'))"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == uid
    with pytest.raises(ValueError):
        derive_uid()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask": "shape"}, "does not match"),
        ({"mask": "float"}, "must hold integers"),
        ({"segments": ()}, "at least one segment"),
    ],
)
def test_encode_refuses_bad_arguments(tmp_path: Path, change: dict, message: str) -> None:
    volume = _shuffled_classic(tmp_path)
    mask = _mask(volume.shape)
    if change.get("mask") == "shape":
        mask = mask[:-1]
    elif change.get("mask") == "float":
        mask = mask.astype(np.float32)
    with pytest.raises(ValueError, match=message):
        encode_seg(volume, mask, segments=change.get("segments", (SEGMENT,)), model=MODEL, evidence=RELEASED[0],
                   release=RELEASED[1], sop_instance_uid="2.25.1", series_instance_uid="2.25.2")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelIdentity("m", "1", "abc"), "64 lowercase hex"),
        (lambda: ModelIdentity("", "1", SHA), "must not be empty"),
        (lambda: Release("approved"), "reviewer's name"),
        (lambda: Release("gate", reviewer="x"), "no reviewer"),
        (lambda: Release("rejected"), "'gate' or 'approved'"),  # type: ignore[arg-type]
        (lambda: GateEvidence(oodm=float("nan"), tau=0.05, c=None, is_ood=False), "oodm must be a finite"),
        (lambda: GateEvidence(oodm=0.1, tau=0.05, c=None, is_ood=True, gate_reason="odd"), "gate_reason"),
        (lambda: SegmentDefinition(1, "x", (0, 0, 256), SEGMENT.code), "colour must be three integers"),
        (lambda: AnatomyCode(type=("10200004", "SCT", "")), "type_code"),
        (lambda: ModelFiles(weights="w.pt", bank="b.npz", display_color=(0, 0, 256)), "display_color"),
    ],
)
def test_records_refuse_nonsense(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_released_result_is_labelled(tmp_path: Path) -> None:
    """What a PACS shows for a result the gate released, from a model not for clinical use."""
    volume = _shuffled_classic(tmp_path)
    ds = pydicom.dcmread(write_dicom(_encode(volume, _mask(volume.shape)), tmp_path / "seg.dcm"))
    assert ds.SeriesDescription == "NOT FOR CLINICAL USE: Liver, specgate-unet 1.2.0, gate"
    assert ds.ImageComments == "NOT FOR CLINICAL USE"
    assert ds.ContentLabel == "GATE_PASS"
    assert ds.ContentDescription == "OODM 0.031 <= tau 0.052: in distribution"
    assert "ContentCreatorName" not in ds or not ds.ContentCreatorName
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "Liver" and segment.SegmentDescription == "Liver parenchyma"
    lab = hd.color.CIELabColor.from_dicom_value(tuple(segment.RecommendedDisplayCIELabValue))
    assert lab.to_rgb() == (200, 80, 40)


def test_approved_result_is_labelled(tmp_path: Path) -> None:
    """A held result a radiologist approved: the approver is named; the gate's verdict is still there."""
    volume = _shuffled_classic(tmp_path)
    path = write_dicom(_encode(volume, _mask(volume.shape), result=APPROVED), tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SeriesDescription == "NOT FOR CLINICAL USE: Liver, specga. 1.2.0, approved by Anna Jo."  # cut to 64
    assert ds.ContentLabel == "GATE_OOD"
    assert ds.ContentDescription == "OODM 0.0875 > tau 0.052: out of distribution"
    assert str(ds.ContentCreatorName) == "Jones^Anna" and ds.ContentCreatorName.family_name == "Jones"
    assert dciodvfy(path)[0] == []


def test_clinical_model_is_not_marked_and_long_names_fit(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    model = ModelIdentity("a-model-with-a-really-quite-long-name", "2024.11.30-rc7", SHA, clinical_use=True)
    evidence = GateEvidence(oodm=0.5, tau=0.052, c=None, is_ood=True, gate_reason="modality_not_in_bank")
    release = Release("approved", reviewer="Vandenberghe-Oosterhuis^Maximiliaan^J")
    ds = _encode(volume, _mask(volume.shape), model=model, result=(evidence, release))
    assert "ImageComments" not in ds and "CLINICAL" not in ds.SeriesDescription
    assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("Liver, a-model-with")
    assert ds.SeriesDescription == "Liver, a-model-with-. 2024.11.30-rc7, approved by Maximiliaan V."
    assert ds.ContentLabel == "GATE_NO_BANK"
    assert ds.ContentDescription == "OODM 0.5 > tau 0.052: modality not in the gate's bank"

    marked = _encode(volume, _mask(volume.shape), model=ModelIdentity(model.name, model.version, SHA),
                     result=(evidence, release))
    assert marked.SeriesDescription == "NOT FOR CLINICAL USE: Li., a-m. 2024.11.30-rc7, approved by Max."


def _model_segment(settings: Settings, model: str, labels: list[Label]) -> SegmentDefinition:
    """The worker's way from the settings to a one-label model's segment: its ModelSpec's description,
    through :func:`worker.segments.segments_for` under the default rule."""
    spec = next(m for m in settings.worker_config().models if m.name == model)
    (segment,) = segments_for(SeriesRule(name="default-ct-mr", model=model), labels, codes=dict(spec.codes),
                              segment=spec.segment)
    return segment


def test_default_model_says_what_the_phantom_model_is(tmp_path: Path) -> None:
    """The shipped model was trained on phantoms: the default model's segment says so, with valid SNOMED CT."""
    volume = _shuffled_classic(tmp_path)
    segment = _model_segment(Settings(), "default", [Label(1, "Phantom organ")])
    path = write_dicom(_encode(volume, _mask(volume.shape), segment=segment), tmp_path / "seg.dcm")
    (segment,) = pydicom.dcmread(path).SegmentSequence
    assert segment.SegmentLabel == "Phantom organ"
    assert "synthetic phantoms" in segment.SegmentDescription
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("123037004", "SCT")
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("91772007", "SCT", "Organ")
    assert dciodvfy(path)[0] == []
    lab = hd.color.CIELabColor.from_dicom_value(tuple(segment.RecommendedDisplayCIELabValue))
    assert lab.to_rgb() == (255, 160, 0)
    # a model naming its own segment does not inherit the phantom description
    assert ModelFiles(weights="w.pt", bank="b.npz", segment_label="Liver").segment_description is None


def test_settings_model_description_reaches_the_seg(tmp_path: Path) -> None:
    """A ``[models.NAME]`` table's segment_label, segment_description, codes and display_color are what the
    SEG of a rule selecting that model says, through the worker's ModelSpec and segments."""
    cfg = tmp_path / "specgate.toml"
    cfg.write_text('[models.liver-v3]\nweights = "/m/liver.pt"\nbank = "/m/liver.npz"\n'
                   'segment_label = "Liver"\nsegment_description = "Liver parenchyma, site model"\n'
                   'category_code = ["123037004", "SCT", "Anatomical Structure"]\n'
                   'type_code = ["10200004", "SCT", "Liver"]\ndisplay_color = [10, 200, 90]\n'
                   '[models.default]\nsegment_label = "Organ (phantom)"\n'
                   '[[rules]]\nname = "abdomen"\nmodel = "liver-v3"\n')
    settings = Settings.load(cfg)
    volume = _shuffled_classic(tmp_path)
    segment = _model_segment(settings, "liver-v3", [Label(1, "foreground")])
    path = write_dicom(_encode(volume, _mask(volume.shape), segment=segment), tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    (item,) = ds.SegmentSequence
    assert item.SegmentLabel == "Liver" and item.SegmentDescription == "Liver parenchyma, site model"
    kind, category = item.SegmentedPropertyTypeCodeSequence[0], item.SegmentedPropertyCategoryCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == LIVER
    assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == CATEGORY
    assert hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb() == (10, 200, 90)
    assert ds.SeriesDescription.startswith("NOT FOR CLINICAL USE: Liver,")
    assert dciodvfy(path)[0] == []
    # [models.default] describes the default model (model_weights or the shipped one), with no description
    default = _model_segment(settings, "default", [Label(1, "Phantom organ")])
    assert default.label == "Organ (phantom)" and default.description is None and default.color == (255, 160, 0)


@pytest.mark.parametrize("kind", list(SERIES))
def test_dcmqi_reads_back_the_same_mask(tmp_path: Path, kind: str) -> None:
    """dcmqi's segimage2itkimage, an independent reader, rebuilds the mask voxel for voxel."""
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    assert Path(exe).exists(), "dcmqi (segimage2itkimage) is missing: it comes with the dev extra (make setup)"
    volume = SERIES[kind](tmp_path)
    mask = _mask(volume.shape)
    path = write_dicom(_encode(volume, mask), tmp_path / "seg.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    subprocess.run([exe, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd", "-p", "seg"],
                   check=True, capture_output=True, timeout=120)
    (nrrd,) = sorted(out.glob("seg-*.nrrd"))
    image = sitk.ReadImage(str(nrrd))
    got = sitk.GetArrayFromImage(image).astype(bool)  # (k, j, i)

    # every voxel of dcmqi's image, placed by its physical position in the source volume's (z, y, x)
    inverse = np.linalg.inv(volume.affine)
    placed = np.zeros_like(mask)
    for k in range(got.shape[0]):
        corner = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        z, y, x = (inverse @ np.append(corner, 1.0))[:3]
        assert np.allclose([y, x], [0, 0], atol=1e-3) and abs(z - round(z)) < 1e-3, (k, z, y, x)
        step_x = inverse[:3, :3] @ np.array(image.TransformIndexToPhysicalPoint((1, 0, k))) + inverse[:3, 3]
        assert np.allclose(step_x, [z, 0, 1], atol=1e-3)  # dcmqi's i axis is the volume's x axis
        placed[int(round(z))] = got[k]
    np.testing.assert_array_equal(placed, mask)


def test_write_seg_is_atomic(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    seg = _encode(volume, _mask(volume.shape))
    out = tmp_path / "out"
    out.mkdir()
    target = write_dicom(seg, out / "seg.dcm")
    first = target.read_bytes()
    assert pydicom.dcmread(target).SOPInstanceUID == seg.SOPInstanceUID

    # a dataset that cannot be written: the old file stays whole and no temp file is left behind
    broken = _encode(volume, _mask(volume.shape))
    with pytest.warns(UserWarning, match="cannot be assigned"):
        broken.add_new(0x00091001, "US", "not a number")
    with pytest.raises(OSError, match="not an integer"):
        write_dicom(broken, target)
    assert target.read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["seg.dcm"]


def test_the_seg_modules_do_not_need_the_dicom_node() -> None:
    """What a segment says it is comes from the model, so writing a result's objects needs no DICOM node
    configuration: worker.dicom_seg, worker.segments and worker.objects load no module of dicom_node."""
    code = ("import sys; import worker.dicom_seg, worker.segments, worker.objects; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dicom_node'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"


def test_a_seg_on_lossy_sources_says_so(tmp_path: Path, strict_reading: None) -> None:
    """Slices 4 and 9 lossy (one JPEG Extended by dcmcjpeg: "01", ISO_10918_1 and its ratio; one JPEG 2000
    20:1 by openjpeg, which sets nothing): the SEG carries Lossy Image Compression "01" with both methods
    and no ratio (not one per method), read back strictly and passing dciodvfy; where only the first kind is
    present, its ratio too; with none, "00"."""
    from tests.compressed import compress_file

    spec = SeriesSpec(slices=12, rows=32, cols=32)
    paths = write_datasets(classic_datasets(spec), tmp_path / "plain")
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    extended = compress_file(by_z[4], "1.2.840.10008.1.2.4.51", tmp_path / "lossy" / "e.dcm")
    j2k = compress_file(by_z[9], "1.2.840.10008.1.2.4.91", tmp_path / "lossy" / "j.dcm")
    rest = [p for p in paths if p not in (by_z[4], by_z[9])]
    ratio = pydicom.dcmread(extended, stop_before_pixels=True).LossyImageCompressionRatio

    both = load_series([*rest, extended, j2k])
    path = write_dicom(_encode(both, _mask(both.shape)), tmp_path / "both.dcm")
    seg = pydicom.dcmread(path)
    assert seg.LossyImageCompression == "01"
    assert list(seg.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert "LossyImageCompressionRatio" not in seg
    assert dciodvfy(path)[0] == []

    one = load_series([*rest, extended, by_z[9]])
    seg = _encode(one, _mask(one.shape))
    assert (seg.LossyImageCompression, seg.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert seg.LossyImageCompressionRatio == ratio

    assert _encode(load_series(paths), _mask(both.shape)).LossyImageCompression == "00"
