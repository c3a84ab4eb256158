"""Accounts, logins and sessions of the review app.

Accounts live in the ledger's ``users`` table; passwords are hashed with argon2id (``argon2-cffi``'s
defaults, RFC 9106's second recommended profile). ``specgate users ...`` and the admin's users page both
go through this module, and every change is an audit event carrying the user who made it.

Logins: a wrong password is audited (``auth.login_failed``) and counted on the account; after
``failed_login_limit`` failures in a row, each further attempt must wait ``2 ** (failures - limit)``
seconds (capped at 15 minutes) after the last failure, whatever the password, so guessing is slowed per
account without letting a stranger lock a radiologist out for the day. A good login resets the count.
Every refusal gets the same answer (:data:`LOGIN_REFUSED`), and an unknown, disabled or throttled
account costs the same argon2 verification as a known one: neither the answer nor its time tells an
outsider which account names exist. The verification runs outside any transaction (:class:`LoginAttempt`).

Sessions are server-side rows (``review_sessions``): the browser holds a random 256-bit token in a signed,
HttpOnly, SameSite=Strict cookie; the table keeps its SHA-256. Logout revokes the row; a password change
or a disabled account revokes every session of that account; a session ends after its lifetime or when
idle. Each session has its own CSRF token, which every form posts back.

    >>> check_password_policy("correct horse battery", username="anna")
    >>> check_password_policy("short", username="anna")
    Traceback (most recent call last):
    ...
    review.auth.AccountError: a password needs at least 12 characters (got 5)
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ledger import audit
from ledger.schema import ReviewSession, User, utcnow

__all__ = [
    "ROLES",
    "AccountError",
    "LOGIN_REFUSED",
    "LoginAttempt",
    "LoginRefused",
    "SessionInfo",
    "add_user",
    "authenticate",
    "check_password_policy",
    "disable_user",
    "list_users",
    "login_lookup",
    "login_record",
    "open_session",
    "read_session",
    "revoke_session",
    "set_password",
    "startup_problems",
    "verify_password",
]

ROLES = ("radiologist", "admin")
MIN_PASSWORD = 12
MAX_DELAY_S = 15 * 60.0
_HASHER = PasswordHasher()  # stateless parameters, not configuration: argon2id, 64 MiB, t=3, p=4


@cache
def _dummy_hash() -> str:
    """Verified when the account does not exist, so an unknown name costs what a known one does."""
    return _HASHER.hash("specgate: no such account")


class AccountError(ValueError):
    """An account change is refused (unknown or duplicate name, bad role, weak password)."""


#: the one answer to every refused login
LOGIN_REFUSED = "wrong account name or password"


class LoginRefused(Exception):
    """A login is refused. ``retry_after_s`` is set when the account is being slowed down (for the audit
    and logs: the answer to the user is the same for every refusal)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def aware(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; the ledger writes UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def check_password_policy(password: str, *, username: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters (got {len(password)})")
    if password.strip().lower() == username.strip().lower():
        raise AccountError("a password must not be the account name")


def _check_username(username: str) -> str:
    name = username.strip()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise AccountError(f"account names are 1-64 letters, digits or . _ - @, got {username!r}")
    return name


def _user(session: Session, username: str) -> User:
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise AccountError(f"no account named {username!r}")
    return user


def add_user(session: Session, username: str, *, role: str, password: str, actor: str,
             display_name: str | None = None) -> User:
    name = _check_username(username)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_password_policy(password, username=name)
    if session.execute(select(User.id).where(User.username == name)).scalar_one_or_none() is not None:
        raise AccountError(f"an account named {name!r} exists already")
    user = User(username=name, role=role, display_name=(display_name or "").strip() or None,
                password_hash=_HASHER.hash(password), active=True)
    session.add(user)
    session.flush()
    audit.append(session, actor=actor, action="user.added", object_type="user", object_id=user.id,
                 details={"username": name, "role": role})
    return user


def set_password(session: Session, username: str, password: str, *, actor: str) -> None:
    user = _user(session, username)
    check_password_policy(password, username=user.username)
    user.password_hash = _HASHER.hash(password)
    user.failed_logins = 0
    ended = _revoke_all(session, user.id)
    audit.append(session, actor=actor, action="user.password_changed", object_type="user", object_id=user.id,
                 details={"username": user.username, "sessions_ended": ended})


def disable_user(session: Session, username: str, *, actor: str) -> None:
    user = _user(session, username)
    user.active = False
    ended = _revoke_all(session, user.id)
    audit.append(session, actor=actor, action="user.disabled", object_type="user", object_id=user.id,
                 details={"username": user.username, "sessions_ended": ended})


def list_users(session: Session) -> list[User]:
    return list(session.execute(select(User).order_by(User.username)).scalars())


def startup_problems(session: Session) -> list[str]:
    """Why the app must not listen beyond loopback: no active admin, or an account without a password."""
    problems = []
    admins = session.execute(select(func.count()).select_from(User)
                             .where(User.role == "admin", User.active.is_(True))).scalar_one()
    if not admins:
        problems.append("no active admin account exists (specgate users add NAME --role admin)")
    empty = session.execute(select(User.username).where(
        User.active.is_(True), (User.password_hash.is_(None)) | (User.password_hash == ""))).scalars().all()
    if empty:
        problems.append(f"accounts without a password: {', '.join(sorted(empty))} (specgate users passwd NAME)")
    return problems


def _delay(failures: int, limit: int) -> float:
    if failures < limit:
        return 0.0
    return min(2.0 ** (failures - limit), MAX_DELAY_S)


@dataclass(frozen=True)
class LoginAttempt:
    """What a login reads before the password is checked (:func:`login_lookup`), so that the argon2
    verification (about 60 ms of CPU and 64 MiB) runs outside any transaction: with SQLite every
    transaction holds the write lock (``BEGIN IMMEDIATE``), and 16 wrong logins at once, each verifying
    inside its transaction, pushed a radiologist's queue page from 6 ms to 1.25 s."""

    username: str
    user_id: int | None
    password_hash: str | None
    throttled_for_s: float  # > 0: the account is being slowed down; the password is not looked at


def login_lookup(session: Session, username: str, *, limit: int, now: datetime | None = None) -> LoginAttempt:
    """Phase 1 of a login (a short read): the account, its hash and whether it must wait."""
    now = now or utcnow()
    name = username.strip()[:64]
    user = session.execute(select(User).where(User.username == name)).scalar_one_or_none()
    if user is None:
        return LoginAttempt(name, None, None, 0.0)
    wait = 0.0
    if user.last_failed_login_at is not None:
        wait = _delay(user.failed_logins, limit) - (now - aware(user.last_failed_login_at)).total_seconds()
    return LoginAttempt(name, user.id, user.password_hash or None, max(wait, 0.0))


def verify_password(attempt: LoginAttempt, password: str) -> tuple[bool, str | None]:
    """Phase 2 (no database): (password right, a new hash when the parameters changed). An unknown or
    throttled account costs the same verification as a known one, so neither answer nor time tells an
    outsider which names exist or which are being slowed down."""
    throttled = attempt.throttled_for_s > 0
    stored = attempt.password_hash if attempt.password_hash and not throttled else _dummy_hash()
    ok: bool
    try:
        ok = bool(_HASHER.verify(stored, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    ok = ok and not throttled and attempt.password_hash is not None
    rehash = _HASHER.hash(password) if ok and _HASHER.check_needs_rehash(str(attempt.password_hash)) else None
    return ok, rehash


def login_record(session: Session, attempt: LoginAttempt, ok: bool, *, limit: int, rehash: str | None = None,
                 remote_addr: str | None = None, now: datetime | None = None) -> User:
    """Phase 3 (a short write): count and audit the outcome; the account, or :class:`LoginRefused`.

    Every refusal says the same (``wrong account name or password``), whether the account is unknown,
    disabled, throttled or the password wrong; the audit row and ``retry_after_s`` (for the caller's
    logs, never shown) say which. The account is read again under lock: a password changed or a failure
    counted by another login since phase 1 is taken into account. Catch :class:`LoginRefused` inside the
    transaction so that the failure's row and count are committed."""
    now = now or utcnow()
    name = attempt.username
    where = {"remote_addr": remote_addr} if remote_addr else {}
    user = None
    if attempt.user_id is not None:
        user = session.execute(select(User).where(User.id == attempt.user_id).with_for_update()).scalar_one_or_none()
    if user is not None and user.last_failed_login_at is not None:
        wait = _delay(user.failed_logins, limit) - (now - aware(user.last_failed_login_at)).total_seconds()
        if wait > 0:
            audit.append(session, actor=f"user:{name}", action="auth.login_throttled", object_type="user",
                         object_id=user.id, details={"failures": user.failed_logins, **where})
            raise LoginRefused(LOGIN_REFUSED, retry_after_s=wait)
    if user is not None and (user.password_hash or None) != attempt.password_hash:
        ok = False  # the password was changed while this login was being checked
    if user is None or not ok or not user.active:
        reason = "unknown_user" if user is None else "bad_password" if not ok else "disabled"
        if user is not None and not ok:
            session.execute(update(User).where(User.id == user.id)
                            .values(failed_logins=User.failed_logins + 1, last_failed_login_at=now))
        audit.append(session, actor=f"user:{name}" if name else "user:?", action="auth.login_failed",
                     object_type="user", object_id=user.id if user is not None else "-",
                     details={"reason": reason, **where})
        raise LoginRefused(LOGIN_REFUSED)
    if rehash is not None:
        user.password_hash = rehash
    user.failed_logins = 0
    return user


def authenticate(session: Session, username: str, password: str, *, limit: int,
                 remote_addr: str | None = None, now: datetime | None = None) -> User:
    """The account for these credentials, or :class:`LoginRefused`, in the caller's one transaction
    (the CLI and tests; the web app runs the three phases apart: :func:`login_lookup`,
    :func:`verify_password` outside any transaction, :func:`login_record`)."""
    attempt = login_lookup(session, username, limit=limit, now=now)
    ok, rehash = verify_password(attempt, password)
    return login_record(session, attempt, ok, limit=limit, rehash=rehash, remote_addr=remote_addr, now=now)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    """The session a request carries, and its user."""

    session_id: int
    user_id: int
    username: str
    display_name: str
    role: str
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def csrf_ok(self, posted: object) -> bool:
        """The posted token is this session's (constant time; a non-ASCII or missing value is unequal)."""
        from .security import tokens_equal

        return tokens_equal(self.csrf_token, posted)


def open_session(session: Session, user: User, *, lifetime_s: float, remote_addr: str | None = None) -> str:
    """A new login for ``user``: its row, and the token the browser keeps (returned once, stored hashed)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    row = ReviewSession(token_sha256=_token_hash(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                        remote_addr=(remote_addr or "")[:64] or None, created_at=now, last_seen_at=now,
                        expires_at=now + timedelta(seconds=lifetime_s))
    session.add(row)
    session.flush()
    audit.append(session, actor=f"user:{user.username}", action="auth.login", object_type="user",
                 object_id=user.id, details={"session_id": row.id, **({"remote_addr": row.remote_addr}
                                                                      if row.remote_addr else {})})
    return token


# last_seen_at is written at most this often per session: a page with 40 slice images is not 40 writes
_TOUCH_EVERY_S = 30.0


def read_session(session: Session, token: str, *, idle_s: float, now: datetime | None = None) -> SessionInfo | None:
    """The live session for ``token``, or None (unknown, revoked, expired, idle too long, user disabled)."""
    now = now or utcnow()
    row = session.execute(select(ReviewSession, User).join(User, User.id == ReviewSession.user_id)
                          .where(ReviewSession.token_sha256 == _token_hash(token))).one_or_none()
    if row is None:
        return None
    rs, user = row
    if (rs.revoked_at is not None or not user.active or aware(rs.expires_at) <= now
            or (now - aware(rs.last_seen_at)).total_seconds() > idle_s):
        return None
    if (now - aware(rs.last_seen_at)).total_seconds() > _TOUCH_EVERY_S:
        rs.last_seen_at = now
    return SessionInfo(session_id=rs.id, user_id=user.id, username=user.username,
                       display_name=user.display_name or user.username, role=user.role, csrf_token=rs.csrf_token)


def revoke_session(session: Session, info: SessionInfo) -> None:
    session.execute(update(ReviewSession).where(ReviewSession.id == info.session_id,
                                                ReviewSession.revoked_at.is_(None)).values(revoked_at=utcnow()))
    audit.append(session, actor=f"user:{info.username}", action="auth.logout", object_type="user",
                 object_id=info.user_id, details={"session_id": info.session_id})


def _revoke_all(session: Session, user_id: int) -> int:
    res = session.execute(update(ReviewSession).where(ReviewSession.user_id == user_id,
                                                      ReviewSession.revoked_at.is_(None))
                          .values(revoked_at=utcnow()))
    return int(getattr(res, "rowcount", 0) or 0)
