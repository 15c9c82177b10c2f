"""A site's privacy ledger: an append-only JSON-lines file, each entry chained to the
previous one by SHA-256.

The ledger is both the audit trail a privacy officer reads and the site's
accountant state: the spend is recomputed from its entries, so there is no second
copy that could disagree. A head file (entry count and last hash) makes truncation
detectable too; a ledger that fails verification is never trusted (the site
refuses to train). Every append is fsynced before it returns, so a spend is on
disk before the update it pays for leaves the site.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

GENESIS = "0" * 64


class LedgerTampered(RuntimeError):
    """The ledger's hash chain or head does not verify."""


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        return entries[-1]["hash"] if entries else GENESIS

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain `record` to the last entry, write it durably, return the stored entry."""
        with self._locked():
            entries = self._verified()
            entry = {"index": len(entries), **record,
                     "prev": entries[-1]["hash"] if entries else GENESIS}
            entry["hash"] = entry_hash(entry)
            created = not self.path.exists()
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._write_head(len(entries) + 1, entry["hash"])
            if created:
                _fsync_dir(self.directory)
            return entry

    # -- internals --------------------------------------------------------------
    def _write_head(self, count: int, last_hash: str) -> None:
        tmp = self.head_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump({"count": count, "hash": last_hash}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.head_path)
        _fsync_dir(self.directory)

    def _read_head(self) -> dict[str, Any] | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            return {"count": int(head["count"]), "hash": str(head["hash"])}
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerTampered(f"{self.head_path}: unreadable ({err})") from None

    def _verified(self) -> list[dict[str, Any]]:
        head = self._read_head()
        if not self.path.exists():
            if head is not None and head["count"] > 0:
                raise LedgerTampered(f"{self.path} is missing but {self.head_path} records "
                                     f"{head['count']} entries")
            return []
        entries: list[dict[str, Any]] = []
        prev = GENESIS
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise LedgerTampered(f"{self.path}, line {lineno}: not valid JSON") from None
            if entry.get("index") != len(entries) or entry.get("prev") != prev:
                raise LedgerTampered(f"{self.path}, line {lineno}: breaks the chain (entry removed, "
                                     "reordered or inserted)")
            if entry.get("hash") != entry_hash(entry):
                raise LedgerTampered(f"{self.path}, line {lineno}: hash mismatch (entry edited)")
            entries.append(entry)
            prev = entry["hash"]
        if head is None:
            if entries:
                raise LedgerTampered(f"{self.head_path} is missing for a ledger of {len(entries)} entries")
            return entries
        # A crash between the ledger fsync and the head update leaves the head one
        # entry behind: the extra entry verifies and only adds spend, so it is kept.
        behind = len(entries) - head["count"]
        if behind < 0 or behind > 1 or (head["count"] and entries[head["count"] - 1]["hash"] != head["hash"]):
            raise LedgerTampered(f"{self.path} has {len(entries)} entries but {self.head_path} records "
                                 f"{head['count']} ending in {head['hash'][:12]}: entries were removed")
        if behind == 1:
            self._write_head(len(entries), entries[-1]["hash"])
        return entries
