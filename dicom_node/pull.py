"""Pull on demand: a study retrieved from an archive runs through the normal rules.

``specgate studies pull`` finds the study (by Study Instance UID, or by Accession Number with a C-FIND
or QIDO-RS), asks the archive what it holds (:meth:`ArchiveClient.study_counts`), and retrieves it:

- from a DIMSE archive by **C-MOVE** to our own SCP's AE title: the archive opens an association to the
  SCP and C-STOREs every instance, so bounds, UID checks, duplicates and audit rows are the SCP's own;
  the archive must know our AE title, host and port;
- from a DIMSE archive by **C-GET** (``--method get``): the instances come back on our own association,
  so the archive needs no route to us; each is written as the archive sent it into the spool's temporary
  folder and handed to :class:`dicom_node.receive.InstanceReceiver` (the calling AE title recorded is the
  archive's);
- from a DICOMweb archive by **WADO-RS**: each instance is written as a DICOM file into the spool's
  temporary folder and handed to :class:`dicom_node.receive.InstanceReceiver`, the same class that decides
  every C-STORE (the same checks, refusals and audit rows; the calling AE recorded is the archive's name).

Either way the SCP's assembler makes the job after the quiet period. A pull that brings instances
specgate did not hold makes a new job version (the earlier is superseded, as for any late instance); a
pull that brings nothing new leaves the jobs as they are (:attr:`PullResult.new`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .archive import ArchiveUnreachable, DicomwebArchive, DimseArchive, MoveProgress, StudyCounts
from .config import ReceiveLimits
from .dataset_stream import received_from_file
from .receive import InstanceReceiver, Outcome, Refused

__all__ = ["NotFound", "PullResult", "pull_by_get", "pull_by_move", "pull_by_wado", "resolve_study"]



class NotFound(Exception):
    """The archive holds no study of that accession number or UID (or several, for one accession)."""


@dataclass
class PullResult:
    """What a pull did: the archive's counts, and what arrived (C-MOVE: the archive's sub-operations;
    WADO-RS: our receiver's outcomes)."""

    study_instance_uid: str
    at_source: StudyCounts
    completed: int = 0
    failed: int = 0
    warning: int = 0
    new: int | None = None  # WADO-RS: instances not held before (C-MOVE: counted from the ledger by the caller)
    refused: list[str] = field(default_factory=list)


def resolve_study(client: DimseArchive | DicomwebArchive, *, accession: str | None,
                  study_uid: str | None) -> tuple[str, StudyCounts]:
    """The study's UID and what the archive holds of it; :class:`NotFound` when it holds nothing."""
    if study_uid is None:
        assert accession is not None
        found = client.find_accession(accession)
        if not found:
            raise NotFound(f"archive {client.archive.name} holds no study with accession number {accession!r}")
        if len(found) > 1:
            raise NotFound(f"archive {client.archive.name} holds {len(found)} studies with accession number "
                           f"{accession!r}: pull one by --study ({', '.join(found)})")
        study_uid = found[0]
    counts = client.study_counts(study_uid)
    if counts is None:
        raise NotFound(f"archive {client.archive.name} holds no study {study_uid}")
    return study_uid, counts


def pull_by_move(client: DimseArchive, study_uid: str, counts: StudyCounts, *, our_ae: str,
                 progress: Callable[[MoveProgress], None] | None = None) -> PullResult:
    """C-MOVE the study to ``our_ae``; the archive's final counts."""
    last = client.move_study(study_uid, our_ae, progress=progress)
    return PullResult(study_uid, counts, completed=last.completed, failed=last.failed, warning=last.warning)


