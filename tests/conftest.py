"""Fixtures shared by every test: real databases, fresh data folders, the CLI.

PostgreSQL is the real server the Makefile / .ci/run start (``SG_TEST_PG_ADMIN_URL``, default
``postgresql+psycopg://root@127.0.0.1:5432/postgres``); each test that asks for it gets a database of its
own, created and dropped around it. A missing server is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ledger import migrations
from ledger.db import open_engine, sessionmaker_for
from specgate.settings import Settings

PG_ADMIN_URL = os.environ.get("SG_TEST_PG_ADMIN_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def _clean_specgate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own Settings; an operator's SPECGATE_* variables must not leak in."""
    for key in list(os.environ):
        if key.startswith("SPECGATE_"):
            monkeypatch.delenv(key)


def _admin_engine():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the real server; dropped afterwards."""
    name = f"sg_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both ledger backends: the embedded SQLite default and the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings.load(data_dir=tmp_path / "data", database_url=db_url)


@pytest.fixture
def migrated(settings: Settings):
    """(settings, engine, sessionmaker) for a ledger migrated to head."""
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    try:
        yield settings, engine, sessionmaker_for(engine)
    finally:
        engine.dispose()


@pytest.fixture
def cli(settings: Settings):
    """Run ``specgate`` in-process with these settings (through the environment, as an operator would)."""
    from specgate.cli import main

    def run(*args: str, expect: int | None = 0) -> Result:
        env = {"SPECGATE_DATA_DIR": str(settings.data_dir), "SPECGATE_DATABASE_URL": settings.db_url}
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    return run


@pytest.fixture(scope="session")
def monai_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MONAI bundle in the Model Zoo's layout, its UNet trained briefly with MONAI's own tools on CT
    phantoms (``tests/model_factories/monai_bundle.py``; seconds). One per test session: the adapter's
    tests and the CLI's share it; a test that breaks it works on a copy (:func:`copy_model`)."""
    import warnings

    import torch

    from tests.model_factories.monai_bundle import write_bundle

    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_bundle(tmp_path_factory.mktemp("bundle") / "phantom_liver", iterations=32)


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nnU-Net v2 trained model folder from nnU-Net's own planning and preprocessing and a short training,
    two folds (``tests/model_factories/nnunet_model.py``; about a minute). One per test session."""
    import torch

    from tests.model_factories.nnunet_model import build_nnunet_model

    torch.set_num_threads(2)
    return build_nnunet_model(tmp_path_factory.mktemp("nnunet"), iterations=30).model_dir


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder to break in a test (a MONAI bundle's ``configs/`` and ``models/``, an
    nnU-Net folder's files and ``fold_*``), without the training data a factory leaves beside them."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", "eval"))
    return dst


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) for the session; tests use a prefix of their own (:func:`s3_store_config`)."""
    from tests.peers import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store_config(s3_server):
    """A StoreConfig for the session's S3 server, under a prefix no other test uses."""
    return s3_server.store_config(prefix=f"t-{uuid.uuid4().hex[:10]}")
