"""The supervisor of a coordinator or a site, as a process of its own.

`fedlora coordinator start` and `fedlora site start` supervise for as long as
the coordinator or the site runs. The `fedlora` command imports torch (through
fedlora.config), which a supervisor never uses: half a gigabyte resident at
every site for nothing. So the command replaces itself (os.execv: the same
pid, for the pid file and for systemd) with `python -m fedlora.deploy.supervise
WHAT DIR`, which imports only the deployment modules it runs.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from fedlora import logs
from fedlora.deploy import coordinator, site
from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome
from fedlora.deploy.site_home import SiteError, SiteHome

WHAT = ("coordinator", "site")


def exec_supervisor(what: str, folder: str) -> NoReturn:
    """Become the supervisor of `what` in `folder` (this process's pid, environment and working directory)."""
    if what not in WHAT:
        raise ValueError(f"nothing to supervise: {what!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: the working directory (the site's own, writable folder under systemd) is not put on sys.path
    os.execv(sys.executable, [sys.executable, "-P", "-m", __name__, what, folder])


def load_home(what: str, folder: str) -> CoordinatorHome | SiteHome:
    """The coordinator's or the site's folder, loaded."""
    return (CoordinatorHome if what == "coordinator" else SiteHome).load(folder)


def main(argv: list[str]) -> int:
    what, folder = argv
    logs.setup(propagate=False)
    try:
        return (coordinator.start if what == "coordinator" else site.start)(load_home(what, folder))
    except (CoordinatorError, SiteError, RuntimeError, FileNotFoundError) as err:
        print(f"fedlora {what} start: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