def pull_by_get(client: DimseArchive, study_uid: str, counts: StudyCounts, receiver: InstanceReceiver, *,
                storage: Sequence[str], limits: ReceiveLimits,
                progress: Callable[[MoveProgress], None] | None = None) -> PullResult:
    """C-GET the study, proposing the ``storage`` SOP classes; each instance through ``receiver``, its
    outcome's status the archive's answer."""
    result = PullResult(study_uid, counts, new=0)
    calling = client.archive.ae_title or client.archive.name[:16]
    address = f"{client.archive.host}:{client.archive.port}"
    names = itertools.count()

    def on_store(data: bytes, sop_class: str, sop_instance: str, syntax: str) -> int:
        temp = receiver.spool.tmp_dir / f"{os.getpid()}.cget.{next(names)}.part"
        try:
            with open(temp, "wb") as f:
                f.write(data)
        except OSError as exc:
            receiver.spool.discard_temp(temp)
            outcome = receiver.refuse(0xA700, "storage_refused", f"the spool cannot store the instance: "
                                      f"{exc.strerror or type(exc).__name__}", request_sop_class=sop_class,
                                      request_sop_instance=sop_instance, calling_ae=calling, address=address)
        else:
            outcome = _receive_file(receiver, temp, limits, request_sop_class=sop_class,
                                    request_sop_instance=sop_instance, transfer_syntax=syntax, calling_ae=calling,
                                    address=address)
        if outcome.ok and not outcome.duplicate:
            result.new = (result.new or 0) + 1
        elif not outcome.ok:
            result.refused.append(f"0x{outcome.status:04X} {outcome.reason}")
        return outcome.status

    last = client.get_study(study_uid, storage, on_store, progress=progress)
    result.completed, result.failed, result.warning = last.completed, last.failed, last.warning
    return result


def _receive_file(receiver: InstanceReceiver, temp: Path, limits: ReceiveLimits, *, request_sop_class: str,
                  request_sop_instance: str, transfer_syntax: str, calling_ae: str, address: str) -> Outcome:
    """A whole Part 10 file through the same checks as a C-STORE's data set (its element walk under
    ``limits``, then the receiver): ``temp`` becomes the spool file or is removed."""
    try:
        received = received_from_file(temp, transfer_syntax, limits)
    except Refused as refusal:
        receiver.spool.discard_temp(temp)
        return receiver.refuse(refusal.status, refusal.reason, refusal.detail, request_sop_class=request_sop_class,
                               request_sop_instance=request_sop_instance, calling_ae=calling_ae, address=address)
    except BaseException:
        receiver.spool.discard_temp(temp)
        raise
    return receiver.receive(temp, request_sop_class=request_sop_class, request_sop_instance=request_sop_instance,
                            transfer_syntax=transfer_syntax, calling_ae=calling_ae, address=address, received=received)


def pull_by_wado(client: DicomwebArchive, study_uid: str, counts: StudyCounts, receiver: InstanceReceiver, *,
                 limits: ReceiveLimits, progress: Callable[[MoveProgress], None] | None = None) -> PullResult:
    """WADO-RS the study, each instance through ``receiver`` as if it had come by C-STORE."""
    result = PullResult(study_uid, counts, new=0)
    total = counts.instances
    calling = client.archive.name[:16]
    for n, ds in enumerate(client.iter_study(study_uid), start=1):
        syntax = _syntax_of(ds)
        temp = receiver.spool.tmp_dir / f"{os.getpid()}.wado.{n}.part"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
        meta.TransferSyntaxUID = UID(syntax)
        ds.file_meta = meta
        try:
            dcmwrite(temp, ds, enforce_file_format=True)
        except (ValueError, TypeError, AttributeError) as exc:  # what pydicom raises for a data set it cannot encode
            receiver.spool.discard_temp(temp)
            receiver.refuse(0xC000, "not_encodable", f"WADO-RS instance {n} cannot be written: {type(exc).__name__}",
                            request_sop_class=str(meta.MediaStorageSOPClassUID),
                            request_sop_instance=str(meta.MediaStorageSOPInstanceUID), calling_ae=calling,
                            address=client.archive.url or "")
            result.failed += 1
            continue
        outcome = _receive_file(receiver, temp, limits, request_sop_class=str(meta.MediaStorageSOPClassUID),
                                request_sop_instance=str(meta.MediaStorageSOPInstanceUID), transfer_syntax=syntax,
                                calling_ae=calling, address=client.archive.url or "")
        if outcome.ok:
            result.completed += 1
            if not outcome.duplicate:
                result.new = (result.new or 0) + 1
        else:
            result.failed += 1
            result.refused.append(f"0x{outcome.status:04X} {outcome.reason}")
        if progress is not None:
            progress(MoveProgress(result.completed, result.failed, 0, max(total - n, 0)))
    if result.completed + result.failed == 0:
        raise ArchiveUnreachable(f"archive {client.archive.name}: WADO-RS returned no instance of {study_uid}")
    return result


def _syntax_of(ds: Dataset) -> str:
    """The transfer syntax ``ds`` is written in: as it came (dicomweb-client keeps the part's), else
    Explicit VR Little Endian (an implicit one is kept implicit)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if syntax == ImplicitVRLittleEndian:
        return syntax
    return syntax or ExplicitVRLittleEndian
