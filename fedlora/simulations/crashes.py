"""TEST ONLY: start a deployed site whose SuperNode dies at a chosen point of a round.

    LoopbackFederation.start_site(name, env=crash_env("replied", 1))

The site's SuperNode then SIGKILLs itself when its first train message is at
that point (fedlora.flower.SUPERNODE_POINTS): "received" (before training),
"trained" (training done, the reply still at the site, its ClientApp alive),
"replied" (the reply at the coordinator, its data not uploaded). The hook is a
`sitecustomize` module on PYTHONPATH (crash_hook/), so the site runs the real
`fedlora site start` and the real `flower-supernode`; production code has no
switch for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedlora.flower import SUPERNODE_POINTS

HOOK = Path(__file__).with_name("crash_hook")


def crash_env(point: str, nth: int = 1) -> dict[str, str]:
    """Environment for a site whose SuperNode dies when its `nth` train message reaches `point`."""
    if point not in SUPERNODE_POINTS:
        raise ValueError(f"{point!r}: not one of {', '.join(SUPERNODE_POINTS)}")
    path = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FEDLORA_TEST_SUPERNODE_DIES": f"{point}@{nth}"}
