"""A site's privacy ledger: an append-only JSON-lines file, each entry chained to the
previous one by an HMAC-SHA256 under a key the site holds.

The ledger is both the audit trail a privacy officer reads and the site's
accountant state: the spend is recomputed from its entries, so there is no second
copy that could disagree. A head file (entry count and last MAC, itself MACed)
makes truncation detectable too; a ledger that fails verification is never
trusted (the site refuses to train). Every append is fsynced before it returns,
so a spend is on disk before the update it pays for leaves the site.

What the key does, and what it does not: with a plain hash chain anyone who can
write the file can rewrite every entry (say, a larger sigma in each, for a
smaller epsilon) and recompute the hashes. The key (`ledger.key`, 32 random
bytes, mode 0600, created with the first keyed entry) stops whoever can write
the ledger but not read the key. Whoever has the site's account can read the
key, or replace it, and re-MAC everything; against that, the coordinator keeps
the last head each site reported and sends it with the next round, and the site
checks it is still in its ledger (`contains`): a rewritten ledger no longer
holds it.

Ledgers written before entries were keyed (SHA-256 links in a `hash` field, no
key file) are read as they are, and the keyed chain continues from their last
hash: nothing is rewritten, so their hashes stay what the coordinator recorded.
Once a keyed entry exists the key must too.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

GENESIS = "0" * 64
KEY_BYTES = 32


class LedgerTampered(RuntimeError):
    """The ledger's chain, head or key does not verify."""


def _canonical(entry: dict[str, Any], without: str) -> bytes:
    body = {k: v for k, v in entry.items() if k != without}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_mac(key: bytes, entry: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(entry, "mac"), hashlib.sha256).hexdigest()


def legacy_hash(entry: dict[str, Any]) -> str:
    """The unkeyed SHA-256 link of entries written before keys."""
    return hashlib.sha256(_canonical(entry, "hash")).hexdigest()


def link(entry: dict[str, Any]) -> str:
    """What the next entry's `prev` names this entry by: its MAC, or (written before keys) its hash."""
    return entry["mac"] if "mac" in entry else entry["hash"]


