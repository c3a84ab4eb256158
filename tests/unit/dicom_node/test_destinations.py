"""Destinations: the string form (old ``NAME=AE@HOST:PORT`` still valid, ``?options``, DICOMweb URLs), the TOML
table form, what is refused and why, credentials from the environment kept out of every dump; how a
STOW-RS response is mapped to an attempt's outcome."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest
from pydicom import Dataset

from dicom_node.config import Destination
from dicom_node.dicomweb import classify, session, session_for
from specgate.settings import Settings, SettingsError


def test_string_forms_round_trip() -> None:
    for text in ["pacs=ORTHANC@pacs.local:4242",
                 "pacs=PACS@10.0.0.5:2762?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/c.key&tls_verify_hostname=false",
                 "web=https://pacs.example.org:8443/dicom-web?token_file=/run/secrets/token",
                 "web=http://127.0.0.1:8042/dicom-web?password_env=PW&username=specgate"]:
        d = Destination.parse(text)
        assert str(d) == text and Destination.parse(str(d)) == d
    old = Destination.parse(" pacs = ORTHANC@pacs.local:4242 ")
    assert (old.kind, old.ae_title, old.host, old.port, old.tls) == ("dimse", "ORTHANC", "pacs.local", 4242, False)
    web = Destination.parse("web=https://pacs.example.org/dicom-web/")
    assert (web.kind, web.url, web.host, web.port, web.tls, web.ae_title) == \
        ("dicomweb", "https://pacs.example.org/dicom-web", "pacs.example.org", 443, True, "")


@pytest.mark.parametrize(("text", "message"), [
    ("pacs=PACS@h:104?tls_cert=/c.pem&tls_key=/k.pem", "need tls_ca"),
    ("pacs=PACS@h:104?tls_ca=/ca.pem&tls_key=/k.pem", "tls_cert and tls_key must be set together"),
    ("pacs=PACS@h:104?token_file=/t", "token_file belong to a DICOMweb destination"),
    ("pacs=PACS@h:104?colour=red", "unknown option(s) colour"),
    ("pacs=PACS@h:104?tls_ca", "option 'tls_ca' is not KEY=VALUE"),
    ("pacs=PACS@h:0", "port 0 is not 1-65535"),
    ("pacs=A_VERY_LONG_AE_TITLE@h:104", "longer than 16 characters"),
    ("web=http://pacs.example.org/dw?token_file=/t", "credentials over plain http would cross the network"),
    ("web=https://h/dw?token_file=/t&username=u&password_file=/p", "a bearer token or basic credentials"),
    ("web=https://h/dw?username=u", "basic credentials need username and password_file"),
    ("web=http://h/dw?tls_ca=/ca.pem", "tls_ca is set but the url is not https"),
    ("web=ftp://h/dw", "not of the form"),
    ("web=https://h:99999/dw", "Port out of range"),
])
def test_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="destination") as exc:
        Destination.parse(text)
    assert message in str(exc.value)


def test_toml_tables_and_strings_side_by_side(tmp_path: Path) -> None:
    ca = Path(certifi.where())  # a real CA bundle (its files are loaded at start-up)
    cfg = tmp_path / "specgate.toml"
    cfg.write_text(f'''
destinations = [
  "old=OLD@10.0.0.1:104",
  {{ name = "web", url = "https://pacs.example.org/dicom-web", tls_ca = "{ca}", token_env = "SG_TEST_TOKEN" }},
]
''')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SG_TEST_TOKEN", "tok-123")
        s = Settings.load(cfg)
    old, web = s.destinations
    assert (old.kind, old.port) == ("dimse", 104)
    assert (web.kind, web.tls_ca, web.token_env) == ("dicomweb", ca, "SG_TEST_TOKEN")
    assert web.token is not None and web.token.get_secret_value() == "tok-123"
    # the secret is nowhere it could be shown, dumped or passed on as text
    for shown in (repr(s), str(s.model_dump()), s.model_dump_json(), str(web), repr(web)):
        assert "tok-123" not in shown
    assert session_for(web).headers["Authorization"] == "Bearer tok-123"
    assert session_for(web).verify == str(ca)


def test_array_of_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "specgate.toml"
    cfg.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n\n'
                   '[[destinations]]\nname = "web"\nurl = "http://127.0.0.1:8042/dicom-web"\n')
    pacs, web = Settings.load(cfg).destinations
    assert str(pacs) == "pacs=PACS@10.0.0.5:104" and str(web) == "web=http://127.0.0.1:8042/dicom-web"
    cfg.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\ncolour = 1\n')
    with pytest.raises(SettingsError, match=r"SPECGATE_DESTINATIONS\[0\]\.colour: Extra inputs are not permitted"):
        Settings.load(cfg)


def test_credentials_must_be_there_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SG_TEST_TOKEN", raising=False)
    with pytest.raises(SettingsError, match=r"token_env names 'SG_TEST_TOKEN', which is not set"):
        Settings.load(destinations="web=https://h/dw?token_env=SG_TEST_TOKEN")
    with pytest.raises(SettingsError, match=r"password_file '/nonexistent/pw' is not a file"):
        Settings.load(destinations="web=https://h/dw?username=u&password_file=/nonexistent/pw")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(SettingsError, match=r"destination 'web': its TLS files do not load"):
        Settings.load(destinations=f"web=https://h/dw?tls_ca={empty}")
    pw = tmp_path / "pw"
    pw.write_text(" s3cret \n")
    s = Settings.load(destinations=f"web=https://h/dw?username=u&password_file={pw}")
    assert session_for(s.destinations[0]).auth == ("u", "s3cret")  # read when the session is built


def test_session_tls_and_hostname() -> None:
    s = session(ca=Path("/ca.pem"), cert=Path("/c.pem"), key=Path("/c.key"), verify_hostname=False)
    assert s.verify == "/ca.pem" and s.cert == ("/c.pem", "/c.key") and "Authorization" not in s.headers
    assert type(s.get_adapter("https://h/")).__name__ == "_Pinned"
    assert type(session().get_adapter("https://h/")).__name__ == "HTTPAdapter"


def _failed(*codes: int) -> Dataset:
    body = Dataset()
    items = []
    for n, code in enumerate(codes):
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"1.2.3.{n}"
        item.FailureReason = code
        items.append(item)
    body.FailedSOPSequence = items
    return body


def _referenced(*uids: str, warning: int | None = None) -> Dataset:
    body = Dataset()
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        if warning is not None:
            item.WarningReason = warning
        items.append(item)
    body.ReferencedSOPSequence = items
    return body


@pytest.mark.parametrize(("status", "body", "ok", "permanent", "error"), [
    (200, _referenced("1.2.3.0", "1.2.3.1"), True, False, None),
    (200, Dataset(), True, False, None),
    (200, _referenced("1.2.3.0"), False, True, "without referencing 1.2.3.1"),
    (202, _failed(0xC000), False, True, "STOW-RS failed (HTTP 202): 1.2.3.0: 0xC000 cannot understand"),
    (409, _failed(0x0122, 0xA900), False, True,
     "STOW-RS failed (HTTP 409): 1.2.3.0: 0x0122 SOP class not supported; 1.2.3.1: 0xA900 data set does not match"),
    (409, _failed(0xA700), False, False, "0xA700 out of resources"),
    (409, Dataset(), False, True, "HTTP 409) with no FailedSOPSequence"),
    (202, _referenced("1.2.3.0", "1.2.3.1", warning=0xB000), False, True, "0xB000 coercion of data elements"),
    (401, Dataset(), False, True, "authentication refused (HTTP 401)"),
    (403, Dataset(), False, True, "authentication refused (HTTP 403)"),
    (503, Dataset(), False, False, "unavailable (HTTP 503)"),
    (500, _failed(0x0110), False, False, "unavailable (HTTP 500): 1.2.3.0: 0x0110 processing failure"),
    (429, Dataset(), False, False, "unavailable (HTTP 429)"),
    (415, Dataset(), False, True, "STOW-RS refused (HTTP 415)"),
])
def test_stow_rs_responses(status: int, body: Dataset, ok: bool, permanent: bool, error: str | None) -> None:
    r = classify(status, body, ["1.2.3.0", "1.2.3.1"])
    assert (r.ok, r.status, r.status_text) == (ok, status, f"HTTP {status}")
    if not ok:
        assert r.permanent is permanent and error is not None and error in (r.error or "")


def test_an_empty_or_missing_credentials_file_fails_the_attempt_for_good(tmp_path: Path) -> None:
    from dicom_node.dicomweb import store
    from tests.peers import write_ct_series

    series = write_ct_series(tmp_path / "ct", slices=1, size=8)
    token = tmp_path / "token"
    token.write_text("\n")
    dest = Destination(name="web", url="https://127.0.0.1:9/dw", token_file=token)
    r = store(series.paths, dest)
    assert (r.ok, r.permanent, r.error) == (False, True, f"cannot read the destination's credentials: ValueError: "
                                                         f"{token} is empty")
    token.unlink()  # removed since start-up
    r = store(series.paths, dest)
    assert r.permanent and r.error == "cannot read the destination's credentials: FileNotFoundError: " \
                                      "No such file or directory"
