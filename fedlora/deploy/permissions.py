"""Files of a coordinator or a site that only their own account may read.

The SuperLink's database (and its write-ahead log) holds the sites' updates in
flight, a site's state folder holds its privacy ledger and its key, and the
logs name sites and rounds: none of it is for the machine's other users.
`fedlora coordinator start` and `fedlora site start` set the umask, which every
process they start inherits, so what is created from then on is private, and
restrict what an earlier version left readable.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077


def make_private(*folders: Path) -> None:
    """Files created from now on by this process and its children are private; the `folders`
    and everything in them are made so too (group and others lose every permission)."""
    os.umask(PRIVATE_UMASK)
    for folder in dict.fromkeys(Path(f) for f in folders):
        if not folder.exists():
            continue
        for path in [folder, *folder.rglob("*")]:
            try:
                if path.is_symlink() or path.is_socket():
                    continue
                mode = stat.S_IMODE(path.stat().st_mode)
                if mode & 0o077:
                    path.chmod(mode & ~0o077)
            except OSError as err:  # another account's file, or one removed meanwhile: say so, go on
                log.warning("could not make %s private: %s", path, err.strerror or err)
