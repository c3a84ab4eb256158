"""Multi-label results: a label map with several labels -> one DICOM-SEG with one segment per label (names,
colours, SNOMED CT codes from the default table), read back strictly by pydicom and highdicom and by dcmqi
voxel for voxel, valid for dciodvfy; the SR with each segment's volume; the rule's choice of labels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr._concepts_dict import concepts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dicom_seg import (  # noqa: E402
    APPROVED,
    MODEL,
    RELEASED,
    SERIES,
    _shuffled_classic,
    dciodvfy,
    strict_reading,  # noqa: F401 - a fixture
)

from dicom_node.config import SeriesRule  # noqa: E402
from dicom_series import Volume  # noqa: E402
from model.adapters.base import Label  # noqa: E402
from worker.anatomy import DEFAULT_ANATOMY, LEFT, RIGHT, AnatomyCode, lookup, normalise_name  # noqa: E402
from worker.atomic import write_dicom  # noqa: E402
from worker.dicom_seg import derive_uid, encode_seg, segment_numbers  # noqa: E402
from worker.segments import (  # noqa: E402
    GENERIC_CODE,
    PALETTE,
    PHANTOM_SEGMENT,
    RuleOf,
    SegmentDefinition,
    color_for,
    review_arrays,
    segments_evidence,
    segments_for,
    segments_from_evidence,
    select_labels,
    validate_rule_labels,
)
from worker.sr import CUBIC_CENTIMETER, OODM, VOLUME, encode_sr, segment_voxels  # noqa: E402

LABELS = (Label(1, "liver"), Label(2, "kidney_left"), Label(3, "Right Kidney"), Label(4, "spleen"),
          Label(6, "lesion"))
RULE = SeriesRule(name="abdomen")


def _label_map(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels 1, 2, 3 and 6 in boxes that differ slice by slice, some slices holding several labels; label 4
    (spleen) nowhere; a stray value 5 (a label the model has but the test's definitions do not name)."""
    lm = np.zeros(shape, dtype=np.uint8)
    for z in range(2, shape[0] - 2):
        lm[z, 2 + z % 3 : 12, 2 : 12 + z % 4] = 1
    lm[5:15, 15:25, 3:9] = 2
    lm[6:12, 15:25, 20:28] = 3
    lm[12:18, 2:10, 20:30] = 6
    lm[0, 30:32, 30:32] = 5
    return lm


def _encode(volume: Volume, label_map: np.ndarray, segments: tuple, result=RELEASED) -> hd.seg.Segmentation:
    evidence, release = result
    return encode_seg(volume, label_map, model=MODEL, evidence=evidence, release=release,
                      segments=segments, sop_instance_uid=derive_uid("ml", volume.study_instance_uid, "seg"),
                      series_instance_uid=derive_uid("ml", volume.study_instance_uid, "series"))


def _expected(label_map: np.ndarray, segments: tuple) -> np.ndarray:
    """The segment number each voxel should have: its label's position among the segments (1..), else 0."""
    out = np.zeros(label_map.shape, dtype=np.uint8)
    for number, s in enumerate(segments, start=1):
        out[label_map == s.value] = number
    return out


# ------------------------------------------------------------------------------------- anatomy codes
def test_every_default_code_is_a_pydicom_concept_with_its_meaning() -> None:
    """No code is typed in from memory: each (value, meaning) is one pydicom ships from PS3.16."""
    shipped = {(code, meaning) for by_code in concepts["SCT"].values() for code, (meaning, _) in by_code.items()}
    seen = set()
    for name, code in DEFAULT_ANATOMY.items():
        for triple in filter(None, (code.type, code.category, code.modifier)):
            assert triple[1] == "SCT", (name, triple)
            assert (triple[0], triple[2]) in shipped, f"{name}: {triple} is not a pydicom SCT concept"
            seen.add(triple)
    assert len(seen) > 40
    for organ in ("liver", "spleen", "kidney", "pancreas", "gallbladder", "stomach", "aorta", "lung", "heart",
                  "esophagus", "urinary bladder", "prostate", "adrenal gland", "duodenum", "small intestine",
                  "colon", "vertebra"):
        assert organ in DEFAULT_ANATOMY, organ


