"""Who may do what: the three roles, the permission table, and the stored forms of the secrets
that carry a role (live view tokens, OPC UA passwords). Pure: no I/O beyond parsing text.

The roles are ordered, each may do what the ones below it may: viewer < operator < engineer.
ACTIONS is the one table every door (live view, OPC UA, MQTT ACL example, CLI docs) reads.

Secrets at rest: a live view token is 32 random bytes, so one SHA-256 is enough to make the
stored form useless to whoever reads the file; an OPC UA password is chosen by a person, so it
is stored with scrypt (salted, deliberately slow) against guessing from a stolen config.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

ROLES = ("viewer", "operator", "engineer")
"""Lowest first: a role may do everything the roles before it may."""

ACTIONS: dict[str, str] = {
    # action -> the least role allowed it
    "see": "viewer",
    # the PLC's handshake (as Modbus, which has no login): a trigger changes no model
    "trigger": "viewer",
    "confirm": "operator",
    "acknowledge": "operator",
    "teach": "engineer",
    "shadow_start": "engineer",
    "shadow_stop": "engineer",
    "promote": "engineer",
    "rollback": "engineer",
    "recipe": "engineer",
    "thresholds": "engineer",
}

LEGACY_ROLE = "engineer"
"""The role of the single `liveview.token` and of the single OPC UA `username`: configs from
before roles keep doing what they did (everything)."""

ANONYMOUS_ROLE = "viewer"
"""The most an unauthenticated client gets (OPC UA anonymous, a live view without tokens)."""

TOKEN_SCHEME = "sha256"
PASSWORD_SCHEME = "scrypt"
# scrypt cost: ~50 ms and 16 MiB per check on a small edge box; login is rare
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def rank(role: str) -> int:
    try:
        return ROLES.index(role)
    except ValueError:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})") from None


def allows(role: str | None, action: str) -> bool:
    """Whether `role` may do `action`. No role, or an action missing from the table, is a
    no: a door that forgot to add its action refuses rather than lets through."""
    least = ACTIONS.get(action)
    if role is None or least is None or role not in ROLES:
        return False
    return rank(role) >= rank(least)


def permissions(role: str) -> tuple[str, ...]:
    return tuple(action for action in ACTIONS if allows(role, action))


def audit_action(action: str) -> str:
    """The action as the audit trail names it (the agent's own entries: shadow.start,
    recipe.change), so that `audit show --action` finds a refusal beside what it refused."""
    return {"recipe": "recipe.change"}.get(action, action.replace("_", "."))


def refusal(role: str | None, action: str) -> str:
    """The one-line reason a refused action gets (HTTP 403 body, OPC UA status text, audit)."""
    least = ACTIONS.get(action)
    if least is None:
        return f"unknown action {action!r}"
    return f"{action} needs the {least} role; this login has {role or 'none'}"


# ---------------------------------------------------------------- live view tokens


@dataclass(frozen=True)
class TokenEntry:
    role: str
    digest: str  # hex SHA-256 of the token
    name: str  # who it was issued to: the audit trail's `who`


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_line(role: str, token: str, name: str) -> str:
    """One line of the tokens file: `<role> sha256:<hex> <name>`."""
    rank(role)
    check_name(name)
    return f"{role} {TOKEN_SCHEME}:{token_digest(token)} {name}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-' (it names the "
            "holder in the audit trail)"
        )
    return name


def parse_tokens(text: str) -> tuple[TokenEntry, ...]:
    """The tokens file: one `<role> sha256:<hex> <name>` a line; blank lines and `#` comments
    skipped. ValueError naming the line for anything else (a plain token included: tokens are
    stored hashed only)."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"line {number}: expected '<role> sha256:<hex> <name>'")
        role, stored, name = parts
        if role not in ROLES:
            raise ValueError(f"line {number}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        scheme, _, digest = stored.partition(":")
        if scheme != TOKEN_SCHEME or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"line {number}: the token must be stored as sha256:<64 hex digits>")
        try:
            check_name(name)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        entries.append(TokenEntry(role, digest, name))
    return tuple(entries)


def match_token(given: str, entries: Iterable[TokenEntry]) -> TokenEntry | None:
    """The entry `given` is the token of. Compared digest to digest in constant time and
    against every entry (no early exit); should one token be listed twice, the lower role
    wins."""
    digest = token_digest(given).encode()
    found: TokenEntry | None = None
    for entry in entries:
        if hmac.compare_digest(digest, entry.digest.encode()) and (
            found is None or rank(entry.role) < rank(found.role)
        ):
            found = entry
    return found


# ---------------------------------------------------------------- OPC UA passwords


def hash_password(
    password: str, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = 1
) -> str:
    """`scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`."""
    salt = secrets.token_bytes(16) if salt is None else salt
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"{PASSWORD_SCHEME}${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def check_password_hash(stored: str) -> str:
    """ValueError unless `stored` is hash_password's form (config validation)."""
    _parse_password_hash(stored)
    return stored


def _parse_password_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    form = "scrypt$<n>$<r>$<p>$<salt>$<hash> (from `edge-agent opcua-user add`)"
    if len(parts) != 6 or parts[0] != PASSWORD_SCHEME:
        raise ValueError(f"must be {form}")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ValueError(f"must be {form}") from None
    # bounds: a stored hash must not make one login cost gigabytes or minutes
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range (n a power of 2 up to 2^20, r, p)")
    if len(salt) < 8 or len(key) != 32:
        raise ValueError(f"must be {form}")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    try:
        n, r, p, salt, key = _parse_password_hash(stored)
    except ValueError:
        return False
    given = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * 1024 * 1024
    )
    return hmac.compare_digest(given, key)
