"""Files a site keeps for itself (training snapshots, review outputs, secrets): written whole or not
at all, readable by the site's account only, and durable before the call returns."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file of its own, fsynced, then a rename), mode 600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 600, a name no other writer has
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def secret(path: Path, nbytes: int = 32) -> bytes:
    """The random secret in `path`, made on first use. Made whole before it appears (a hard link of a
    finished file), so two processes starting together agree on one secret and neither reads half of it."""
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(nbytes))
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        finally:
            Path(tmp).unlink(missing_ok=True)
    value = bytes.fromhex(path.read_text().strip())
    if len(value) != nbytes:
        raise ValueError(f"{path.name}: not a {nbytes}-byte secret; remove it to make a new one")
    return value