@pytest.mark.parametrize(("names", "type_value", "modifier"), [
    (("kidney_left", "Left kidney", "left_kidney", "KIDNEY (LEFT)", "kidney-left"), "64033007", LEFT),
    (("kidney_right", "Right Kidney"), "64033007", RIGHT),
    (("kidney", "Kidneys"), "64033007", None),
    (("adrenal_gland_left",), "23451007", LEFT),
    (("lung_upper_lobe_left", "left upper lobe of lung"), "44714003", None),  # a concept of its own
    (("lung_middle_lobe_right",), "72481006", None),
    (("lung_lower_lobe_right",), "90572001", RIGHT),  # no concept of its own: the lobe, sided
    (("urinary_bladder", "Bladder"), "89837001", None),
    (("small_bowel", "Small intestine"), "30315005", None),
    (("vertebrae_L1", "L1", "L1 vertebra"), "66794005", None),
    (("heart_atrium_left", "Left atrium"), "82471001", None),
    (("Liver",), "10200004", None),
])
def test_names_are_normalised_before_the_lookup(names: tuple[str, ...], type_value: str, modifier) -> None:
    for name in names:
        code = lookup(name)
        assert code is not None, name
        assert (code.type[0], code.modifier) == (type_value, modifier), name


def test_a_models_own_mapping_comes_first_and_unknown_names_are_none() -> None:
    own = {"Tumor_Core": ("108369006", "SCT", "Neoplasm"), "liver": AnatomyCode(("39607008", "SCT", "Lung"))}
    assert lookup("tumor core", own) == AnatomyCode(("108369006", "SCT", "Neoplasm"))
    assert lookup("Liver", own).type[2] == "Lung"  # the model's word over the default table
    assert lookup("lesion") is None and lookup("lesion", own) is None
    with pytest.raises(ValueError, match="the code of label 'bad'"):
        lookup("bad", {"bad": ("1", "SCT", "")})  # type: ignore[dict-item]
    assert normalise_name(" Kidney__Left ") == "kidney left"


# ------------------------------------------------------------------------------------- segments
def test_segments_for_a_multi_label_model() -> None:
    segments = segments_for(RULE, LABELS)
    assert [(s.value, s.label) for s in segments] == [(1, "liver"), (2, "kidney_left"), (3, "Right Kidney"),
                                                      (4, "spleen"), (6, "lesion")]
    assert [s.color for s in segments] == [PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[3], PALETTE[5]]
    lesion = segments[-1]
    assert not lesion.coded and lesion.description == "no anatomy code known for label 'lesion'"
    assert lesion.code == GENERIC_CODE  # "Anatomical Structure" / "Organ", as before
    assert all(s.coded and s.description is None for s in segments[:-1])
    colours = [color_for(v) for v in range(1, 120)]
    assert len(set(colours)) == len(colours)  # distinct for a TotalSegmentator-sized label set


def test_one_label_and_no_choice_keeps_the_models_segment() -> None:
    (only,) = segments_for(SeriesRule(name="default-ct-mr"), [Label(3, "foreground")], segment=PHANTOM_SEGMENT)
    assert only == SegmentDefinition(3, "Phantom organ", (255, 160, 0), GENERIC_CODE,
                                     description=PHANTOM_SEGMENT.description)
    assert "synthetic phantoms" in (only.description or "")
    # a rule that chooses the label describes it by the model's name instead
    (chosen,) = segments_for(SeriesRule(name="liver", labels=("Liver",)), [Label(1, "liver")], segment=PHANTOM_SEGMENT)
    assert chosen.label == "liver" and chosen.code.type[0] == "10200004"
    # a model without its own description (a registered one) is described by its label, even with one label
    (named,) = segments_for(RuleOf("r"), [Label(1, "liver")], codes={"liver": ("10200004", "SCT", "Liver parenchyma")})
    assert (named.label, named.code.type, named.color) == ("liver", ("10200004", "SCT", "Liver parenchyma"), PALETTE[0])
    # several labels: the model's description is not used for any of them
    assert [s.label for s in segments_for(RULE, LABELS, segment=PHANTOM_SEGMENT)] == [lab.name for lab in LABELS]


