"""Where instance files and job results live: the data directory (``fs``) or an S3-compatible object
store (``s3``), behind one interface (:mod:`store.backends`), with a size-bounded local cache
(:mod:`store.cache`) and the one module that names a job's result files (:mod:`store.layout`).

This package imports nothing of ours: the DICOM node, the worker and the review app all use it.
"""

from .backends import (
    FsStore,
    HashMismatch,
    ObjectMissing,
    S3Store,
    Store,
    StoreConfig,
    StoreError,
    as_store,
    file_sha256,
    open_store,
)
from .cache import LocalCache
from .layout import RESULT_FILES, instance_key, result_folder, result_keys

__all__ = ["RESULT_FILES", "FsStore", "HashMismatch", "LocalCache", "ObjectMissing", "S3Store", "Store", "StoreConfig", "StoreError",
           "as_store", "file_sha256", "instance_key", "open_store", "result_folder", "result_keys"]
