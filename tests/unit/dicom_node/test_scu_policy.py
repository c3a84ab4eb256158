"""dicom_node.scu: back-off schedule and how C-STORE statuses are classified."""

from __future__ import annotations

import pytest

from dicom_node.scu import RetryPolicy, _classify_status
from specgate.settings import Settings


def test_backoff_doubles_and_is_capped() -> None:
    p = RetryPolicy(max_attempts=6, backoff_s=1.5, backoff_max_s=5)
    assert [p.wait_before(n) for n in range(1, 7)] == [0, 1.5, 3.0, 5, 5, 5]


def test_policy_from_settings_and_refusals() -> None:
    p = Settings(scu_max_attempts=3, scu_backoff_seconds=0.5, scu_ae_title="SG1").retry_policy()
    assert (p.max_attempts, p.backoff_s, p.ae_title) == (3, 0.5, "SG1")
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(("status", "ok", "permanent"), [
    (0x0000, True, False),
    (0xB000, False, True),  # warning: stored with changes, a person must look; not "sent"
    (0x0001, False, True),
    (0xA700, False, False),  # out of resources: try again later
    (0xA7FF, False, False),
    (0xA900, False, True),
    (0xC000, False, True),
    (0x0122, False, True),
])
def test_status_classes(status: int, ok: bool, permanent: bool) -> None:
    r = _classify_status(status)
    assert (r.ok, r.permanent, r.status) == (ok, permanent, status)
