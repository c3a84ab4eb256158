"""A screenshot of the reports page with a drift alarm for the README and the operator's guide.

    .venv/bin/python docs/screenshot_drift.py              # writes docs/review-drift.png
    .venv/bin/python docs/screenshot_drift.py --out /tmp

A throw-away SQLite ledger with the drift charts of three CT sources written through the worker's own
path (:func:`ledger.drift.observe`; ``tests/integration/review/drift_seed.py``: in-distribution OODMs,
then one source's studies turned soft until its stop rule fires), the real review app served by uvicorn,
and Debian's headless Chromium at the size of ``docs/screenshots.py`` (its ``_shot`` writes the PNG). The
page is scrolled to the drift section. Seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from docs.screenshots import ADMIN, HEIGHT, PASSWORD, WIDTH, _shot  # noqa: E402
from ledger import migrations  # noqa: E402
from ledger.db import open_engine, session_scope, sessionmaker_for  # noqa: E402
from review.app import ReviewActions  # noqa: E402
from review.auth import add_user  # noqa: E402
from specgate.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNG (default: docs/)")
    args = ap.parse_args()
    from selenium.webdriver.common.by import By

    from tests.browser import chromium, sign_in, wait
    from tests.integration.review.drift_seed import seed_drift
    from tests.integration.review.helpers import ReviewServer

    with tempfile.TemporaryDirectory(prefix="specgate-drift-shot-") as tmp:
        root = Path(tmp)
        settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / 'ledger.db'}")
        migrations.upgrade(settings.db_url)
        engine = open_engine(settings.db_url)
        sessions = sessionmaker_for(engine)
        stop_id = seed_drift(sessions)
        with session_scope(sessions) as s:
            add_user(s, ADMIN[0], role="admin", password=PASSWORD, actor="screenshots", display_name=ADMIN[1])
        with ReviewServer(settings.review_config(), sessions, ReviewActions(deliver=lambda job_id: None)) as srv:
            driver = chromium(WIDTH, HEIGHT)
            try:
                sign_in(driver, srv.url, ADMIN[0], PASSWORD)
                driver.get(srv.url + "/reports")
                wait(driver).until(lambda d: d.find_elements(By.ID, f"drift-alarm-{stop_id}"))
                args.out.mkdir(parents=True, exist_ok=True)
                _shot(driver, args.out / "review-drift.png")
            finally:
                driver.quit()
        engine.dispose()


if __name__ == "__main__":
    main()