def test_rules_choose_labels_by_name_or_value_in_the_models_order() -> None:
    rule = SeriesRule(name="kidneys", labels=("right_kidney", 2))
    assert [lab.value for lab in select_labels(rule, LABELS)] == [2, 3]
    assert [s.label for s in segments_for(rule, LABELS)] == ["kidney_left", "Right Kidney"]
    assert select_labels(SeriesRule(name="all"), LABELS) == LABELS


@pytest.mark.parametrize(("labels", "message"), [
    (("pancreas",), "rule 'r' sends label 'pancreas', which the model does not have "
                    "(its labels: 1=liver, 2=kidney_left, 3=Right Kidney, 4=spleen, 6=lesion)"),
    ((5,), "sends label 5, which the model does not have"),
    (("liver", 1), "chooses label 1='liver' twice"),
])
def test_a_rule_naming_a_label_the_model_lacks_is_refused(labels: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_rule_labels(SeriesRule(name="r", labels=labels), LABELS)
    validate_rule_labels(SeriesRule(name="r", labels=("Liver", 6)), LABELS)  # fine: nothing raised
    with pytest.raises(ValueError, match="the code of label 'liver'"):
        validate_rule_labels(SeriesRule(name="r"), LABELS, codes={"liver": ("10200004", "SCT", "")})
    with pytest.raises(ValueError, match="without a backslash"):
        validate_rule_labels(SeriesRule(name="r"), [Label(1, "liver"), Label(2, "a\\b")])


@pytest.mark.parametrize("bad", [[], [0], [True], [""], [1.5]])
def test_rule_labels_setting_is_validated(bad: list) -> None:
    with pytest.raises(ValueError, match="labels"):
        SeriesRule(name="r", labels=bad)


@pytest.mark.parametrize("name", ["a\\b", "tab\there", "x" * 65])
def test_a_label_name_dicom_cannot_carry_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="a segment label must be 1 to 64 characters"):
        SegmentDefinition(1, name, (1, 2, 3), AnatomyCode(("10200004", "SCT", "Liver")))
    long = segments_for(RULE, [Label(1, "liver"), Label(2, "y" * 80)])
    assert long[1].label == "y" * 61 + "..."  # the model's long name, cut to fit


def test_segment_numbers_and_review_arrays() -> None:
    segments = segments_for(SeriesRule(name="r", labels=("lesion", "liver")), LABELS)
    label_map = np.array([[[0, 1, 2, 6, 5]]], dtype=np.uint8)
    assert segment_numbers(label_map, segments).tolist() == [[[0, 1, 0, 2, 0]]]
    arrays = review_arrays(label_map, segments)
    assert arrays["labels"].tolist() == [[[0, 1, 0, 6, 0]]] and arrays["labels"].dtype == np.uint8
    assert arrays["label_values"].tolist() == [1, 6] and arrays["label_names"].tolist() == ["liver", "lesion"]
    assert arrays["label_colors"].tolist() == [list(PALETTE[0]), list(PALETTE[5])]
    with pytest.raises(ValueError, match="must hold integers"):
        segment_numbers(label_map.astype(np.float32), segments)
    with pytest.raises(ValueError, match="must be >= 0, found -1"):
        segment_numbers(np.array([-1, 1]), segments)
    evidence = segments_evidence(segments, np.array([[[1, 1, 6, 0]]]), (2.0, 0.5, 0.5))
    assert [(e["name"], e["voxels"], e["volume_ml"]) for e in evidence] == [("liver", 2, 0.001),
                                                                           ("lesion", 1, 0.0005)]


def test_the_segments_written_come_back_from_the_evidence() -> None:
    """An approval re-encodes the very segments of the first writing, read back from the evidence JSON."""
    segments = segments_for(RULE, LABELS)
    records = json.loads(json.dumps(segments_evidence(segments, np.zeros((1, 2, 2), np.uint8), (1, 1, 1))))
    assert segments_from_evidence(records) == segments
    records[1]["segment_number"] = 3
    with pytest.raises(ValueError, match="evidence segment 2 is not a segment record"):
        segments_from_evidence(records)


