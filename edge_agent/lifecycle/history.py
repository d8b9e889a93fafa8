"""Which bundle each inspection runs after promotions, and the ones before it, for rollback.

    <lifecycle dir>/promotions.json           per "<recipe>/<inspection>": its stack
    <lifecycle dir>/bundles/<model_id>-<sha>/ copies of candidate bundles (content-addressed)

A stack starts with the config's own bundle and grows by one entry per promotion; the top is
the bundle in force, and rollback pops it, so the one below runs again, from the same files
(the copy made when it started shadowing: editing or deleting the candidate's folder later
changes nothing). At most ``keep`` bundles are kept below the top; older copies are deleted
unless another stack or a running shadow still uses them. The config's own bundle is never
copied or deleted.

A stack applies while the config still names the bundle it started from: a config edited to
another bundle starts over from that one (the stale stack is dropped, with a warning).

The stack operations (``push``, ``pop``) are pure; ``Promotions`` keeps them on disk
(atomic writes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write, fsync_directory, fsync_tree
from edge_agent.model.bundle import MANIFEST

log = logging.getLogger(__name__)

STATE_FILE = "promotions.json"
BUNDLES_DIR = "bundles"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

Stack = list[dict[str, Any]]


def push(stack: Stack, entry: Mapping[str, Any], keep: int) -> tuple[Stack, Stack]:
    """(the stack with ``entry`` on top and at most ``keep`` entries below it, the entries
    that fell off the bottom)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep!r}")
    grown = [*stack, dict(entry)]
    cut = max(0, len(grown) - (keep + 1))
    return grown[cut:], grown[:cut]


def pop(stack: Stack) -> tuple[Stack, dict[str, Any]]:
    """(the stack without its top, the entry now on top); ValueError when nothing is below."""
    if len(stack) < 2:
        raise ValueError("no earlier bundle is kept")
    rest = stack[:-1]
    return rest, rest[-1]


def bundle_sha256(bundle_dir: Path) -> str:
    """The bundle's fingerprint: SHA-256 of its manifest, which holds every file's SHA-256
    (load_bundle verifies them), so equal fingerprints mean equal bundles."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


class Promotions:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.state_path = self.root / STATE_FILE

    # -- the state ----------------------------------------------------------------------------

    def _read(self) -> dict[str, Stack]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.state_path}: unreadable ({exc})") from None
        stacks = data.get("stacks") if isinstance(data, dict) else None
        if not isinstance(stacks, dict) or not all(
            isinstance(s, list) and s and all(isinstance(e, dict) and "path" in e for e in s)
            for s in stacks.values()
        ):
            raise UserError(f"{self.state_path}: not a promotions file")
        return stacks

    def _write(self, stacks: Mapping[str, Stack]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"stacks": stacks}, indent=1, sort_keys=True).encode()
        atomic_write(self.state_path, body)

    def stack(self, key: str, base: Path) -> Stack:
        """``key``'s stack, starting from ``base`` (the config's bundle); a stack that started
        from another bundle is stale: the config changed, so it starts over."""
        found = self._read().get(key)
        if found and found[0]["path"] == str(base):
            return found
        if found:
            log.warning(
                "%s: the config now names %s, not %s: its promotions no longer apply",
                key,
                base,
                found[0]["path"],
            )
        return [{"path": str(base), "config": True}]

    def current(self, key: str, base: Path) -> Path:
        """The bundle ``key`` runs: the top of its stack."""
        return Path(self.stack(key, base)[-1]["path"])

    def previous(self, key: str, base: Path) -> Path | None:
        stack = self.stack(key, base)
        return Path(stack[-2]["path"]) if len(stack) >= 2 else None

    # -- changes --------------------------------------------------------------------------------

    def stage(self, bundle_dir: Path) -> Path:
        """A copy of ``bundle_dir`` under bundles/ (the same content is copied once), fsynced:
        what a shadow runs and a promotion keeps, whatever happens to the original folder."""
        bundle_dir = Path(bundle_dir)
        sha = bundle_sha256(bundle_dir)
        manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
        name = f"{_UNSAFE.sub('_', str(manifest.get('model_id', 'bundle')))[:40]}-{sha[:16]}"
        dest = self.root / BUNDLES_DIR / name
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".stage-", dir=dest.parent))
        try:
            copy = tmp / "bundle"
            # Hidden folders (teach's .history) are not part of the version being staged.
            shutil.copytree(bundle_dir, copy, ignore=shutil.ignore_patterns(".*"))
            fsync_tree(copy)
            copy.rename(dest)
            fsync_directory(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def promote(self, key: str, base: Path, entry: Mapping[str, Any]) -> None:
        stack, _dropped = push(self.stack(key, base), entry, self.keep)
        self._save(key, stack)

    def rollback(self, key: str, base: Path) -> Path:
        """Pop ``key``'s top; the bundle now in force. ValueError when nothing is below."""
        stack, top = pop(self.stack(key, base))
        self._save(key, stack)
        return Path(top["path"])

    def _save(self, key: str, stack: Stack) -> None:
        stacks = self._read()
        if len(stack) == 1:
            stacks.pop(key, None)  # back at the config's bundle: nothing to remember
        else:
            stacks[key] = stack
        self._write(stacks)

    def prune(self, in_use: Iterable[Path] = ()) -> list[Path]:
        """Delete the copies under bundles/ that no stack and nothing in ``in_use`` names."""
        folder = self.root / BUNDLES_DIR
        if not folder.is_dir():
            return []
        wanted = {Path(p).resolve() for p in in_use}
        for stack in self._read().values():
            wanted.update(Path(e["path"]).resolve() for e in stack)
        gone = []
        for copy in folder.iterdir():
            if copy.is_dir() and not copy.name.startswith(".") and copy.resolve() not in wanted:
                shutil.rmtree(copy, ignore_errors=True)
                gone.append(copy)
        return gone
