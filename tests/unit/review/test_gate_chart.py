"""review.charts.gate_chart: the scorecard's shares over time with their intervals as error bars."""

from __future__ import annotations

from review.charts import gate_chart


def _row(period: str, model: str, **shares: float | None) -> dict[str, object]:
    row: dict[str, object] = {"period": period, "model_id": model}
    for key in ("held_right", "retracted_rate", "audit_miss"):
        value = shares.get(key)
        row[key] = value
        row[f"{key}_lo"] = None if value is None else max(0.0, value - 0.1)
        row[f"{key}_hi"] = None if value is None else min(1.0, value + 0.1)
    return row


def test_each_share_with_a_value_is_drawn_and_a_share_of_nothing_is_not() -> None:
    svg = gate_chart([_row("2026-11-30", "liver:1", held_right=0.75, retracted_rate=0.25),
                      _row("2026-12-07", "liver:1", held_right=0.5, retracted_rate=None)])
    assert svg.startswith("<svg") and 'aria-label="The gate\'s scorecard over time"' in svg
    assert "held, rejected by a radiologist (gate right)" in svg and "released, retracted for quality" in svg
    assert "blind audit" not in svg  # no audited result: nothing drawn, no legend entry
    two = gate_chart([_row("2026-11-30", "liver:1", held_right=0.75), _row("2026-11-30", "kidney:2", held_right=0.5)])
    assert "liver:1: held" in two and "kidney:2: held" in two  # several models: each named in the legend


def test_no_rows_says_so() -> None:
    assert "no data in this period" in gate_chart([])


def test_results_without_labels_say_so_and_draw_no_legend() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend without entries
        svg = gate_chart([_row("2026-11-30", "liver:1")])
    assert "no labelled results in this period" in svg and "gate right" not in svg
