"""A small PKI for TLS tests, made with ``openssl`` in a temporary folder: a CA, a second CA nobody trusts,
a server certificate for 127.0.0.1/localhost, a client certificate, and a "rogue" one from the other CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki"]


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    @property
    def rogue_ca(self) -> Path:
        return self.ca.parent / "rogue-ca.pem"

    @property
    def rogue_server_cert(self) -> Path:
        """A server certificate for 127.0.0.1 from the CA nobody trusts (its key: :attr:`rogue_server_key`)."""
        return self.ca.parent / "rogue-server.pem"

    @property
    def rogue_server_key(self) -> Path:
        return self.ca.parent / "rogue-server.key"

    @property
    def other_host_cert(self) -> Path:
        """A server certificate from the trusted CA for another host name only (``pacs.example.org``)."""
        return self.ca.parent / "other-host.pem"

    @property
    def other_host_key(self) -> Path:
        return self.ca.parent / "other-host.key"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", str(ext), cwd=d)


def make_pki(d: Path, *, servers: bool = False) -> Pki:
    """The certificates in folder ``d``; ``servers`` also makes :attr:`Pki.rogue_server_cert` and
    :attr:`Pki.other_host_cert`."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "ca")
    _leaf(d, "rogue", "rogue-ca")
    if servers:
        _leaf(d, "rogue-server", "rogue-ca", san="IP:127.0.0.1,DNS:localhost")
        _leaf(d, "other-host", "ca", san="DNS:pacs.example.org")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")
