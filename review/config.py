"""The review app's own small configuration, built by ``specgate`` from its Settings.

    >>> validate_viewer_url("https://pacs.example/viewer?StudyInstanceUIDs={study_instance_uid}")
    'https://pacs.example/viewer?StudyInstanceUIDs={study_instance_uid}'
    >>> validate_viewer_url("https://pacs.example/{patient_id}")
    Traceback (most recent call last):
    ...
    ValueError: viewer URL template may only use {study_instance_uid} and {series_instance_uid}, not 'patient_id'
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from store import Store, StoreConfig, open_store

__all__ = ["VIEWER_FIELDS", "ReviewConfig", "validate_viewer_url"]

VIEWER_FIELDS = frozenset({"study_instance_uid", "series_instance_uid"})


def validate_viewer_url(template: str) -> str:
    """A viewer link template: http(s), and only UID placeholders (never patient identifiers in a URL)."""
    if not template.startswith(("http://", "https://")):
        raise ValueError(f"viewer URL template must start with http:// or https://, got {template!r}")
    for _, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if field not in VIEWER_FIELDS or spec or conv:
            raise ValueError("viewer URL template may only use {study_instance_uid} and {series_instance_uid}, "
                             f"not {field!r}")
    return template


@dataclass(frozen=True)
class ReviewConfig:
    database_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    secret_file: Path = Path("review-secret")
    secure_cookies: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session_s: float = 8 * 3600.0
    idle_s: float = 30 * 60.0
    viewer_url: str | None = None
    failed_login_limit: int = 5
    #: the longest request body accepted (the app's forms are a few hundred bytes; 413 past this)
    max_body_bytes: int = 256 * 1024
    #: password verifications run at once (argon2id: about 60 ms of CPU and 64 MiB each); a burst of
    #: logins waits its turn rather than taking every core from the pages
    hash_concurrency: int = 1
    #: the data directory the ledger's file paths are relative to (:mod:`ledger.paths`)
    data_dir: Path | None = None
    #: where instance files and results are read from (None: fs on data_dir)
    store: StoreConfig | None = None

    @property
    def files(self) -> Store:
        return open_store(self.store, self.data_dir)