# ------------------------------------------------------------------------------------- the SEG
@pytest.mark.parametrize("kind", list(SERIES))
def test_multi_label_seg_round_trip(tmp_path: Path, strict_reading: None, kind: str) -> None:  # noqa: F811
    volume = SERIES[kind](tmp_path)
    label_map = _label_map(volume.shape)
    segments = segments_for(RULE, LABELS)
    path = write_dicom(_encode(volume, label_map, segments), tmp_path / "seg.dcm")

    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "NOT FOR CLINICAL USE: 5 segments, specgate-unet 1.2.0, gate"
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3, 4, 5]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "kidney_left", "Right Kidney", "spleen",
                                                            "lesion"]
    for item, definition in zip(ds.SegmentSequence, segments, strict=True):
        kind_code = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind_code.CodeValue, kind_code.CodingSchemeDesignator, kind_code.CodeMeaning) == definition.code.type
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodeMeaning) == definition.code.category[::2]
        modifiers = kind_code.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [(m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning) for m in modifiers] == (
            [definition.code.modifier] if definition.code.modifier else [])
        lab = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue))
        assert lab.to_rgb() == definition.color
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "specgate-unet"
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0] \
        .SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert ds.SegmentSequence[4].SegmentDescription == "no anatomy code known for label 'lesion'"

    # empty frames omitted: one frame per (slice, segment) that has voxels; the absent spleen has none
    expected = _expected(label_map, segments)
    frames = sum(int((expected == n).any(axis=(1, 2)).sum()) for n in range(1, 6))
    assert int(ds.NumberOfFrames) == frames

    # highdicom reads every segment back, voxel for voxel, through the source references
    seg = hd.seg.segread(path)
    if volume.is_multiframe:
        got = seg.get_pixels_by_source_frame(volume.slices[0].sop_instance_uid,
                                             [ref.frame_number for ref in volume.slices],
                                             assert_missing_frames_are_empty=True)
    else:
        got = seg.get_pixels_by_source_instance([ref.sop_instance_uid for ref in volume.slices],
                                                assert_missing_frames_are_empty=True)
    assert got.shape == (*volume.shape, 5)
    for n in range(1, 6):
        np.testing.assert_array_equal(got[..., n - 1].astype(bool), expected == n, err_msg=f"segment {n}")
    assert not got[..., 3].any()  # the spleen's segment is there, empty

    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)


