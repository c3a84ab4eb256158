"""What the DICOM node is configured with: its own small frozen records, built by the composition root
(``specgate.settings``) and passed down. Nothing here reads the environment or a file.

The records that come from a list setting (allowed callers, destinations, series rules) are parsed and
validated here, where they are used::

    >>> AllowedCaller.parse("CT01@10.0.0.7").matches("CT01", "10.0.0.7")
    True
    >>> Destination.parse("pacs=ORTHANC@pacs.local:4242").port
    4242
    >>> validate_ae_title("  CT01 ")
    'CT01'
    >>> validate_ae_title("A_VERY_LONG_AE_TITLE")
    Traceback (most recent call last):
    ...
    ValueError: AE title 'A_VERY_LONG_AE_TITLE' is longer than 16 characters
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from store import Store, StoreConfig, open_store

__all__ = ["MOVED_TO_MODEL", "AllowedCaller", "Archive", "AssemblyConfig", "CompletenessConfig", "Destination",
           "NodeConfig", "ReceiveLimits", "SeriesRule", "StowConfig", "StowToken", "TLSConfig", "validate_ae_title",
           "validate_host"]

_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9.\-]*|\[?[0-9A-Fa-f:]+\]?)$")


def validate_ae_title(value: str, *, what: str = "AE title") -> str:
    """Return ``value`` if it is a valid DICOM AE title (PS3.5 AE VR), else raise ``ValueError``.

    1 to 16 characters of the default repertoire, no backslash or control characters, not only spaces.
    Leading/trailing spaces are not significant and are stripped.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError(f"{what} {value!r} is empty")
    if len(stripped) > 16:
        raise ValueError(f"{what} {value!r} is longer than 16 characters")
    if _AE_FORBIDDEN.search(stripped) or not stripped.isascii():
        raise ValueError(f"{what} {value!r} contains a backslash, a control or a non-ASCII character")
    return stripped


def validate_host(host: str, *, allow_wildcard: bool) -> str:
    """A host name or IP address (brackets of an IPv6 literal removed); ``*`` only where allowed."""
    host = host.strip()
    if not host or not _HOST_RE.match(host) or (host == "*" and not allow_wildcard):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    return host.strip("[]")


class AllowedCaller(BaseModel):
    """One entry of ``SPECGATE_ALLOWED_CALLERS``: ``AE_TITLE@HOST`` where HOST may be ``*``."""

    model_config = ConfigDict(frozen=True)
    ae_title: str
    host: str

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        if text.count("@") != 1:
            raise ValueError(f"allowed caller {text!r} is not of the form AE_TITLE@HOST")
        ae, host = text.rsplit("@", 1)
        return cls(ae_title=validate_ae_title(ae, what="allowed caller AE title"),
                   host=validate_host(host, allow_wildcard=True))

    def matches(self, ae_title: str, host: str) -> bool:
        return ae_title.strip() == self.ae_title and (self.host == "*" or self.host == host)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}"


