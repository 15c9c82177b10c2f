"""A site's privacy ledger: an append-only JSON-lines file, each entry chained to the
previous one by an HMAC-SHA256 under a key only the site holds.

The ledger is both the audit trail a privacy officer reads and the site's
accountant state: the spend is recomputed from its entries, so there is no second
copy that could disagree. A head file (entry count and last MAC) makes truncation
detectable too; a ledger that fails verification is never trusted (the site
refuses to train). Every append is fsynced before it returns, so a spend is on
disk before the update it pays for leaves the site.

Why keyed: with a plain hash chain anyone who can write the file can rewrite
every entry (say, a larger sigma in each, for a smaller epsilon) and recompute
the hashes. The MAC key (`ledger.key`, 32 random bytes, mode 0600, created with
the ledger) means a rewrite needs the key too. Someone who has the site's
account has the key as well; against that, the coordinator keeps the last MAC
each site reported and sends it with the next round, and the site checks it is
still in its ledger (`contains`): a rewritten ledger no longer holds it.

A ledger written before entries were keyed (field `hash`, no key file) is
verified as it was written, then rewritten keyed once, with a `keyed` entry
recording the old head (so a coordinator's record of it still matches).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

GENESIS = "0" * 64
KEYED = "keyed"  # the entry that marks a legacy (unkeyed) ledger's conversion


class LedgerTampered(RuntimeError):
    """The ledger's chain, head or key does not verify."""


def _canonical(entry: dict[str, Any], without: str) -> bytes:
    body = {k: v for k, v in entry.items() if k != without}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_mac(key: bytes, entry: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(entry, "mac"), hashlib.sha256).hexdigest()


def legacy_hash(entry: dict[str, Any]) -> str:
    """The unkeyed SHA-256 chain of ledgers written before keys."""
    return hashlib.sha256(_canonical(entry, "hash")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / "ledger.jsonl"
        self.head_path = self.directory / "ledger.head"
        self.key_path = self.directory / "ledger.key"
        self._lock_path = self.directory / ".ledger.lock"
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
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
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
        return entries[-1]["mac"] if entries else GENESIS

    def contains(self, head: str) -> bool:
        """Whether `head` (a MAC this site reported earlier) is an entry of this ledger, or the
        head of the unkeyed ledger it was converted from."""
        return any(head in (e["mac"], e.get("legacy_head")) for e in self.entries())

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain `record` to the last entry, write it durably, return the stored entry."""
        with self._locked():
            entries = self._verified()
            entry = {"index": len(entries), **record, "prev": entries[-1]["mac"] if entries else GENESIS}
            entry["mac"] = entry_mac(self._key(create=not entries), entry)
            created = not self.path.exists()
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._write_head(len(entries) + 1, entry["mac"])
            if created:
                _fsync_dir(self.directory)
            return entry

    # -- internals --------------------------------------------------------------
    def _key(self, create: bool = False) -> bytes:
        if not self.key_path.exists():
            if not create:
                raise LedgerTampered(f"{self.key_path} is missing: the ledger's entries cannot be verified")
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.directory)
        mode = stat.S_IMODE(self.key_path.stat().st_mode)
        if mode & 0o077:
            raise LedgerTampered(f"{self.key_path} is readable or writable by other users (mode {mode:o}): "
                                 "anyone who reads it can rewrite the ledger; chmod 600 it")
        try:
            return bytes.fromhex(self.key_path.read_text().strip())
        except ValueError:
            raise LedgerTampered(f"{self.key_path}: not a key") from None

    def _write_head(self, count: int, last_mac: str) -> None:
        tmp = self.head_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump({"count": count, "mac": last_mac}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.head_path)
        _fsync_dir(self.directory)

    def _read_head(self, link: str) -> dict[str, Any] | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            return {"count": int(head["count"]), "link": str(head[link])}
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
        if lines and "mac" not in lines[0] and "hash" in lines[0]:
            if self.key_path.exists():  # a converted ledger replaced by an unkeyed one, or a conversion cut short
                raise LedgerTampered(f"{self.path} is unkeyed but {self.key_path} exists: restore the keyed ledger")
            return self._convert_legacy(self._verify(lines, "hash", legacy_hash))
        key = self._key() if lines else b""
        return self._verify(lines, "mac", lambda entry: entry_mac(key, entry))

    def _verify(self, lines: list[dict[str, Any]], link: str, expected) -> list[dict[str, Any]]:
        """The entries of a chain whose `link` field is `expected(entry)`, checked against the head."""
        head = self._read_head(link)
        if not lines:
            if head is not None and head["count"] > 0:
                raise LedgerTampered(f"{self.path} is missing but {self.head_path} records "
                                     f"{head['count']} entries")
            return []
        prev = GENESIS
        for lineno, entry in enumerate(lines, start=1):
            if entry.get("index") != lineno - 1 or entry.get("prev") != prev:
                raise LedgerTampered(f"{self.path}, line {lineno}: breaks the chain (entry removed, "
                                     "reordered or inserted)")
            if not hmac.compare_digest(str(entry.get(link, "")), expected(entry)):
                raise LedgerTampered(f"{self.path}, line {lineno}: {link} mismatch (entry edited)")
            prev = entry[link]
        if head is None:
            raise LedgerTampered(f"{self.head_path} is missing for a ledger of {len(lines)} entries")
        # A crash between the ledger fsync and the head update leaves the head one
        # entry behind: the extra entry verifies and only adds spend, so it is kept.
        behind = len(lines) - head["count"]
        if behind < 0 or behind > 1 or (head["count"] and lines[head["count"] - 1][link] != head["link"]):
            raise LedgerTampered(f"{self.path} has {len(lines)} entries but {self.head_path} records "
                                 f"{head['count']} ending in {head['link'][:12]}: entries were removed")
        if behind == 1 and link == "mac":
            self._write_head(len(lines), lines[-1]["mac"])
        return lines

    def _convert_legacy(self, legacy: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rewrite a verified unkeyed ledger keyed, closing it with a `keyed` entry."""
        key = self._key(create=True)
        entries, prev, renamed = [], GENESIS, {}
        for old in legacy:
            entry = {**{k: v for k, v in old.items() if k != "hash"}, "prev": prev}
            if entry.get("reservation"):  # entries that name an earlier one name it by its new MAC
                entry["reservation"] = renamed.get(entry["reservation"], entry["reservation"])
            entry["mac"] = prev = renamed[old["hash"]] = entry_mac(key, entry)
            entries.append(entry)
        mark = {"index": len(entries), "event": KEYED, "legacy_entries": len(legacy),
                "legacy_head": legacy[-1]["hash"], "prev": prev}
        mark["mac"] = entry_mac(key, mark)
        entries.append(mark)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._write_head(len(entries), mark["mac"])
        log.warning("privacy ledger in %s converted to a keyed chain (%d entries; key %s)", self.directory,
                    len(legacy), self.key_path.name)
        return entries