@pytest.mark.parametrize("kind", list(SERIES))
def test_dcmqi_reads_back_every_label(tmp_path: Path, kind: str) -> None:
    """dcmqi's segimage2itkimage rebuilds each segment voxel for voxel, with its label, codes and colour."""
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    assert Path(exe).exists(), "dcmqi (segimage2itkimage) is missing: it comes with the dev extra (make setup)"
    volume = SERIES[kind](tmp_path)
    label_map = _label_map(volume.shape)
    segments = segments_for(RULE, LABELS)
    path = write_dicom(_encode(volume, label_map, segments), tmp_path / "seg.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    subprocess.run([exe, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd", "-p", "seg"],
                   check=True, capture_output=True, timeout=120)
    meta = json.loads((out / "seg-meta.json").read_text())
    expected = _expected(label_map, segments)
    inverse = np.linalg.inv(volume.affine)
    found = {}
    for k, attributes in enumerate(meta["segmentAttributes"], start=1):
        (attr,) = attributes
        number = int(attr["labelID"])
        image = sitk.ReadImage(str(out / f"seg-{k}.nrrd"))
        got = sitk.GetArrayFromImage(image)
        placed = np.zeros(volume.shape, dtype=bool)
        for plane in range(got.shape[0]):
            z, y, x = (inverse @ np.append(image.TransformIndexToPhysicalPoint((0, 0, plane)), 1.0))[:3]
            assert np.allclose([y, x], [0, 0], atol=1e-3) and abs(z - round(z)) < 1e-3
            placed[int(round(z))] = got[plane] == number
        np.testing.assert_array_equal(placed, expected == number, err_msg=f"segment {number}")
        found[number] = attr
    assert sorted(found) == [1, 2, 3, 4, 5]
    assert found[1]["SegmentLabel"] == "liver" and found[1]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] \
        == "10200004"
    assert found[2]["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] == "Left"
    assert found[3]["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] == "Right"
    assert found[5]["SegmentDescription"] == "no anatomy code known for label 'lesion'"
    rgb = [int(c) for c in found[4]["recommendedDisplayRGBValue"]]
    assert np.allclose(rgb, PALETTE[3], atol=1)


def test_a_rules_choice_drops_the_other_labels(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    label_map = _label_map(volume.shape)
    segments = segments_for(SeriesRule(name="kidneys", labels=("kidney left", "kidney right")), LABELS)
    seg = _encode(volume, label_map, segments)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney_left", "Right Kidney"]
    assert seg.SeriesDescription == "NOT FOR CLINICAL USE: 2 segments, specgate-unet 1.2.0, gate"  # too long
    short = _encode(volume, label_map, segments_for(SeriesRule(name="two", labels=("liver", "spleen")), LABELS))
    assert short.SeriesDescription == "NOT FOR CLINICAL USE: liver, spleen, specgate-unet 1.2.0, gate"
    voxels = segment_voxels(seg)
    assert voxels == {1: int((label_map == 2).sum()), 2: int((label_map == 3).sum())}


# ------------------------------------------------------------------------------------- the SR
@pytest.mark.parametrize("kind", list(SERIES))
def test_sr_lists_every_segments_volume(tmp_path: Path, strict_reading: None, kind: str) -> None:  # noqa: F811
    volume = SERIES[kind](tmp_path)
    label_map = _label_map(volume.shape)
    segments = segments_for(RULE, LABELS)
    seg = _encode(volume, label_map, segments, result=APPROVED)
    evidence, release = APPROVED
    sr = encode_sr(volume, seg, model=MODEL, evidence=evidence, release=release,
                   sop_instance_uid=derive_uid("ml", "sr"), series_instance_uid=derive_uid("ml", "sr-series"))
    path = write_dicom(sr, tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)

    read = hd.sr.srread(path)
    groups = read.content.get_volumetric_roi_measurement_groups()
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[1], [2], [3], [4], [5]]
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    for number, (group, definition) in enumerate(zip(groups, segments, strict=True), start=1):
        assert group.tracking_identifier == f"segment {number} of {definition.label}"
        (measured,) = group.get_measurements(name=VOLUME)
        assert measured.unit == CUBIC_CENTIMETER
        assert measured.value == pytest.approx(int((label_map == definition.value).sum()) * voxel_ml, abs=1e-6)
        assert group.finding_type.value == definition.code.type[0]
    assert groups[3].get_measurements(name=VOLUME)[0].value == 0  # the spleen: looked for, not found
    assert groups[0].get_measurements(name=OODM)[0].value == pytest.approx(0.0875)  # gate evidence once
    assert all(not g.get_measurements(name=OODM) for g in groups[1:])
    # a sided segment's finding site: the structure, with its laterality as a concept modifier
    sites = [[(site.value.value, site.laterality.meaning if site.laterality else None) for site in g.finding_sites]
             for g in groups]
    assert sites == [[], [("64033007", "Left")], [("64033007", "Right")], [], []]
    assert all("SegmentedPropertyTypeModifierCodeSequence" not in site.ConceptCodeSequence[0]
               for g in groups for site in g.finding_sites)


def test_a_one_mask_sr_has_its_segments_volume(tmp_path: Path) -> None:
    """A model's one segment (a boolean mask, as before labels) gets its volume too, beside the evidence."""
    volume = _shuffled_classic(tmp_path)
    mask = _label_map(volume.shape) == 1
    evidence, release = RELEASED
    seg = encode_seg(volume, mask, segments=(PHANTOM_SEGMENT,), model=MODEL, evidence=evidence, release=release,
                     sop_instance_uid=derive_uid("one", "seg"), series_instance_uid=derive_uid("one", "series"))
    assert segment_voxels(seg) == {1: int(mask.sum())}
    sr = encode_sr(volume, seg, model=MODEL, evidence=evidence, release=release,
                   sop_instance_uid=derive_uid("one", "sr"), series_instance_uid=derive_uid("one", "sr-series"))
    (group,) = hd.sr.srread(write_dicom(sr, tmp_path / "sr.dcm")).content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements(name=VOLUME)[0].value == pytest.approx(mask.sum() * np.prod(volume.spacing) / 1000)
    assert group.get_measurements(name=OODM)[0].value == pytest.approx(0.031)


@pytest.mark.parametrize("empty", [False, True])
def test_odd_frame_sizes_and_an_empty_label_map(tmp_path: Path, empty: bool) -> None:
    """Frames whose pixels are not a whole number of bytes (13 x 11) are counted right, and a label map
    with no label at all still gives a valid SEG (every frame written, empty) and an SR of 0 mL volumes."""
    from dicom_factory import SeriesSpec, classic_datasets, write_datasets

    from dicom_series import load_series

    volume = load_series(write_datasets(classic_datasets(SeriesSpec(slices=7, rows=13, cols=11)), tmp_path / "ct"))
    label_map = np.zeros(volume.shape, dtype=np.uint16)
    if not empty:
        label_map[1:4, 2:9, 3:7] = 1
        label_map[3:6, 0:5, 0:11] = 6
    segments = segments_for(RULE, LABELS)
    seg = _encode(volume, label_map, segments)
    assert segment_voxels(seg) == {n: int((label_map == s.value).sum()) for n, s in enumerate(segments, start=1)}
    evidence, release = RELEASED
    sr = encode_sr(volume, seg, model=MODEL, evidence=evidence, release=release,
                   sop_instance_uid=derive_uid("odd", "sr"), series_instance_uid=derive_uid("odd", "sr-series"))
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        errors, warnings = dciodvfy(write_dicom(ds, tmp_path / name))
        assert errors == [], "\n".join(errors + warnings)
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    volumes = [g.get_measurements(name=VOLUME)[0].value for g in groups]
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    assert volumes == pytest.approx([(label_map == s.value).sum() * voxel_ml for s in segments], abs=1e-6)


def test_one_label_through_the_label_map_path_is_the_same_seg(tmp_path: Path) -> None:
    """The pipeline may call encode_seg with the label map and segments_for() for every model: for a
    one-label model under a rule that chooses nothing it writes the very SEG the boolean mask gave."""
    from test_dicom_seg import _mask

    from worker.dicom_seg import encode_seg as encode

    volume = _shuffled_classic(tmp_path)
    mask = _mask(volume.shape)
    rule = SeriesRule(name="default-ct-mr")
    segments = segments_for(rule, [Label(1, "foreground")], segment=PHANTOM_SEGMENT)
    evidence, release = RELEASED
    uids = {"sop_instance_uid": derive_uid("same", "seg"), "series_instance_uid": derive_uid("same", "series")}
    one = (PHANTOM_SEGMENT,)
    old = encode(volume, mask, segments=one, model=MODEL, evidence=evidence, release=release, **uids)
    again = encode(volume, mask, segments=one, model=MODEL, evidence=evidence, release=release, **uids)
    new = encode(volume, mask.astype(np.uint8), model=MODEL, evidence=evidence, release=release,
                 segments=segments, **uids)

    def differ(a: pydicom.Dataset, b: pydicom.Dataset) -> set[str]:
        return {e.keyword for e in a if e.tag not in b or b[e.tag] != e} | {e.keyword for e in b if e.tag not in a}

    # only what differs between two writings of the same mask anyway (highdicom's random dimension
    # organisation UID, the clock) may differ
    moving = {"ContributingEquipmentSequence", "DimensionOrganizationSequence", "DimensionIndexSequence",
              "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate",
              "SeriesTime"}
    assert differ(old, again) <= moving
    assert differ(old, new) <= moving
    assert old.PixelData == new.PixelData and old.SegmentSequence == new.SegmentSequence
