"""dicom_node.assembler.choose_series: which series of a study the settings' rules pick."""

from __future__ import annotations

import pytest

from dicom_node.assembler import SeriesFacts, choose_series
from specgate.settings import SeriesRule, Settings, SettingsError


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
                   'model = "brain-v2"\nlabels = ["brain"]\n'
                   '[models.brain-v2]\nweights = "/models/brain-v2.pt"\nbank = "/models/brain-v2.npz"\n'
                   'segment_label = "Brain"\ntype_code = ["12738006", "SCT", "Brain"]\n')
    settings = Settings.load(cfg)
    rules = settings.rules
    assert [r.name for r in rules] == ["brain"]
    rule, s = choose_series(rules, [facts("1", "MR", 24, body="HEAD")])
    assert rule.model == "brain-v2" and rule.labels == ("brain",) and s.series_instance_uid == "1"
    # what the segment says it is came with the model, not the rule
    (spec,) = [m for m in settings.worker_config().models if m.name == "brain-v2"]
    assert spec.segment is not None and spec.segment.label == "Brain"
    assert spec.segment.code.type == ("12738006", "SCT", "Brain")


@pytest.mark.parametrize("key, value", [
    ("segment_label", '"Liver"'), ("segment_description", '"Liver parenchyma"'),
    ("category_code", '["123037004", "SCT", "Anatomical Structure"]'), ("type_code", '["10200004", "SCT", "Liver"]'),
    ("display_color", "[200, 80, 40]"),
])
def test_a_rule_that_still_describes_the_segment_is_refused_naming_where_it_moved(tmp_path, key, value) -> None:
    """A site's TOML from before the split is refused at start-up, never half read: the message names the
    rule, the key and its new place (the model's [models.NAME] table, or a registered model's --codes)."""
    cfg = tmp_path / "specgate.toml"
    cfg.write_text(f'[[rules]]\nname = "abdomen-ct"\nmodel = "liver-v3"\n{key} = {value}\n'
                   '[models.liver-v3]\nweights = "/m/liver.pt"\nbank = "/m/liver.npz"\n')
    with pytest.raises(SettingsError) as exc:
        Settings.load(cfg)
    message = str(exc.value)
    assert "SPECGATE_RULES" in message and f"rule 'abdomen-ct' sets {key}, which a rule no longer carries" in message
    assert "[models.liver-v3]" in message and "specgate model register liver-v3 ... --codes FILE" in message
    # the default model's rule is pointed at [models.default]
    with pytest.raises(ValueError, match=r"sets segment_label, display_color, .*\[models\.default\]"):
        SeriesRule(name="any", segment_label="Liver", display_color=(1, 2, 3))
