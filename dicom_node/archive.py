"""Asking an archive (a PACS, a VNA) what it holds of a study, and retrieving a study from it.

Two kinds of archive (:class:`dicom_node.config.Archive`), one interface (:class:`ArchiveClient`):

- **DIMSE** (:class:`DimseArchive`), pynetdicom as the SCU of the Study Root Query/Retrieve Information
  Model: C-FIND at SERIES level for the study's series with Number of Series Related Instances
  (0020,1209) (the study's totals are their sums), C-FIND at STUDY level to find a study by its
  Accession Number (0008,0050), and C-MOVE of the whole study to our own SCP's AE title, which the archive
  must know (its address and port).
- **DICOMweb** (:class:`DicomwebArchive`), ``dicomweb-client``: QIDO-RS ``/studies/{uid}/series`` with
  ``includefield=00201209``, QIDO-RS ``/studies?AccessionNumber=``, and WADO-RS ``/studies/{uid}`` whose
  instances are handed to the caller one by one (the pull writes each through the SCP's own receive path,
  :mod:`dicom_node.pull`). Credentials come from a file (``user:password`` for HTTP basic, anything
  else a bearer token), read when the client is opened and never logged.

Every failure to get an answer (refused, no route, timeout, an association rejected, a failure status, an
HTTP error) is an :class:`ArchiveUnreachable` whose message names the archive and what happened, without
a patient identifier. No query carries more than UIDs and the accession number.

    >>> from dicom_node.config import Archive
    >>> StudyCounts("1.2.3", (SeriesCount("1.2.3.1", "CT", 20), SeriesCount("1.2.3.2", "CT", 3))).instances
    23
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from .config import Archive

__all__ = ["ArchiveClient", "ArchiveUnreachable", "DicomwebArchive", "DimseArchive", "MoveProgress",
           "SeriesCount", "StudyCounts", "open_archive", "read_credentials"]

log = logging.getLogger("specgate.dicom_node.archive")

_PENDING = (0xFF00, 0xFF01)
# Study Root Query/Retrieve Information Model (PS3.4 C.6.2): FIND and MOVE
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"

#: What a C-GET's C-STORE sub-operation hands on: (the instance as a DICOM file's bytes: preamble, file meta
#: and the data set as the archive sent it; SOP Class UID; SOP Instance UID; transfer syntax) -> the status
#: to answer the archive with.
StoreHook = Callable[[bytes, str, str, str], int]


class ArchiveUnreachable(Exception):
    """The archive gave no usable answer; the message names the archive and why."""


@dataclass(frozen=True)
class SeriesCount:
    series_instance_uid: str
    modality: str | None
    instances: int


@dataclass(frozen=True)
class StudyCounts:
    """What an archive holds of one study: its series and the instances of each."""

    study_instance_uid: str
    series: tuple[SeriesCount, ...]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)

    def as_json(self) -> dict[str, Any]:
        return {"series": {s.series_instance_uid: s.instances for s in self.series},
                "instances": self.instances, "series_count": len(self.series)}


@dataclass(frozen=True)
class MoveProgress:
    """A retrieve's counts as the archive reports them (C-MOVE's sub-operations; WADO-RS: instances)."""

    completed: int
    failed: int
    warning: int
    remaining: int | None


ProgressHook = Callable[[MoveProgress], None]


def read_credentials(path: Path) -> tuple[str, str] | str:
    """A credential file: ``user:password`` (HTTP basic) or a bearer token, one line.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", delete=False) as f:
    ...     _ = f.write("specgate:s3cret\\n")
    >>> read_credentials(Path(f.name))
    ('specgate', 's3cret')
    >>> os.unlink(f.name)
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ArchiveUnreachable(f"cannot read the archive's credential file {str(path)!r}: "
                                 f"{exc.strerror or type(exc).__name__}") from exc
    if not text:
        raise ArchiveUnreachable(f"the archive's credential file {str(path)!r} is empty")
    if ":" in text:
        user, password = text.split(":", 1)
        return user, password
    return text


class ArchiveClient(ABC):
    """What specgate asks of an archive. Each call opens its own association or HTTP session."""

    def __init__(self, archive: Archive, *, timeout_s: float) -> None:
        self.archive = archive
        self.timeout_s = timeout_s

    @abstractmethod
    def study_counts(self, study_instance_uid: str) -> StudyCounts | None:
        """The study's series and their instance counts at the archive; None if it does not hold it."""

    @abstractmethod
    def find_accession(self, accession: str) -> list[str]:
        """Study Instance UIDs of the studies with this Accession Number (none, one, or several)."""

    def describe(self) -> str:
        return str(self.archive)


