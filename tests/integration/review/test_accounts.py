"""Accounts of the review app on a real ledger (SQLite and PostgreSQL): ``specgate users ...``, argon2
hashes, the per-account slow-down of failed logins, sessions that end on logout, password change, disable
and idleness, and the refusal to listen beyond loopback without an admin."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from ledger.db import session_scope
from ledger.schema import AuditEvent, ReviewSession, User, utcnow
from review import auth
from specgate.cli import main
from tests.integration.review.helpers import PASSWORD, make_user


def _users(settings, *args: str, password: str | None = None, expect: int = 0):
    env = {"SPECGATE_DATA_DIR": str(settings.data_dir), "SPECGATE_DATABASE_URL": settings.db_url}
    result = CliRunner().invoke(main, ["users", *args], env=env, input=None if password is None else password + "\n")
    assert result.exit_code == expect, result.output
    return result.output


def _actions(sessions, action: str) -> list[AuditEvent]:
    with session_scope(sessions) as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)).scalars())


def test_users_cli_adds_lists_changes_and_disables(migrated) -> None:
    settings, _, sessions = migrated
    assert "account anna added (radiologist)" in _users(settings, "add", "anna", "--role", "radiologist",
                                                        password=PASSWORD)
    _users(settings, "add", "root-admin", "--role", "admin", "--display-name", "IT on call", password=PASSWORD + "!")
    with session_scope(sessions) as s:
        anna = s.execute(select(User).where(User.username == "anna")).scalar_one()
        assert anna.password_hash is not None and anna.password_hash.startswith("$argon2id$")
        assert PASSWORD not in anna.password_hash
    listing = _users(settings, "list")
    assert "anna" in listing and "radiologist" in listing and "root-admin" in listing
    # refused: short password, duplicate name, bad name; nothing added
    assert "at least 12 characters" in _users(settings, "add", "bob", "--role", "radiologist", password="short",
                                              expect=1)
    assert "exists already" in _users(settings, "add", "anna", "--role", "admin", password=PASSWORD, expect=1)
    assert "account names" in _users(settings, "add", "a b<", "--role", "admin", password=PASSWORD, expect=1)
    with session_scope(sessions) as s:
        assert sorted(s.execute(select(User.username)).scalars()) == ["anna", "root-admin"]
    _users(settings, "passwd", "anna", password="a brand new passphrase")
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused):
            auth.authenticate(s, "anna", PASSWORD, limit=5)
        assert auth.authenticate(s, "anna", "a brand new passphrase", limit=5).username == "anna"
    _users(settings, "disable", "anna")
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused):
            auth.authenticate(s, "anna", "a brand new passphrase", limit=5)
    assert "no account named 'ghost'" in _users(settings, "disable", "ghost", expect=1)
    actions = [e.action for e in _actions(sessions, "user.added") + _actions(sessions, "user.password_changed")
               + _actions(sessions, "user.disabled")]
    assert actions == ["user.added", "user.added", "user.password_changed", "user.disabled"]


def test_failed_logins_are_audited_and_slow_the_account_down(migrated) -> None:
    _, _, sessions = migrated
    make_user(sessions, "anna", "radiologist")
    t0 = utcnow()
    for i in range(3):
        with session_scope(sessions) as s:
            with pytest.raises(auth.LoginRefused) as refused:
                auth.authenticate(s, "anna", f"wrong guess {i}", limit=3, remote_addr="10.0.0.9", now=t0)
            assert refused.value.retry_after_s is None
    failed = _actions(sessions, "auth.login_failed")
    assert [e.details["reason"] for e in failed] == ["bad_password"] * 3
    assert failed[0].details["remote_addr"] == "10.0.0.9" and failed[0].actor == "user:anna"
    # the limit is reached: even the right password waits 2 ** (3 - 3) = 1 s after the last failure
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused) as refused:
            auth.authenticate(s, "anna", PASSWORD, limit=3, now=t0 + timedelta(seconds=0.5))
    assert refused.value.retry_after_s == pytest.approx(0.5)
    assert len(_actions(sessions, "auth.login_throttled")) == 1
    # one more failure after the wait doubles it: 2 s
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused):
            auth.authenticate(s, "anna", "wrong again", limit=3, now=t0 + timedelta(seconds=1.5))
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused) as refused:
            auth.authenticate(s, "anna", PASSWORD, limit=3, now=t0 + timedelta(seconds=3))
    assert refused.value.retry_after_s == pytest.approx(0.5)
    with session_scope(sessions) as s:
        assert auth.authenticate(s, "anna", PASSWORD, limit=3, now=t0 + timedelta(seconds=3.6)).username == "anna"
    with session_scope(sessions) as s:
        assert s.execute(select(User.failed_logins).where(User.username == "anna")).scalar_one() == 0
    # an unknown account is audited too, and slows nobody down
    with session_scope(sessions) as s:
        with pytest.raises(auth.LoginRefused):
            auth.authenticate(s, "nobody", PASSWORD, limit=3)
    assert _actions(sessions, "auth.login_failed")[-1].details["reason"] == "unknown_user"


def test_sessions_end_on_logout_password_change_disable_and_idleness(migrated) -> None:
    _, _, sessions = migrated
    make_user(sessions, "anna", "radiologist")
    make_user(sessions, "root", "admin")

    def login(name: str) -> str:
        with session_scope(sessions) as s:
            user = auth.authenticate(s, name, PASSWORD, limit=5)
            return auth.open_session(s, user, lifetime_s=3600)

    def read(token: str, **kw):
        with session_scope(sessions) as s:
            return auth.read_session(s, token, idle_s=600, **kw)

    a1, a2, r1 = login("anna"), login("anna"), login("root")
    info = read(a1)
    assert info is not None and info.username == "anna" and not info.is_admin and len(info.csrf_token) >= 32
    assert read(r1).is_admin
    assert read("not-a-token") is None
    with session_scope(sessions) as s:  # only the token's hash is stored
        assert s.execute(select(ReviewSession).where(ReviewSession.token_sha256 == a1)).first() is None
    assert read(a1, now=utcnow() + timedelta(seconds=601)) is None  # idle too long
    assert read(a1, now=utcnow() + timedelta(seconds=3601)) is None  # past its lifetime
    with session_scope(sessions) as s:
        auth.revoke_session(s, info)
    assert read(a1) is None and read(a2) is not None
    with session_scope(sessions) as s:
        auth.set_password(s, "anna", "another long passphrase", actor="test")
    assert read(a2) is None and read(r1) is not None
    with session_scope(sessions) as s:
        auth.disable_user(s, "root", actor="test")
    assert read(r1) is None


def test_the_app_refuses_to_listen_beyond_loopback_without_an_admin(migrated) -> None:
    settings, _, sessions = migrated
    env = {"SPECGATE_DATA_DIR": str(settings.data_dir), "SPECGATE_DATABASE_URL": settings.db_url}
    result = CliRunner().invoke(main, ["review", "--host", "0.0.0.0", "--port", "1"], env=env)
    assert result.exit_code == 1
    assert "refusing to listen on 0.0.0.0" in result.output and "no active admin" in result.output
    make_user(sessions, "root", "admin")
    with session_scope(sessions) as s:
        s.add(User(username="legacy", role="radiologist", password_hash=None))
    with session_scope(sessions) as s:
        problems = auth.startup_problems(s)
    assert problems == ["accounts without a password: legacy (specgate users passwd NAME)"]
    result = CliRunner().invoke(main, ["review", "--host", "0.0.0.0", "--port", "1"], env=env)
    assert result.exit_code == 1 and "accounts without a password: legacy" in result.output
