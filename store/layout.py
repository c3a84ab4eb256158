"""Where things are kept: the one place that names a job's result files and an instance's store key.

The ledger holds keys, never absolute paths (:mod:`ledger.paths`): an instance's ``store_key`` and a
result's ``seg_path``, ``sr_path``, ``prob_path``, ``evidence_path`` and a retraction's ``kos_path``. With
the ``fs`` store a key is the file's path relative to the data directory; with ``s3`` it is the object's
key in the bucket (under the configured prefix), and the same string names the local copy a worker writes
before it uploads. Instance objects are content-addressed by the SHA-256 the ledger already keeps, so a
resent or re-routed image is one object however many times it arrives.

    >>> result_keys(12, 3)["seg"]
    'results/job-00000012-v3/seg.dcm'
    >>> sorted(result_keys(12, 3))
    ['evidence', 'kos', 'preview', 'prob', 'seg', 'sr']
    >>> instance_key("ab" * 32)
    'instances/ab/abababababababababababababababababababababababababababababababab.dcm'
"""

from __future__ import annotations

import re

__all__ = ["RESULT_FILES", "instance_key", "result_folder", "result_keys"]

#: a job's kept files, by role: what the worker writes, the review app shows and delivery sends
RESULT_FILES: dict[str, str] = {
    "seg": "seg.dcm",  # the labelled DICOM-SEG (sent)
    "sr": "sr.dcm",  # the gate's evidence as a TID 1500 SR (sent with the SEG)
    "prob": "probability.npz",  # foreground probability, mask, label map and legend (the review app)
    "evidence": "evidence.json",  # the gate's numbers and what produced them (the review app, approval)
    "preview": "preview.png",  # one slice with the outline and the verdict (the demo, a quick look)
    "kos": "kos.dcm",  # the IOCM rejection note, when a sent result is withdrawn
}

_SHA256 = re.compile(r"[0-9a-f]{64}")


def result_folder(job_id: int, version: int) -> str:
    """The key prefix (and, under a data directory, the folder) of one job version's files."""
    if job_id < 1 or version < 1:
        raise ValueError(f"job id and version must be >= 1, got {job_id} and {version}")
    return f"results/job-{job_id:08d}-v{version}"


def result_keys(job_id: int, version: int) -> dict[str, str]:
    """The keys of one job version's files, by role (:data:`RESULT_FILES`)."""
    folder = result_folder(job_id, version)
    return {role: f"{folder}/{name}" for role, name in RESULT_FILES.items()}


def instance_key(sha256: str) -> str:
    """The content-addressed key of a received instance in an object store."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a lower-case hex SHA-256: {sha256[:80]!r}")
    return f"instances/{sha256[:2]}/{sha256}.dcm"