class DimseArchive(ArchiveClient):
    """An archive spoken to by DIMSE: C-FIND and C-MOVE (Study Root)."""

    def __init__(self, archive: Archive, *, timeout_s: float, ae_title: str) -> None:
        super().__init__(archive, timeout_s=timeout_s)
        self.ae_title = ae_title

    def _associate(self, sop_class: str, *, storage: Sequence[str] = (), on_store: StoreHook | None = None) -> Association:
        """An association for ``sop_class``; with ``storage``, also those storage SOP classes in the SCP role
        (a C-GET's sub-operations come back on it, each handed to ``on_store``)."""
        from .scu import _bound_socket  # the same guard as outbound C-STORE: no send or recv blocks for ever

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        ae.add_requested_context(sop_class, syntaxes)
        for uid in storage:
            ae.add_requested_context(uid, syntaxes)
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, _bound_socket)]
        if on_store is not None:
            hook = on_store

            def store(event: evt.Event) -> int:
                rq = event.request
                assert isinstance(rq, C_STORE)
                return hook(event.encoded_dataset(include_meta=True), str(rq.AffectedSOPClassUID),
                            str(rq.AffectedSOPInstanceUID), str(event.context.transfer_syntax))

            handlers.append((evt.EVT_C_STORE, store))
        a = self.archive
        assert a.host is not None and a.port is not None and a.ae_title is not None
        assoc = ae.associate(a.host, a.port, ae_title=a.ae_title, evt_handlers=handlers,
                             ext_neg=[build_role(uid, scp_role=True) for uid in storage] or None)
        if assoc.is_established:
            if not assoc.accepted_contexts:
                assoc.release()
                raise ArchiveUnreachable(f"archive {a.name} ({a.ae_title}@{a.host}:{a.port}) accepts no "
                                         f"presentation context for {sop_class}")
            return assoc
        if assoc.is_rejected:
            why = "association rejected"
        elif assoc.acceptor.primitive is None:
            why = "could not connect (refused, unreachable, or no answer to the association request)"
        else:
            why = "association aborted"
        raise ArchiveUnreachable(f"archive {a.name} ({a.ae_title}@{a.host}:{a.port}): {why}")

    def _find(self, query: Dataset) -> list[Dataset]:
        sop = StudyRootQueryRetrieveInformationModelFind
        assoc = self._associate(sop)
        found: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, sop):
                if not status or "Status" not in status:
                    raise ArchiveUnreachable(f"archive {self.archive.name}: no C-FIND response (timeout or abort)")
                code = int(status.Status)
                if code in _PENDING:
                    if identifier is not None:
                        found.append(identifier)
                elif code != 0x0000:
                    raise ArchiveUnreachable(f"archive {self.archive.name}: C-FIND failed with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    def study_counts(self, study_instance_uid: str) -> StudyCounts | None:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_instance_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.NumberOfSeriesRelatedInstances = ""
        rows = self._find(q)
        if not rows:
            return None
        series = []
        for r in rows:
            n = r.get("NumberOfSeriesRelatedInstances")
            if n in (None, ""):
                raise ArchiveUnreachable(f"archive {self.archive.name} does not return Number of Series Related "
                                         "Instances (0020,1209) in its C-FIND answers")
            series.append(SeriesCount(str(r.SeriesInstanceUID), str(r.get("Modality") or "") or None, int(n)))
        return StudyCounts(study_instance_uid, tuple(sorted(series, key=lambda s: s.series_instance_uid)))

    def find_accession(self, accession: str) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.AccessionNumber = accession
        q.StudyInstanceUID = ""
        return sorted({str(r.StudyInstanceUID) for r in self._find(q) if r.get("StudyInstanceUID")})

    def move_study(self, study_instance_uid: str, destination_ae: str, *,
                   progress: ProgressHook | None = None) -> MoveProgress:
        """C-MOVE the whole study to ``destination_ae`` (our SCP); the final counts. A final status
        other than success or 0xB000 (some sub-operations failed) raises, naming it (0xA801: the archive
        does not know ``destination_ae``)."""
        sop = StudyRootQueryRetrieveInformationModelMove
        assoc = self._associate(sop)
        return self._retrieve(assoc, "C-MOVE", lambda q: assoc.send_c_move(q, destination_ae, sop),
                              study_instance_uid, destination_ae, progress)

    def get_study(self, study_instance_uid: str, storage: Sequence[str], on_store: StoreHook, *,
                  progress: ProgressHook | None = None) -> MoveProgress:
        """C-GET the whole study on one association, proposing ``storage`` SOP classes in the SCP role; each
        instance goes to ``on_store``, whose status is the archive's answer. No route back to us needed."""
        sop = StudyRootQueryRetrieveInformationModelGet
        assoc = self._associate(sop, storage=storage, on_store=on_store)
        return self._retrieve(assoc, "C-GET", lambda q: assoc.send_c_get(q, sop), study_instance_uid, None, progress)

    def _retrieve(self, assoc: Association, what: str, send: Callable[[Dataset], Iterator[tuple[Dataset, Any]]],
                  study_instance_uid: str, destination_ae: str | None, progress: ProgressHook | None) -> MoveProgress:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_instance_uid
        last = MoveProgress(0, 0, 0, None)
        try:
            for status, _identifier in send(q):
                if not status or "Status" not in status:
                    raise ArchiveUnreachable(f"archive {self.archive.name}: no {what} response (timeout or abort)")
                code = int(status.Status)
                last = MoveProgress(int(status.get("NumberOfCompletedSuboperations") or 0),
                                    int(status.get("NumberOfFailedSuboperations") or 0),
                                    int(status.get("NumberOfWarningSuboperations") or 0),
                                    None if code not in _PENDING else
                                    int(status.get("NumberOfRemainingSuboperations") or 0))
                if progress is not None:
                    progress(last)
                if code in _PENDING:
                    continue
                if code == 0xA801:
                    raise ArchiveUnreachable(f"archive {self.archive.name} does not know the move destination "
                                             f"{destination_ae!r} (0xA801): add it to the archive's DICOM peers")
                if code not in (0x0000, 0xB000):
                    raise ArchiveUnreachable(f"archive {self.archive.name}: {what} failed with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return last


class DicomwebArchive(ArchiveClient):
    """An archive spoken to by DICOMweb: QIDO-RS and WADO-RS."""

    def __init__(self, archive: Archive, *, timeout_s: float, credentials: Path | None = None) -> None:
        super().__init__(archive, timeout_s=timeout_s)
        self.credentials = credentials

    def _client(self) -> Any:
        from dicomweb_client import DICOMwebClient

        from .dicomweb import session

        cred = read_credentials(self.credentials) if self.credentials is not None else None
        if isinstance(cred, tuple):
            http = session(username=cred[0], password=cred[1])
        else:
            http = session(token=cred)
        assert self.archive.url is not None
        return DICOMwebClient(self.archive.url, session=http, timeout=self.timeout_s)

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(self._client())
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise ArchiveUnreachable(f"archive {self.archive.name}: {what} answered HTTP {code}") from exc
        except requests.RequestException as exc:
            raise ArchiveUnreachable(f"archive {self.archive.name}: {what} failed "
                                     f"({type(exc).__name__})") from exc

    def study_counts(self, study_instance_uid: str) -> StudyCounts | None:
        rows = self._call("QIDO-RS", lambda c: c.search_for_series(
            study_instance_uid=study_instance_uid, fields=["00201209", "00080060"]))
        if not rows:
            return None
        series = []
        for r in rows:
            uid = _qido_value(r, "0020000E")
            n = _qido_value(r, "00201209")
            if uid is None or n is None:
                raise ArchiveUnreachable(f"archive {self.archive.name}: QIDO-RS answers lack Series Instance UID or "
                                         "Number of Series Related Instances (0020,1209)")
            series.append(SeriesCount(str(uid), _qido_value(r, "00080060"), int(n)))
        return StudyCounts(study_instance_uid, tuple(sorted(series, key=lambda s: s.series_instance_uid)))

    def find_accession(self, accession: str) -> list[str]:
        rows = self._call("QIDO-RS", lambda c: c.search_for_studies(search_filters={"AccessionNumber": accession}))
        return sorted({str(v) for v in (_qido_value(r, "0020000D") for r in rows) if v})

    def iter_study(self, study_instance_uid: str) -> Iterator[Dataset]:
        """The study's instances by WADO-RS, one at a time (as the archive streams them)."""
        client = self._call("WADO-RS", lambda c: c)
        try:
            yield from client.iter_study(study_instance_uid)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise ArchiveUnreachable(f"archive {self.archive.name}: WADO-RS answered HTTP {code}") from exc
        except requests.RequestException as exc:
            raise ArchiveUnreachable(f"archive {self.archive.name}: WADO-RS failed ({type(exc).__name__})") from exc


def _qido_value(row: dict[str, Any], tag: str) -> Any:
    value = (row.get(tag) or {}).get("Value")
    return value[0] if value else None


def open_archive(archive: Archive, *, timeout_s: float, ae_title: str,
                 credentials: Path | None = None) -> DimseArchive | DicomwebArchive:
    """The client for ``archive`` (no I/O here: each query connects)."""
    if archive.kind == "dicomweb":
        return DicomwebArchive(archive, timeout_s=timeout_s, credentials=credentials)
    return DimseArchive(archive, timeout_s=timeout_s, ae_title=ae_title)
