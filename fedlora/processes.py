"""Start and stop the processes fedlora supervises (SuperLink, SuperNode, site worker, a simulation's
SuperLink), wait for their ports, and find free ones.

Children are started so that they die with their supervisor even when it is
killed outright (Linux: the parent-death signal), and stopped together with
every process they started (Flower's SuperExec, ServerApp and ClientApp
processes, Ray's workers), so that a stopped coordinator, site or simulation
leaves nothing behind.

Flower detaches some of its processes (the SuperLink starts its SuperExec in a
session of its own) and leaves others orphaned when their parent dies (a
ClientApp whose SuperNode crashed), so neither the process tree nor the
process group finds them all. A supervisor therefore marks its own environment
with its folder (`mark_supervisor`); every process it starts, and every process
those start, inherits the mark, and `leftovers` finds them by it, whoever their parent is
now: after a `kill -9` of the supervisor, `stop` and the next `start` end them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_child(command: list[str], log: IO, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start a supervised child process that receives SIGTERM if its supervisor dies."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            preexec_fn=preexec)  # noqa: PLW1509 - called before any thread starts


def _family(pid: int) -> list[psutil.Process]:
    """A process, its descendants, and when it leads a process group (a child started with
    start_new_session) every other member of that group: a descendant that lost its parent."""
    try:
        root = psutil.Process(pid)
        family = {root, *root.children(recursive=True)}
        if os.getpgid(pid) == pid:
            for proc in psutil.process_iter():
                try:
                    if os.getpgid(proc.pid) == pid:
                        family.add(proc)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
    except (psutil.NoSuchProcess, ProcessLookupError):
        return []
    return list(family)


def _signal_all(procs: list[psutil.Process], kill: bool) -> None:
    for proc in procs:
        try:
            proc.kill() if kill else proc.terminate()
        except psutil.NoSuchProcess:
            pass


def _terminate(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM `procs`, then SIGKILL what is left after `timeout`."""
    _signal_all(procs, kill=False)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    _signal_all(alive, kill=True)
    psutil.wait_procs(alive, timeout=5)


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process and all its descendants, then SIGKILL what is left after `timeout`."""
    _terminate(_family(pid), timeout)


def kill_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a process and all its descendants at once, as a crash would end them."""
    procs = _family(pid)
    _signal_all(procs, kill=True)
    psutil.wait_procs(procs, timeout=timeout)


SUPERVISOR_MARK = "FEDLORA_SUPERVISOR_HOME"  # environment variable every supervised process inherits


def mark_supervisor(home: Path) -> None:
    """Mark this process's environment, which its children inherit, as the supervisor of `home`."""
    os.environ[SUPERVISOR_MARK] = str(Path(home).resolve())


def leftovers(home: Path) -> list[psutil.Process]:
    """Every live process started, directly or not, by the supervisor of `home` (by its environment mark)."""
    mark = str(Path(home).resolve())
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(SUPERVISOR_MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass  # gone, or another user's: not ours
    return found


def stop_leftovers(home: Path, timeout: float = 15.0) -> list[int]:
    """SIGTERM what `leftovers` finds, SIGKILL what ignores it after `timeout`; returns their pids."""
    procs = leftovers(home)
    _terminate(procs, timeout)
    return [p.pid for p in procs]


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago."""
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, process: subprocess.Popen | None = None, timeout: float = 60.0,
                  what: str = "the process") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before opening {host}:{port}")
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not open {host}:{port} within {timeout:.0f}s")


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so a supervisor stops its children before it exits."""
    signal.signal(signal.SIGTERM, _interrupt)


def write_pid_file(path: Path) -> None:
    """This process's pid and start time: a pid alone may name another process after a reboot or a kill -9."""
    me = psutil.Process()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{me.pid} {me.create_time():.3f}\n")


def running_pid(path: Path) -> int | None:
    """The pid in a pid file when that same process (same start time) still runs and is not the caller."""
    if not path.exists():
        return None
    fields = path.read_text().split()
    pid = int(fields[0]) if fields and fields[0].isdigit() else 0
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if len(fields) > 1:
            same = abs(proc.create_time() - float(fields[1])) < 1.0
        else:  # a pid file of an earlier fedlora: at least a fedlora process
            same = any("fedlora" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
    return pid if same else None


def signal_pid_file(path: Path, sig: int = signal.SIGTERM) -> int | None:
    """Send `sig` to the process named in a pid file; returns its pid, or None if none is running."""
    pid = running_pid(path)
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended just now
            return None
    return pid


def end_previous(pid_file: Path, home: Path, what: str) -> list[int]:
    """Before a supervisor of `home` starts: refuse while the one in `pid_file` still runs, and end
    what a previous one killed outright left running (it may hold the ports). Returns their pids."""
    if (pid := running_pid(pid_file)) is not None:
        raise RuntimeError(f"this {what} is already running (pid {pid}); `fedlora {what} stop` stops it")
    ended = stop_leftovers(home)
    if ended:
        log.warning("stopped %d process(es) left running by a %s that did not stop cleanly (pids %s)",
                    len(ended), what, ", ".join(map(str, ended)))
    return ended


def stop_supervisor(pid_file: Path, home: Path, timeout: float = 60.0) -> tuple[int | None, list[int]]:
    """Stop the supervisor named in `pid_file` (SIGTERM; it stops its children), wait for it, then end
    whatever it left behind (its children when it was killed outright). Returns its pid (None when
    it was not running) and the pids of the leftovers ended."""
    pid = signal_pid_file(pid_file)
    if pid is not None:
        try:
            psutil.Process(pid).wait(timeout=timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pid, stop_leftovers(home)
