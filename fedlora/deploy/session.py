"""A site's session at the coordinator, across crashes and restarts.

The SuperLink holds a site "online" until two heartbeat intervals (60 s in
Flower 1.42) pass without a heartbeat, and refuses to activate the same key
again meanwhile: a site restarted right after a crash would be turned away for
up to a minute, and the coordinator would keep waiting for replies from the
dead instance. So a starting site first ends its previous session itself: a
Fleet `deactivate-node` call signed with its key (the same authenticated call
a SuperNode makes when it shuts down cleanly). The node id comes from the
SuperNode's log of the previous start, remembered in the state folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fedlora import flower
from fedlora.deploy.site_home import SiteHome

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
PRECONDITION_FAILED = 412  # the SuperLink's answer when the node is not online: nothing to end
UNAUTHORIZED = 401         # its answer to a signature by a key it does not hold (unknown or revoked)
NODE_ID_LINE = re.compile(rb"SuperNode ID: (\d+)")


def remember_node_id(home: SiteHome, log_file: Path, offset: int) -> int | None:
    """The node id the SuperLink gave this start (from the SuperNode's log after `offset`), saved."""
    if not log_file.exists():
        return None
    found = NODE_ID_LINE.findall(log_file.read_bytes()[offset:])
    if not found:
        return None
    node_id = int(found[-1])
    (home.state / NODE_ID_FILE).write_text(f"{node_id}\n")
    return node_id


def _end_session(home: SiteHome, node_id: int) -> tuple[int | None, Exception | None]:
    """End `node_id`'s session with the site's signed Fleet call: (None, None) when ended, else the
    HTTP status the coordinator answered (None when it could not be reached) and the error."""
    client = flower.fleet_client(home.superlink, str(home.root_certificates), home.private_key.read_bytes())
    try:
        flower.deactivate_node(client, node_id)
        return None, None
    except Exception as err:  # noqa: BLE001 - the caller decides what each answer means
        return getattr(getattr(err, "response", None), "status_code", None), err
    finally:
        client.close()


def _last_node_id(home: SiteHome) -> int | None:
    path = home.state / NODE_ID_FILE
    return int(path.read_text()) if path.exists() else None


def end_stale_session(home: SiteHome) -> bool:
    """Deactivate this site's previous session at the coordinator; True if one was ended."""
    node_id = _last_node_id(home)
    if node_id is None:
        return False
    status, err = _end_session(home, node_id)
    if err is None:
        log.info("ended this site's previous session at the coordinator")
        return True
    if status == PRECONDITION_FAILED:  # the usual case: the previous session ended cleanly
        log.debug("the previous session had ended (%s)", err)
    else:  # offline already, coordinator down: start anyway
        log.info("could not end a previous session at the coordinator (%s); starting anyway", err)
    return False


def key_accepted(home: SiteHome) -> bool | None:
    """Whether the coordinator still accepts this site's key, asked with the same signed call:
    False when it answers 401 (it holds no such key: unregistered or revoked), True when it
    authenticated the call (whatever else it answered), None when it could not be asked."""
    status, err = _end_session(home, _last_node_id(home) or 0)
    if err is None:
        return True
    return None if status is None else status != UNAUTHORIZED
