"""Which sites may connect: their public keys, registered with the SuperLink.

The coordinator keeps each accepted key as `sites/NAME.pub` and the Flower node
id it was registered under in `sites/registry.json`. Registration itself goes
through the SuperLink's Control API on loopback (`flwr supernode register`), so
a key can be registered only on the coordinator host. A key accepted while the
SuperLink is down is registered by the next `fedlora coordinator start`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome
from fedlora.deploy.flwr_cli import FlowerCommandFailed, call_json
from fedlora.deploy.keys import fingerprint, load_public_key
from fedlora.processes import port_open

log = logging.getLogger(__name__)

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _registry_path(home: CoordinatorHome) -> Path:
    return home.sites / "registry.json"


def read_registry(home: CoordinatorHome) -> dict[str, dict]:
    path = _registry_path(home)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_registry(home: CoordinatorHome, registry: dict[str, dict]) -> None:
    path = _registry_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True))
    tmp.replace(path)


def superlink_running(home: CoordinatorHome) -> bool:
    return port_open("127.0.0.1", home.superlink_port)


def _register_with_flower(home: CoordinatorHome, name: str, key_file: Path) -> int:
    try:
        reply = call_json(home.flwr_home, "supernode", "register", str(key_file), "--name", name)
    except FlowerCommandFailed as err:
        if "already in use" in str(err):  # the SuperLink keeps every key it ever registered
            raise FlowerCommandFailed(f"site {name}: the SuperLink already holds this key (registered before, "
                                      "perhaps under another name, or revoked): a key is registered once; "
                                      "the site makes a new key pair") from err
        raise
    return int(reply["node-id"])


def _key_material(path: Path) -> list[str]:
    return Path(path).read_text().split()[:2]  # "ecdsa-sha2-nistp384 AAAA...", without the comment


def _revoked_copy(home: CoordinatorHome, public_key: Path) -> Path | None:
    """The archived copy of `public_key` if it was revoked before."""
    material = _key_material(public_key)
    for old in sorted((home.sites / "revoked").glob("*.pub")):
        if _key_material(old) == material:
            return old
    return None


def _unregister_with_flower(home: CoordinatorHome, node_id: int) -> None:
    call_json(home.flwr_home, "supernode", "unregister", str(node_id))


def add_site(home: CoordinatorHome, name: str, public_key: Path, replace: bool = False) -> str:
    """Accept a site's public key; register it now if the SuperLink runs. Returns a status line."""
    if not SITE_NAME.match(name):
        raise CoordinatorError(f"site name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    try:
        load_public_key(public_key)
    except (ValueError, OSError) as err:
        raise CoordinatorError(f"{public_key}: not a usable site key: {err}") from None
    target = home.sites / f"{name}.pub"
    revoked = _revoked_copy(home, public_key)
    if revoked is not None:
        raise CoordinatorError(f"this key was revoked ({revoked.relative_to(home.path)}) and is never accepted "
                               f"again: the site makes a new key pair (`fedlora site init`, or `ssh-keygen -t ecdsa "
                               f"-b 384 -N '' -f keys/site.key`) and sends the new .pub")
    registry = read_registry(home)
    if target.exists() and not replace:
        if _key_material(target) == _key_material(public_key):
            return f"site {name}: this key is already accepted ({fingerprint(target)})"
        raise CoordinatorError(f"site {name} already has another key; pass --replace to rotate it")
    old = registry.get(name)
    if old and replace:
        _archive(home, name)
    home.sites.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, target)
    registry[name] = {"fingerprint": fingerprint(target), "accepted": _now()}
    _write_registry(home, registry)
    status = f"site {name}: key {registry[name]['fingerprint']} accepted"
    if old and old.get("node_id") is not None:
        _revoke(home, int(old["node_id"]))
    if superlink_running(home):
        node_id = _register_with_flower(home, name, target)
        registry[name]["node_id"] = node_id
        _write_registry(home, registry)
        return status + f" and registered (node {node_id})"
    return status + "; it is registered when `fedlora coordinator start` runs"


def remove_site(home: CoordinatorHome, name: str) -> str:
    """Revoke a site: unregister its key (if the SuperLink runs) and archive it."""
    registry = read_registry(home)
    if name not in registry and not (home.sites / f"{name}.pub").exists():
        raise CoordinatorError(f"no site named {name!r}")
    entry = registry.pop(name, {})
    _archive(home, name)
    _write_registry(home, registry)
    if entry.get("node_id") is not None and not _revoke(home, int(entry["node_id"])):
        return f"site {name}: key revoked; the SuperLink forgets it when `fedlora coordinator start` runs"
    return f"site {name}: key revoked"


def sync(home: CoordinatorHome) -> tuple[list[str], list[str]]:
    """Unregister revoked keys, register every accepted key the SuperLink does not know yet.
    Returns what was done, and one line per accepted key that could not be registered."""
    lines = [f"unregistered revoked node {node_id}" for node_id in _pending(home) if _revoke(home, node_id)]
    problems = []
    registry = read_registry(home)
    known = {int(n["node-id"]) for n in call_json(home.flwr_home, "supernode", "list").get("nodes", [])
             if n.get("status") != "unregistered"}
    for key_file in sorted(home.sites.glob("*.pub")):
        name = key_file.stem
        entry = registry.setdefault(name, {"fingerprint": fingerprint(key_file), "accepted": _now()})
        if entry.get("node_id") is not None and int(entry["node_id"]) in known:
            continue
        try:
            entry["node_id"] = _register_with_flower(home, name, key_file)
            lines.append(f"registered site {name} (node {entry['node_id']})")
        except FlowerCommandFailed as err:
            problems.append(f"site {name} cannot connect: its key is not registered: {err}")
    _write_registry(home, registry)
    return lines, problems


def _pending_path(home: CoordinatorHome) -> Path:
    return home.sites / "pending-revocations.json"


def _pending(home: CoordinatorHome) -> list[int]:
    path = _pending_path(home)
    return json.loads(path.read_text()) if path.exists() else []


def _revoke(home: CoordinatorHome, node_id: int) -> bool:
    """Unregister a node now, or remember to at the next start. True when done now."""
    pending = [n for n in _pending(home) if n != node_id]
    done = superlink_running(home)
    if done:
        try:
            _unregister_with_flower(home, node_id)
        except FlowerCommandFailed as err:  # already unknown to the SuperLink: nothing left to revoke
            log.warning("unregistering node %d: %s", node_id, err)
    else:
        pending.append(node_id)
    _pending_path(home).write_text(json.dumps(pending))
    return done


def _archive(home: CoordinatorHome, name: str) -> None:
    key = home.sites / f"{name}.pub"
    if key.exists():
        archive = home.sites / "revoked"
        archive.mkdir(exist_ok=True)
        key.replace(archive / f"{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.pub")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
