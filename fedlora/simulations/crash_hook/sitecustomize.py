"""TEST ONLY: make a site's SuperNode die at a chosen point of a round (fedlora.simulations.crashes).

Python imports `sitecustomize` at the start of every process that has this
folder on PYTHONPATH. Here it acts only in a `flower-supernode` process whose
environment sets FEDLORA_TEST_SUPERNODE_DIES=point@n: that SuperNode SIGKILLs
itself, as a crash or a power cut would end it, when its n-th train message
reaches `point` (fedlora.flower.SUPERNODE_POINTS).
"""

import os
import signal
import sys

_SPEC = os.environ.get("FEDLORA_TEST_SUPERNODE_DIES", "")

if _SPEC and sys.argv and os.path.basename(sys.argv[0]) == "flower-supernode":
    from fedlora import flower

    _POINT, _, _NTH = _SPEC.partition("@")

    def _die(point: str, n: int) -> None:
        if point == _POINT and n == int(_NTH):
            print(f"TEST CRASH: the SuperNode dies at '{point}' of train message {n}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    flower.watch_supernode(_die)
