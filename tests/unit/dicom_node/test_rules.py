"""dicom_node.assembler.choose_series: which series of a study the settings' rules pick."""

from __future__ import annotations

from dicom_node.assembler import SeriesFacts, choose_series
from specgate.settings import SeriesRule, Settings


def facts(uid: str, modality: str = "CT", n: int = 20, desc: str = "AXIAL", body: str | None = "ABDOMEN",
          ae: str = "PACS") -> SeriesFacts:
    return SeriesFacts(uid, modality, body, desc, n, frozenset({ae}))


def test_default_rules_take_ct_and_mr_of_at_least_16_slices() -> None:
    rules = Settings().rules
    assert choose_series(rules, [facts("1", "CT", 15)]) is None
    assert choose_series(rules, [facts("1", "SR", 100)]) is None
    rule, s = choose_series(rules, [facts("1", "CT", 16), facts("2", "MR", 40)])
    assert s.series_instance_uid == "2"  # the larger matching series
    assert rule.model == "default"


def test_every_condition_must_match() -> None:
    rule = SeriesRule(name="liver", calling_ae="CT1", modalities=("CT",), body_part="abdo|liver",
                      series_description=r"^axial", min_slices=10)
    assert choose_series([rule], [facts("1", ae="CT1")])[1].series_instance_uid == "1"
    assert choose_series([rule], [facts("1", ae="CT2")]) is None
    assert choose_series([rule], [facts("1", body="CHEST", ae="CT1")]) is None
    assert choose_series([rule], [facts("1", body=None, ae="CT1")]) is None
    assert choose_series([rule], [facts("1", desc="SCOUT", ae="CT1")]) is None
    assert choose_series([rule], [facts("1", n=9, ae="CT1")]) is None
    assert choose_series([rule], [facts("1", modality="MR", ae="CT1")]) is None


def test_first_rule_in_order_wins() -> None:
    rules = [SeriesRule(name="mr-only", modalities=("MR",)), SeriesRule(name="ct", modalities=("CT",))]
    rule, s = choose_series(rules, [facts("ct", "CT", 300), facts("mr", "MR", 20)])
    assert (rule.name, s.series_instance_uid) == ("mr-only", "mr")


def test_rules_come_from_toml(tmp_path) -> None:
    cfg = tmp_path / "specgate.toml"
    cfg.write_text('[[rules]]\nname = "brain"\nmodalities = ["MR"]\nbody_part = "HEAD|BRAIN"\nmin_slices = 20\n'
                   'model = "brain-v2"\nsegment_label = "Brain"\n'
                   'type_code = ["12738006", "SCT", "Brain"]\n'
                   '[models.brain-v2]\nweights = "/models/brain-v2.pt"\nbank = "/models/brain-v2.npz"\n')
    rules = Settings.load(cfg).rules
    assert [r.name for r in rules] == ["brain"]
    rule, s = choose_series(rules, [facts("1", "MR", 24, body="HEAD")])
    assert rule.type_code == ("12738006", "SCT", "Brain") and s.series_instance_uid == "1"
    assert rule.model == "brain-v2"