class Destination(BaseModel):
    """One place results go (``SPECGATE_DESTINATIONS``): a DICOM peer by C-STORE (``kind="dimse"``,
    optionally over TLS) or a DICOMweb server by STOW-RS (``kind="dicomweb"``).

    As a string (the environment, or a TOML list of strings): ``NAME=AE_TITLE@HOST:PORT`` or
    ``NAME=https://host[:port]/path`` (``http://`` too), each optionally followed by ``?key=value&...``
    naming the options below; as a TOML table (``[[destinations]]``) the same keys. Option values are
    checked here; that the files exist and the environment variables are set is checked by
    :class:`specgate.settings.Settings` at start-up (nothing here reads a file or the environment)::

        >>> Destination.parse("pacs=ORTHANC@pacs.local:4242").port
        4242
        >>> d = Destination.parse("pacs=PACS@10.0.0.5:2762?tls_ca=/etc/specgate/ca.pem")
        >>> d.tls, str(d.tls_ca)
        (True, '/etc/specgate/ca.pem')
        >>> w = Destination.parse("archive=https://pacs.example.org/dicom-web?token_file=/run/secrets/token")
        >>> w.kind, w.host, w.port
        ('dicomweb', 'pacs.example.org', 443)
        >>> try:
        ...     Destination.parse("pacs=PACS@10.0.0.5:104?tls_cert=/c.pem")
        ... except ValueError as exc:
        ...     print(exc.errors()[0]["msg"])
        Value error, destination 'pacs': tls_cert and tls_key must be set together, and need tls_ca (the CA that signs the peer's certificate)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = ""  # dimse: the peer's AE title (the called AE)
    host: str = ""  # dimse: given; dicomweb: the URL's host
    port: int = Field(default=0, ge=0, le=65535)  # dimse: given; dicomweb: the URL's port
    url: str | None = None  # dicomweb: the base URL (STOW-RS posts to <url>/studies)
    # TLS (dimse: on when tls_ca is set; dicomweb: https, tls_ca replaces the system's CAs)
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # our client certificate, for mutual TLS
    tls_key: Path | None = None
    tls_verify_hostname: bool = True  # the peer's certificate must name the host we connect to
    # DICOMweb credentials: a bearer token, or basic credentials; each read from a file or an environment
    # variable (never written in the settings, the ledger or a log)
    token_file: Path | None = None
    token_env: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    # the values of token_env / password_env, filled in by Settings when it reads the environment
    token: SecretStr | None = Field(default=None, exclude=True, repr=False)
    password: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*=\s*([^?]+?)\s*(?:\?(.*))?", text)
        if not m:
            raise ValueError(f"destination {text!r} is not of the form NAME=AE_TITLE@HOST:PORT or NAME=https://HOST/PATH")
        name, target, query = m.groups()
        options: dict[str, Any] = {}
        for part in (query or "").split("&"):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"destination {name!r}: option {part!r} is not KEY=VALUE")
            options[key.strip()] = value.strip()
        unknown = sorted(set(options) - _STRING_OPTIONS)
        if unknown:
            raise ValueError(f"destination {name!r}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(_STRING_OPTIONS))})")
        if re.match(r"(?i)https?://", target):
            return cls(name=name, kind="dicomweb", url=target, **options)
        d = re.fullmatch(r"([^@]+)@(.+):(\d+)", target)
        if not d:
            raise ValueError(f"destination {text!r} is not of the form NAME=AE_TITLE@HOST:PORT or NAME=https://HOST/PATH")
        ae, host, port = d.groups()
        return cls(name=name, ae_title=ae, host=host, port=int(port), **options)

    @model_validator(mode="before")
    @classmethod
    def _dicomweb_from_url(cls, data: Any) -> Any:
        """A table with a ``url`` and no kind is a DICOMweb destination; its host and port come from it."""
        if isinstance(data, dict) and data.get("url") and data.get("kind", "dicomweb") == "dicomweb":
            url = urlsplit(str(data["url"]).strip())
            if url.scheme.lower() not in ("http", "https") or not url.hostname:
                raise ValueError(f"destination {data.get('name')!r}: url {data['url']!r} is not an http(s) URL")
            try:
                port = url.port or (443 if url.scheme.lower() == "https" else 80)
            except ValueError as exc:
                raise ValueError(f"destination {data.get('name')!r}: url {data['url']!r}: {exc}") from None
            if url.query or url.fragment or url.username or url.password:
                raise ValueError(f"destination {data.get('name')!r}: url {data['url']!r} must carry no query, "
                                 "fragment or credentials (give credentials as token_file/password_file)")
            data = {**data, "kind": "dicomweb", "url": str(data["url"]).strip().rstrip("/"), "host": url.hostname,
                    "port": port}
        elif isinstance(data, dict) and data.get("kind", "dimse") == "dimse":
            where = f"destination {data.get('name')!r}"
            data = {**data, "ae_title": validate_ae_title(data.get("ae_title", ""), what=f"{where} AE title"),
                    "host": validate_host(str(data.get("host", "")), allow_wildcard=False)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Destination:
        where = f"destination {self.name!r}"
        if self.kind == "dimse":
            if not 1 <= self.port <= 65535:
                raise ValueError(f"{where}: port {self.port} is not 1-65535")
            web_only = [k for k in _WEB_ONLY if getattr(self, k) is not None]
            if web_only:
                raise ValueError(f"{where}: {', '.join(web_only)} belong to a DICOMweb destination (NAME=https://...)")
        else:
            if self.url is None:
                raise ValueError(f"{where}: a DICOMweb destination needs url")
            if self.ae_title:
                raise ValueError(f"{where}: a DICOMweb destination has no AE title")
            if (self.token_file or self.token_env) and (self.username or self.password_file or self.password_env):
                raise ValueError(f"{where}: a bearer token or basic credentials, not both")
            if self.token_file and self.token_env:
                raise ValueError(f"{where}: token_file or token_env, not both")
            if self.password_file and self.password_env:
                raise ValueError(f"{where}: password_file or password_env, not both")
            if bool(self.username) != bool(self.password_file or self.password_env):
                raise ValueError(f"{where}: basic credentials need username and password_file (or password_env)")
            if self.tls_ca is not None and not self.https:
                raise ValueError(f"{where}: tls_ca is set but the url is not https")
            if self.has_credentials and not self.https and self.host not in _LOOPBACK:
                raise ValueError(f"{where}: credentials over plain http would cross the network in clear; use https")
        if (self.tls_cert is None) != (self.tls_key is None) or (self.kind == "dimse" and self.tls_cert is not None
                                                                and self.tls_ca is None):
            raise ValueError(f"{where}: tls_cert and tls_key must be set together, and need tls_ca (the CA that "
                             "signs the peer's certificate)")
        return self

    @property
    def tls(self) -> bool:
        """True: the connection is TLS (a dimse destination with ``tls_ca``, or an https URL)."""
        return self.tls_ca is not None if self.kind == "dimse" else self.https

    @property
    def https(self) -> bool:
        return self.url is not None and self.url.lower().startswith("https://")

    @property
    def has_credentials(self) -> bool:
        return any(x is not None for x in (self.token_file, self.token_env, self.username))

    def files(self) -> list[tuple[str, Path]]:
        """The files this destination names, by option (for the start-up check that they exist)."""
        return [(k, p) for k in ("tls_ca", "tls_cert", "tls_key", "token_file", "password_file")
                if (p := getattr(self, k)) is not None]

    def describe(self) -> str:
        """Where it is, for people: ``AE@host:port`` (``, TLS``) or the URL."""
        if self.kind == "dicomweb":
            return f"STOW-RS {self.url}"
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")

    def __str__(self) -> str:
        """The string form (without secrets: only the names of the files and variables that hold them)."""
        target = self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"
        options = [f"{k}={v}" for k in sorted(_STRING_OPTIONS)
                   if (v := getattr(self, k)) is not None and not (k == "tls_verify_hostname" and v)]
        options = [o.replace("=False", "=false") for o in options]
        return f"{self.name}={target}" + ("?" + "&".join(options) if options else "")


_WEB_ONLY = ("url", "token_file", "token_env", "username", "password_file", "password_env")
_STRING_OPTIONS = frozenset({"tls_ca", "tls_cert", "tls_key", "tls_verify_hostname", *_WEB_ONLY} - {"url"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class Archive(BaseModel):
    """One entry of ``SPECGATE_ARCHIVES``: a query/retrieve peer, asked how much of a study it holds and
    pulled from on demand. DIMSE ``NAME=AE_TITLE@HOST:PORT`` (C-FIND, C-MOVE) or DICOMweb
    ``NAME=http(s)://HOST[:PORT]/PATH`` (QIDO-RS, WADO-RS)::

        >>> Archive.parse("pacs=ORTHANC@pacs.local:4242").kind
        'dimse'
        >>> Archive.parse("web=https://pacs.local/dicom-web").url
        'https://pacs.local/dicom-web'
        >>> Archive.parse("pacs=pacs.local:4242")
        Traceback (most recent call last):
        ...
        ValueError: archive 'pacs=pacs.local:4242' is not of the form NAME=AE_TITLE@HOST:PORT or NAME=https://HOST/PATH
    """

    model_config = ConfigDict(frozen=True)
    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None

    @property
    def kind(self) -> str:
        return "dicomweb" if self.url is not None else "dimse"

    @classmethod
    def parse(cls, text: str) -> Archive:
        web = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*=\s*(https?://[^\s,]+?)/?\s*", text)
        if web:
            return cls(name=web.group(1), url=web.group(2))
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*=\s*([^@]+)@(.+):(\d+)\s*", text)
        if not m:
            raise ValueError(f"archive {text!r} is not of the form NAME=AE_TITLE@HOST:PORT or NAME=https://HOST/PATH")
        name, ae, host, port = m.groups()
        return cls(name=name, ae_title=validate_ae_title(ae, what="archive AE title"),
                   host=validate_host(host, allow_wildcard=False), port=int(port))

    def __str__(self) -> str:
        return f"{self.name}={self.url}" if self.url is not None else f"{self.name}={self.ae_title}@{self.host}:{self.port}"


class StowToken(BaseModel):
    """One entry of ``SPECGATE_STOW_TOKENS``: ``NAME:SHA256``, a caller allowed to store by STOW-RS and the
    SHA-256 (hex) of its bearer token. Only the hash is configured; NAME is what the ledger and the audit rows
    record for that caller, where C-STORE records the calling AE title, so it follows the AE title's rules.

        >>> StowToken.parse("RIS01:" + "ab" * 32).name
        'RIS01'
        >>> StowToken.parse("RIS01:secret")
        Traceback (most recent call last):
        ...
        ValueError: STOW-RS token 'RIS01:...' is not of the form NAME:SHA256 (64 hex digits of the token's SHA-256)
    """

    model_config = ConfigDict(frozen=True)
    name: str
    sha256: str = Field(repr=False)

    @classmethod
    def parse(cls, text: str) -> StowToken:
        name, _, digest = text.strip().partition(":")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ValueError(f"STOW-RS token {name + ':...'!r} is not of the form NAME:SHA256 (64 hex digits of "
                             "the token's SHA-256)")
        return cls(name=validate_ae_title(name, what="STOW-RS caller name"), sha256=digest.lower())

    def __str__(self) -> str:
        return f"{self.name}:{self.sha256}"


# What a rule once said about the SEG's segment, and where each now is: what a model's output is belongs to
# the model, a rule only chooses which series go to which model (and which of its labels are sent).
MOVED_TO_MODEL = ("segment_label", "segment_description", "category_code", "type_code", "display_color")


class SeriesRule(BaseModel):
    """Which series are segmented, by which model, and which of its labels the SEG carries (TOML
    ``[[rules]]`` tables).

    Every condition that is set must match; unset conditions match anything. What the SEG's segments say
    they are (label, description, codes, colour) is the model's (``worker.config.ModelSpec``), not the
    rule's; a rule that still sets it is refused, naming where it moved::

        >>> try:
        ...     SeriesRule(name="abdomen", model="liver", segment_label="Liver")
        ... except ValueError as exc:
        ...     print(exc.errors()[0]["msg"])  # doctest: +ELLIPSIS
        Value error, rule 'abdomen' sets segment_label, which a rule no longer carries: ... [models.liver]; ...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    calling_ae: str | None = None
    modalities: tuple[str, ...] = ("CT", "MR")
    body_part: str | None = Field(default=None, description="regex, matched case-insensitively")
    series_description: str | None = Field(default=None, description="regex, matched case-insensitively")
    min_slices: int = Field(default=16, ge=1)
    model: str = "default"
    # A job whose source archive still held more of the study than arrived when the wait ran out
    # (``incomplete_at_source``, dicom_node.completeness): "run" releases it as the gate decides, "hold"
    # holds it for a radiologist whatever the gate says.
    when_incomplete: Literal["run", "hold"] = "run"
    # Which of the model's labels the SEG carries: names (any case; "_", "-" or spaces alike) or label
    # values; None sends every label. Checked against the model's labels at start-up
    # (worker.segments.validate_rule_labels).
    labels: tuple[str | int, ...] | None = None
    # A series with any lossy compressed instance (Lossy Image Compression "01", or received in a lossy
    # transfer syntax) is not segmented: its job ends failed with reason lossy_source_refused.
    refuse_lossy: bool = False
    # Silent mode (ledger.shadow): the rule runs beside the live rules (it does not compete for the first
    # match) and its jobs are shadow jobs: stored and scored, never sent. A rule whose model is registered
    # as shadow (``specgate model shadow NAME``) is one too, until the model is promoted.
    shadow: bool = False

    @model_validator(mode="before")
    @classmethod
    def _moved_to_model(cls, data: Any) -> Any:
        """A rule from before the split, that still describes the segment: refused (never ignored), saying
        where each key now is (a settings model's ``[models.NAME]`` table, or a registered model's codes)."""
        if not isinstance(data, dict):
            return data
        moved = [key for key in MOVED_TO_MODEL if key in data]
        if moved:
            name, model = data.get("name", "?"), data.get("model", "default")
            them = "it" if len(moved) == 1 else "them"
            if model == "default":
                where = (f"the rule selects the default model (model_weights, or the shipped one): set {them} in "
                         f"its table [models.default]; a model registered in the ledger is described by its label "
                         f"names and the codes of 'specgate model register NAME ... --codes FILE'")
            else:
                where = (f"the rule selects model {model!r}: if it is a model of the settings, set {them} in its "
                         f"table [models.{model}]; if it is registered in the ledger, its segments are named by "
                         f"its labels and coded with 'specgate model register {model} ... --codes FILE' (label "
                         f"name -> SNOMED CT code)")
            raise ValueError(f"rule {name!r} sets {', '.join(moved)}, which a rule no longer carries: what the "
                             f"SEG says a model's segment is belongs to the model; {where}")
        return data

    @field_validator("body_part", "series_description")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"regex {v!r} does not compile: {exc}") from exc
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        """Names or values, at least one: ``labels = ["liver", "kidney_left", 7]``.

        >>> SeriesRule(name="abdomen", labels=["liver", 3]).labels
        ('liver', 3)
        >>> try:
        ...     SeriesRule(name="abdomen", labels=[0])
        ... except ValueError as exc:
        ...     print(exc.errors()[0]["msg"])
        Value error, labels must be label names or values >= 1, got 0 in [0]
        """
        if v is None:
            return v
        if isinstance(v, str | int):
            v = [v]
        items = list(v)
        if not items:
            raise ValueError("labels must name at least one label (leave it out to send every label)")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, str | int) or (isinstance(item, int) and item < 1) \
                    or (isinstance(item, str) and not item.strip()):
                raise ValueError(f"labels must be label names or values >= 1, got {item!r} in {items!r}")
        return tuple(items)

    @field_validator("modalities", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return tuple(str(m).upper() for m in v)


@dataclass(frozen=True)
class TLSConfig:
    """The SCP's TLS: its certificate and key; a CA to verify callers' certificates against, and
    whether a caller must present one."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class ReceiveLimits:
    """What one peer may make the SCP read, hold or store; every bound is a byte count or a depth, checked
    as the bytes arrive (before anything of that size is allocated or written). CONFORMANCE.md says what
    each refusal is answered with.

    ``command_bytes``: a DIMSE command set (a few hundred bytes in practice), held whole in memory.
    ``element_bytes``: the value length any one data element of a data set may declare, pixel data
    excepted (whose bound is the instance's).
    ``instance_bytes``: one data set as it arrives; also the most any element, pixel data included, may
    declare (less what came before it).
    ``association_bytes``: everything one association carries (commands and data sets).
    ``sequence_depth``: sequences nested inside one another.
    ``inflated_bytes``: what a deflated data set may inflate to.
    """

    command_bytes: int = 1 << 16
    element_bytes: int = 64 << 20
    instance_bytes: int = 2 << 30
    association_bytes: int = 64 << 30
    sequence_depth: int = 32
    inflated_bytes: int = 256 << 20


@dataclass(frozen=True)
class NodeConfig:
    """The receiving side: who we are, who may call, how long we wait, where files go, how much a peer
    may send (``limits``, and ``max_pdu``: the PDU length we announce and hold peers to), and whether the
    deflated transfer syntax is negotiated at all."""

    spool_dir: Path
    ae_title: str = "SPECGATE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[AllowedCaller, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 10
    processes: int = 0  # receiver processes behind the port; 0: two per CPU core
    acse_timeout: float = 30.0  # TLS handshake and A-ASSOCIATE-RQ after a connection opens
    network_timeout: float = 60.0  # silence inside an established association
    dimse_timeout: float = 60.0  # how long a peer may take to answer us
    max_pdu: int = 1048576  # the longest PDU we read (announced in the A-ASSOCIATE-AC)
    spool_watermark_percent: float = 95.0  # refuse C-STORE above this disk usage
    tls: TLSConfig | None = None
    limits: ReceiveLimits = field(default_factory=ReceiveLimits)
    accept_deflated: bool = False  # negotiate Deflated Explicit VR Little Endian
    data_dir: Path | None = None  # the ledger's spool paths are relative to it (ledger.paths)
    store: StoreConfig | None = None  # where instances go after the spool (None: fs, they stay there)

    @property
    def files(self) -> Store:
        return open_store(self.store, self.data_dir)

    @property
    def temp_max_age_s(self) -> float:
        """A partial file older than this cannot belong to a live association (twice the longest an
        association may stay silent, in the middle of a data set or waiting for us)."""
        return 2 * (self.network_timeout + self.dimse_timeout)


@dataclass(frozen=True)
class CompletenessConfig:
    """Asking a study's source archive how much of it there is (:mod:`dicom_node.completeness`):
    ``by_source`` maps a sender's calling AE title to the archive asked; ``wait_s`` bounds the extra wait
    after the quiet period; ``timeout_s`` bounds one query; ``credentials``: a DICOMweb archive's
    credential file, by archive name (read when the query is made, never logged)."""

    archives: tuple[Archive, ...] = ()
    by_source: tuple[tuple[str, str], ...] = ()
    wait_s: float = 300.0
    timeout_s: float = 10.0
    ae_title: str = "SPECGATE"
    credentials: tuple[tuple[str, Path], ...] = ()

    def archive_for(self, calling_ae: str) -> Archive | None:
        name = dict(self.by_source).get(calling_ae.strip())
        return None if name is None else next(a for a in self.archives if a.name == name)

    def credentials_of(self, archive: Archive) -> Path | None:
        return dict(self.credentials).get(archive.name)


@dataclass(frozen=True)
class StowConfig:
    """The STOW-RS endpoint (:mod:`dicom_node.stow`): where it listens, its TLS (always on; ``tls.ca``
    verifies client certificates, which authenticate a caller by their subject's common name when it is one
    of ``certificate_callers``), and the callers allowed by bearer token. The bounds are the node's :class:`ReceiveLimits`; as for associations,
    ``max_connections`` are served at once (more: 503) and a body silent for ``idle_timeout_s`` ends its
    request (408)."""

    tls: TLSConfig
    host: str = "127.0.0.1"
    port: int = 0
    tokens: tuple[StowToken, ...] = ()
    certificate_callers: tuple[str, ...] = ()
    max_connections: int = 10
    idle_timeout_s: float = 60.0


@dataclass(frozen=True)
class AssemblyConfig:
    """Turning quiet studies into jobs: the quiet period, the series rules, attempts a job gets, and
    whether to ask the source's archive first (``completeness``)."""

    quiet_seconds: float = 60.0
    rules: tuple[SeriesRule, ...] = ()
    job_max_attempts: int = 3
    temp_max_age_s: float = 240.0  # a partial spool file older than this belongs to no live association
    completeness: CompletenessConfig = field(default_factory=CompletenessConfig)
