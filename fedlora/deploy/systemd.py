"""systemd units for a coordinator and a site, written by `fedlora coordinator|site init`.

    DIR/systemd/fedlora-coordinator.service      runs `fedlora coordinator start --dir DIR`
    DIR/systemd/fedlora-site-NAME.service        runs `fedlora site start --dir DIR`

A unit runs the `fedlora` of the environment that wrote it, as an unprivileged
account, restarts it when it fails (a crashed site comes back on its own), and
stops every process of the service together (the SuperLink, the SuperNode, the
site worker and the Flower app processes live in the service's control group).
It is sandboxed: the whole file system is read-only to it except its folder,
no privilege can be gained, no capability is held (but binding a listen port
under 1024), only IP and Unix sockets can be opened. Install:

    sudo cp DIR/systemd/fedlora-coordinator.service /etc/systemd/system/
    sudo systemctl daemon-reload && sudo systemctl enable --now fedlora-coordinator

The settings are checked by tests/test_deploy_systemd.py with
`systemd-analyze verify` and `systemd-analyze security --offline=true`.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedlora.flower import FLOWER_ENV

# `fedlora site start`'s exit code when the coordinator does not accept the site's key (sysexits'
# EX_CONFIG): the unit does not restart on it, since a restart cannot help.
SITE_NOT_ACCEPTED = 78

FOLDER = "systemd"
DEFAULT_USER = "fedlora"       # the account a root-owned folder's service runs as
RESTART_SEC = 15               # between a failure and the restart
STOP_TIMEOUT_SEC = 45          # SIGTERM to SIGKILL; fedlora itself waits 15 s + 5 s for its children
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))  # what ProtectHome= hides
TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))                    # what PrivateTmp= hides
ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]*[$]?$", re.I)


class UnitError(ValueError):
    pass


@dataclass(frozen=True)
class Unit:
    name: str     # e.g. fedlora-coordinator.service
    path: Path    # where it was written, DIR/systemd/NAME
    user: str
    group: str


def install_hint(path: Path) -> str:
    """What the administrator runs to install a unit file and start its service."""
    return (f"sudo cp {path} /etc/systemd/system/ && sudo systemctl daemon-reload && "
            f"sudo systemctl enable --now {Path(path).stem}")


def fedlora_executable() -> Path:
    """The `fedlora` command of the running environment (a unit must not depend on PATH)."""
    return Path(sys.executable).parent / "fedlora"


def check_account_name(user: str) -> None:
    if not ACCOUNT.match(user) or user == "root" or user.isdigit():
        raise UnitError(f"--service-user {user!r}: give the name of an unprivileged account (not root)")


def service_account(folder: Path, user: str | None = None) -> tuple[str, str]:
    """(user, group) the service runs as: `user`, else the folder's owner unless that is root, else
    `fedlora`. The group is the user's primary group when the account exists, else its name."""
    if user is None:
        try:
            owner = pwd.getpwuid(Path(folder).stat().st_uid).pw_name
        except KeyError:
            owner = "root"
        user = owner if owner != "root" else DEFAULT_USER
    check_account_name(user)
    try:
        group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        group = user
    return user, group


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    path = Path(os.path.abspath(path))
    return any(path == root or root in path.parents for root in roots)


def _account_home(user: str) -> Path | None:
    try:
        return Path(pwd.getpwnam(user).pw_dir)
    except KeyError:
        return None


