"""API keys, stored hashed (sha256 hex) in a JSON file with a name and dates; never the keys themselves.

File: {"keys": [{"name": ..., "sha256": ..., "created": ISO time, "revoked": ISO time or null}, ...]}.
Revoked keys stay listed (so a name is not silently reused and the refusal is a 403, not a 401).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PREFIX = "tgw_"


@dataclass(frozen=True)
class KeyEntry:
    name: str
    sha256: str
    created: str
    revoked: str | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load(path: Path) -> list[KeyEntry]:
    """The entries of a keys file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [KeyEntry(**entry) for entry in json.loads(path.read_text())["keys"]]


def _save(path: Path, entries: list[KeyEntry]) -> None:
    # Written beside and renamed: a running gateway never reads a half-written file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:  # mkstemp: mode 0600
        json.dump({"keys": [entry.__dict__ for entry in entries]}, out, indent=2)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def create(path: Path, name: str) -> str:
    """Add a key named `name` and return it (the only time it is seen)."""
    entries = load(path)
    if not name or any(e.name == name for e in entries):
        raise ValueError(f"a key named {name!r} already exists (names are never reused)" if name else "empty name")
    key = PREFIX + secrets.token_urlsafe(32)
    _save(path, [*entries, KeyEntry(name, digest(key), _now())])
    return key


def revoke(path: Path, name: str) -> None:
    """Mark the key named `name` revoked."""
    entries = load(path)
    if not any(e.name == name and e.revoked is None for e in entries):
        raise ValueError(f"no active key named {name!r}")
    _save(path, [KeyEntry(e.name, e.sha256, e.created, _now()) if e.name == name and e.revoked is None else e
                 for e in entries])


class KeyStore:
    """The keys file as the gateway reads it: re-read when it changes, so create/revoke apply without a restart."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._by_hash: dict[str, KeyEntry] = {}

    def lookup(self, key: str) -> KeyEntry | None:
        """The entry of `key` (revoked ones included), or None for an unknown key."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._by_hash = {e.sha256: e for e in load(self.path)}
                self._stamp = stamp
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # a missing or broken file admits no one (rather than the keys it held before: one may be revoked)
            logging.getLogger(__name__).error("API keys file %s unreadable: %s", self.path, exc)
            self._by_hash, self._stamp = {}, None
        return self._by_hash.get(digest(key))
