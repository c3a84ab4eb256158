"""Fixtures for the DICOM node's integration tests: a real ledger (SQLite and/or PostgreSQL), an
in-process SCP on a free port, and ``specgate scp`` in a process of its own (for memory measured in the
receiving process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.scp import StoreSCP
from ledger import migrations
from ledger.db import open_engine, sessionmaker_for
from specgate.settings import Settings
from tests.integration.dicom_node.helpers import CALLER, Ledger, ScpProcess, start_scp_process
from tests.peers import free_port


def _ledger(url: str, tmp_path: Path) -> Iterator[Ledger]:
    data = tmp_path / "data"
    settings = Settings.load(data_dir=data, database_url=url)
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    try:
        yield Ledger(settings, sessionmaker_for(engine), settings.db_url, data)
    finally:
        engine.dispose()


@pytest.fixture
def ledger(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    """A migrated ledger on both backends (parametrised: SQLite and PostgreSQL)."""
    yield from _ledger(db_url, tmp_path)


@pytest.fixture
def sqlite_ledger(sqlite_url: str, tmp_path: Path) -> Iterator[Ledger]:
    """A migrated SQLite ledger, for tests about the network rather than the database."""
    yield from _ledger(sqlite_url, tmp_path)


@pytest.fixture
def pg_ledger(pg_url: str, tmp_path: Path) -> Iterator[Ledger]:
    yield from _ledger(pg_url, tmp_path)


@pytest.fixture
def start_scp() -> Iterator[Any]:
    """start_scp(ledger, **settings) -> a running StoreSCP on a free port (stopped after the test)."""
    running: list[StoreSCP] = []

    def start(ledger: Ledger, **overrides: Any) -> StoreSCP:
        values: dict[str, Any] = {"data_dir": ledger.data_dir, "database_url": ledger.url,
                                  "scp_port": free_port(), "allowed_callers": f"{CALLER}@127.0.0.1",
                                  "scp_acse_timeout": 5, "scp_dimse_timeout": 10, "scp_network_timeout": 10}
        values.update(overrides)
        settings = Settings.load(**values)
        scp = StoreSCP(settings.node_config(), ledger.sessions).start()
        running.append(scp)
        return scp

    yield start
    for scp in running:
        scp.stop()




@pytest.fixture
def scp_process(sqlite_ledger: Ledger, tmp_path: Path) -> Iterator[Any]:
    """scp_process(**settings) -> a running :class:`ScpProcess` on ``sqlite_ledger`` (stopped after the
    test); ``settings`` by field name, e.g. ``scp_max_instance_bytes=str(32 << 20)``."""
    running: list[ScpProcess] = []

    def start(**settings: str) -> ScpProcess:
        scp = start_scp_process(sqlite_ledger, tmp_path / f"scp{len(running)}.log", **settings)
        running.append(scp)
        return scp

    yield start
    for scp in running:
        scp.stop()