def _quote(value: str, command: bool = False) -> str:
    """One word for systemd: quoted when it holds a space or a quote, specifiers (%) escaped,
    and in a command line variable references ($) too."""
    text = value.replace("%", "%%").replace("$", "$$" if command else "$")
    if re.search(r'[\s"\'\\;]', text) or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_text(description: str, command: list[str], folder: Path, user: str, group: str, *,
              writable: list[Path] = (), readable: list[Path] = (), devices: bool = False,
              bind_low_port: bool = False, environment: dict[str, str] | None = None) -> str:
    """A hardened [Service] for `command` (run in `folder`). `writable`: folders besides `folder`
    the service writes; `readable`: what it must read (the data file, the model cache), which
    decides ProtectHome= and PrivateTmp=; `devices`: keep /dev (a GPU); `bind_low_port`: it
    listens on a port below 1024."""
    folder = Path(folder)
    executable = Path(command[0])
    rw = [folder, *dict.fromkeys(Path(p) for p in writable if not _under(Path(p), (folder,)))]
    needed = [*rw, *(Path(p) for p in readable), executable, executable.resolve(), Path(sys.prefix)]
    home = _account_home(user)
    if home is not None:
        needed.append(home)  # its ~/.cache/huggingface may hold the base model
    protect_home = "read-only" if any(_under(p, HOME_ROOTS) for p in needed) else "yes"
    private_tmp = "no" if any(_under(p, TMP_ROOTS) for p in needed) else "yes"
    env = {**FLOWER_ENV, "HF_HUB_OFFLINE": "1", **(environment or {})}
    exec_start = " ".join(_quote(arg, command=True) for arg in command)
    capability = "CAP_NET_BIND_SERVICE" if bind_low_port else ""
    lines = [
        "# Written by `fedlora ... init` (fedlora/deploy/systemd.py; docs/deployment.md). Install:",
        "#   sudo cp THIS_FILE /etc/systemd/system/ && sudo systemctl daemon-reload",
        "#   sudo systemctl enable --now THIS_SERVICE      logs: journalctl -u THIS_SERVICE, and "
        f"{folder}/logs/",
        "[Unit]",
        f"Description={description}",
        "Wants=network-online.target",
        "After=network-online.target",
        "# Never give up restarting: a site must come back after the coordinator or the network does.",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={group}",
        f"WorkingDirectory={str(folder).replace('%', '%%')}",
        f"ExecStart={exec_start}",
        "Environment=" + " ".join(_quote(f"{k}={v}") for k, v in env.items()),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# 78: the coordinator does not accept the site's key; restarting cannot help.",
        f"RestartPreventExitStatus={SITE_NOT_ACCEPTED}",
        "# Every process of the service (SuperLink or SuperNode, proxy, worker, Flower app",
        "# processes) is in its control group and is stopped with it.",
        "KillMode=control-group",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_SEC}",
        "",
        "# Sandbox: the file system is read-only but for the folder; no privilege can be gained.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=" + " ".join(_quote(str(p)) for p in rw),
        f"ProtectHome={protect_home}" + ("" if protect_home == "yes" else
                                          "  # the folder, fedlora's environment, the data or the model "
                                          "cache is under a home directory"),
        f"PrivateTmp={private_tmp}" + ("" if private_tmp == "yes" else "  # the folder or the data is under /tmp"),
        f"PrivateDevices={'no' if devices else 'yes'}" + ("  # the GPU's device nodes (/dev/nvidia*)"
                                                           if devices else ""),
        "PrivateMounts=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "UMask=0077",
        f"CapabilityBoundingSet={capability}",
        *([f"AmbientCapabilities={capability}  # listens on a port below 1024"] if capability else []),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    # systemd takes a comment only on a line of its own: move trailing comments above their setting.
    out: list[str] = []
    for line in lines:
        setting, sep, comment = line.partition("  # ")
        if sep and not line.startswith("#"):
            out += [f"# {comment}", setting]
        else:
            out.append(line)
    return "\n".join(out)


def write_unit(folder: Path, name: str, text: str, user: str, group: str) -> Unit:
    path = Path(folder) / FOLDER / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("THIS_FILE", str(path)).replace("THIS_SERVICE", name.removesuffix(".service")))
    return Unit(name, path, user, group)


def _model_cache() -> list[Path]:
    """Where the base model may be read from besides the service account's home."""
    return [Path(os.environ[k]) for k in ("HF_HOME", "HF_HUB_CACHE") if os.environ.get(k)]


def _cache_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("HF_HOME", "HF_HUB_CACHE") if os.environ.get(k)}


def coordinator_unit(home, user: str | None = None, executable: Path | None = None) -> Unit:
    """Write DIR/systemd/fedlora-coordinator.service for a CoordinatorHome."""
    user, group = service_account(home.path, user)
    port = int(home.listen.rpartition(":")[2])  # HOST:PORT, checked when the home was loaded
    command = [str(executable or fedlora_executable()), "coordinator", "start", "--dir", str(home.path)]
    text = unit_text("fedlora coordinator (Flower SuperLink and Fleet-only proxy)", command, home.path, user,
                     group, writable=[home.database.parent, home.runs, home.models], readable=_model_cache(),
                     bind_low_port=port < 1024, environment=_cache_env())
    return write_unit(home.path, "fedlora-coordinator.service", text, user, group)


def site_unit_name(name: str) -> str:
    return "fedlora-site-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".service"


def site_unit(home, user: str | None = None, gpu: bool = False, executable: Path | None = None) -> Unit:
    """Write DIR/systemd/fedlora-site-NAME.service for a SiteHome; `gpu`: let it reach the GPU."""
    user, group = service_account(home.path, user)
    command = [str(executable or fedlora_executable()), "site", "start", "--dir", str(home.path)]
    # Flower's SuperNode and ClientApp processes keep their files in FLWR_HOME (default ~/.flwr,
    # read-only here): give them a folder inside the site folder.
    env = {"FLWR_HOME": str(home.path / "flwr-home"), **_cache_env()}
    text = unit_text(f"fedlora site {home.name} (Flower SuperNode and site worker)", command, home.path, user,
                     group, writable=[home.state], readable=[home.data_path, *_model_cache()], devices=gpu,
                     environment=env)
    return write_unit(home.path, site_unit_name(home.name), text, user, group)