def _head_mac(key: bytes, count: int, last: str) -> str:
    return hmac.new(key, f"ledger-head:{count}:{last}".encode(), hashlib.sha256).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """`read_only`: verify and read, never create or repair anything (for auditors and
    `fedlora privacy plan --site`, who may run as another user than the site)."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / "ledger.jsonl"
        self.head_path = self.directory / "ledger.head"
        self.key_path = self.directory / "ledger.key"
        self._lock_path = self.directory / ".ledger.lock"
        self.read_only = read_only
        self._held = threading.local()  # this object's lock depth, per thread (the lock is reentrant)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the ledger for a read-check-append sequence: no other process or thread can read
        or append in between (a budget check and the reservation of what it allowed)."""
        with self._locked():
            yield

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One reader or writer at a time, even across processes sharing the directory."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        if self.read_only and not self._lock_path.exists():  # nothing was ever appended here
            yield
            return
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("r" if self.read_only else "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(fh, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        """All entries, verified; raises LedgerTampered if anything does not check out."""
        with self._locked():
            return self._verified()

    def head(self) -> str:
        entries = self.entries()
        return link(entries[-1]) if entries else GENESIS

    def contains(self, head: str) -> bool:
        """Whether `head` (the link of an entry this site reported earlier) is in this ledger."""
        return any(hmac.compare_digest(head, link(e)) for e in self.entries())

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain `record` to the last entry, write it durably, return the stored entry."""
        if self.read_only:
            raise PermissionError(f"{self.path} is open read-only")
        with self._locked():
            entries = self._verified()
            key = self._key(create=not any("mac" in e for e in entries))
            if entries and self._read_head()["mac"] is None:  # written before keys: key the head first
                self._write_head(key, len(entries), link(entries[-1]))
            entry = {"index": len(entries), **record, "prev": link(entries[-1]) if entries else GENESIS}
            entry["mac"] = entry_mac(key, entry)
            created = not self.path.exists()
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._write_head(key, len(entries) + 1, entry["mac"])
            if created:
                _fsync_dir(self.directory)
            return entry

    # -- internals --------------------------------------------------------------
    def _key(self, create: bool = False) -> bytes:
        if not self.key_path.exists():
            if not create:
                raise LedgerTampered(f"{self.key_path} is missing: the ledger's keyed entries cannot be verified")
            # Written whole under a temporary name, then linked into place: never a half-written key.
            tmp = self.directory / f".ledger.key.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.key_path)  # fails if another process made one first: use that one
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            _fsync_dir(self.directory)
        mode = stat.S_IMODE(self.key_path.stat().st_mode)
        if mode & 0o077:
            raise LedgerTampered(f"{self.key_path} is readable or writable by other users (mode {mode:o}): "
                                 "anyone who reads it can rewrite the ledger; chmod 600 it")
        try:
            key = bytes.fromhex(self.key_path.read_text().strip())
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise LedgerTampered(f"{self.key_path}: not a {KEY_BYTES}-byte key")
        return key

    def _write_head(self, key: bytes, count: int, last: str) -> None:
        tmp = self.head_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump({"count": count, "last": last, "mac": _head_mac(key, count, last)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.head_path)
        _fsync_dir(self.directory)

    def _read_head(self) -> dict[str, Any] | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            if "last" in head:
                return {"count": int(head["count"]), "last": str(head["last"]), "mac": str(head["mac"])}
            return {"count": int(head["count"]), "last": str(head["hash"]), "mac": None}  # written before keys
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerTampered(f"{self.head_path}: unreadable ({err})") from None

    def _read_lines(self) -> list[dict[str, Any]]:
        out = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise LedgerTampered(f"{self.path}, line {lineno}: not valid JSON") from None
        return out

    def _verified(self) -> list[dict[str, Any]]:
        lines = self._read_lines() if self.path.exists() else []
        head = self._read_head()
        if not lines:
            if head is not None and head["count"] > 0:
                raise LedgerTampered(f"{self.path} is missing but {self.head_path} records "
                                     f"{head['count']} entries")
            return []
        keyed = any("mac" in e for e in lines)
        key = self._key() if keyed or (head is not None and head["mac"] is not None) else b""
        prev, seen_keyed = GENESIS, False
        for lineno, entry in enumerate(lines, start=1):
            if entry.get("index") != lineno - 1 or entry.get("prev") != prev:
                raise LedgerTampered(f"{self.path}, line {lineno}: breaks the chain (entry removed, "
                                     "reordered or inserted)")
            if "mac" in entry:
                seen_keyed, field, expected = True, "mac", entry_mac(key, entry)
            elif "hash" in entry and not seen_keyed:  # written before keys: only before every keyed entry
                field, expected = "hash", legacy_hash(entry)
            else:
                raise LedgerTampered(f"{self.path}, line {lineno}: an entry without a MAC")
            if not hmac.compare_digest(str(entry.get(field, "")), expected):
                raise LedgerTampered(f"{self.path}, line {lineno}: {field} mismatch (entry edited)")
            prev = link(entry)
        if head is None:
            raise LedgerTampered(f"{self.head_path} is missing for a ledger of {len(lines)} entries")
        if head["mac"] is not None:
            if not hmac.compare_digest(head["mac"], _head_mac(key, head["count"], head["last"])):
                raise LedgerTampered(f"{self.head_path}: its MAC does not verify (head rewritten)")
        elif keyed:  # the head is keyed before the first keyed entry is written (see append)
            raise LedgerTampered(f"{self.head_path} is not keyed but the ledger is (head rewritten)")
        # A crash between the ledger fsync and the head update leaves the head one
        # entry behind: the extra entry verifies and only adds spend, so it is kept
        # (the next append writes the head again).
        behind = len(lines) - head["count"]
        if behind < 0 or behind > 1 or (head["count"] and link(lines[head["count"] - 1]) != head["last"]):
            raise LedgerTampered(f"{self.path} has {len(lines)} entries but {self.head_path} records "
                                 f"{head['count']} ending in {head['last'][:12]}: entries were removed")
        return lines
