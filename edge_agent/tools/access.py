"""`edge-agent liveview-token` and `edge-agent opcua-user`: give a person a role.

liveview-token add writes a hashed line to the tokens file (liveview.tokens_file) and prints
the token once: it is stored nowhere else. opcua-user add reads a password (twice, not echoed;
or one line from stdin with --password-stdin) and prints the users entry to paste into the
config's opcua section: the config holds the scrypt hash only.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write, fsync_directory
from edge_agent.lifecycle import roles

MIN_PASSWORD = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    if p.prog.endswith("liveview-token"):
        sub = p.add_subparsers(dest="access_command", metavar="ACTION", required=True)
        add = sub.add_parser("add", help="add a token for a role; prints it once")
        listing = sub.add_parser("list", help="list the holders and their roles")
        revoke = sub.add_parser("revoke", help="remove every token of a holder")
        for q in (add, listing, revoke):
            where = q.add_mutually_exclusive_group(required=True)
            where.add_argument("--file", type=Path, help="the tokens file")
            where.add_argument("--config", type=Path, help="take liveview.tokens_file from it")
        add.add_argument("--role", choices=roles.ROLES, required=True)
        for q in (add, revoke):
            q.add_argument("--name", required=True, help="who holds it (the audit trail's who)")
        p.set_defaults(access="liveview")
    else:
        sub = p.add_subparsers(dest="access_command", metavar="ACTION", required=True)
        add = sub.add_parser("add", help="print an opcua.users entry with the password hashed")
        add.add_argument("--name", required=True, help="the OPC UA user name")
        add.add_argument("--role", choices=roles.ROLES, required=True)
        add.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin"
        )
        p.set_defaults(access="opcua")


def run(args: argparse.Namespace) -> int:
    if args.access == "opcua":
        return _opcua_user(args)
    path = _tokens_file(args.file, args.config)
    if args.access_command == "add":
        return _add_token(path, args.role, args.name)
    entries = _read(path)
    if args.access_command == "list":
        for entry in entries:
            print(f"{entry.name}\t{entry.role}")
        return 0
    if not any(e.name == args.name for e in entries):
        raise UserError(f"{path}: no token of {args.name!r}")
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if _holder(line) != args.name
    ]
    atomic_write(path, ("\n".join(kept) + "\n").encode(), mode=0o600)
    print(f"revoked every token of {args.name} in {path}")
    return 0


def _holder(line: str) -> str | None:
    parts = line.split()
    return parts[2] if len(parts) == 3 and not line.lstrip().startswith("#") else None


def _tokens_file(path: Path | None, config: Path | None) -> Path:
    if path is not None:
        return path
    assert config is not None
    from edge_agent.agent.config import load_config

    lv = load_config(config).liveview
    if lv is None or lv.tokens_file is None:
        raise UserError(f"{config}: liveview.tokens_file is not set (or the live view is off)")
    return lv.tokens_file


def _read(path: Path) -> tuple[roles.TokenEntry, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return roles.parse_tokens(text)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def _add_token(path: Path, role: str, name: str) -> int:
    try:
        roles.check_name(name)
    except ValueError as exc:
        raise UserError(f"--name: {exc}") from None
    _read(path)  # a broken file is fixed first, not appended to
    token = roles.new_token()
    line = roles.token_line(role, token, name) + "\n"
    created = not path.exists()
    try:
        # 0600: the hashes are useless to a reader, the list of holders is not for everyone
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None
    print(f"# {role} token of {name}, added to {path}; shown once, stored hashed:", file=sys.stderr)
    print(token)
    return 0


def _opcua_user(args: argparse.Namespace) -> int:
    try:
        roles.check_name(args.name)
    except ValueError as exc:
        raise UserError(f"--name: {exc}") from None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the passwords differ")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    stored = roles.hash_password(password)
    print("# under opcua: users: in the config")
    print(f'- {{name: {args.name}, role: {args.role}, password_hash: "{stored}"}}')
    return 0
