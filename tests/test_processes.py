"""What a supervisor leaves behind when it is killed outright, and how `stop` finds it."""

import os
import subprocess
import sys
import time

import psutil

from fedlora.processes import (
    SUPERVISOR_MARK,
    leftovers,
    running_pid,
    signal_pid_file,
    stop_leftovers,
    write_pid_file,
)

# A child that starts a grandchild in a session of its own (as Flower's SuperLink starts its SuperExec),
# which ignores SIGTERM (as an orphaned flwr-clientapp did), then waits.
DETACHING_CHILD = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True); "
                   "time.sleep(600)")


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_detached_orphan_that_ignores_sigterm_is_found_by_its_mark_and_ended(tmp_path):
    home, other = tmp_path / "site", tmp_path / "other-site"
    child = subprocess.Popen([sys.executable, "-c", DETACHING_CHILD],
                             env={**os.environ, SUPERVISOR_MARK: str(home.resolve())})
    try:
        _wait_for(lambda: len(leftovers(home)) == 2)
        child.kill()  # its parent dies: the grandchild is orphaned, in another session, ignoring SIGTERM
        child.wait()
        [orphan] = leftovers(home)
        assert orphan.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        assert os.getsid(orphan.pid) != os.getsid(0) and leftovers(other) == []
        assert stop_leftovers(home, timeout=1.0) == [orphan.pid]  # SIGTERM ignored: SIGKILL after the timeout
        _wait_for(lambda: _gone(orphan.pid))
        assert leftovers(home) == []
    finally:
        child.kill()
        for proc in leftovers(home):
            proc.kill()


def test_a_pid_file_names_a_running_supervisor_only_while_it_runs(tmp_path):
    pid_file = tmp_path / "state" / "site.pid"
    assert running_pid(pid_file) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pid_file.parent.mkdir()
        pid_file.write_text(f"{sleeper.pid} {psutil.Process(sleeper.pid).create_time():.3f}\n")
        assert running_pid(pid_file) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert running_pid(pid_file) is None  # a stale file after a kill -9
    write_pid_file(pid_file)
    assert running_pid(pid_file) is None  # the caller itself is not "another" supervisor


def test_a_pid_file_whose_pid_now_names_another_process_is_not_trusted(tmp_path):
    """After a reboot or a kill -9 the pid may be reused: stop must not signal that process."""
    pid_file = tmp_path / "coordinator.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = psutil.Process(other.pid).create_time()
        pid_file.write_text(f"{other.pid} {started - 3600:.3f}\n")  # the same pid, another process's start
        assert running_pid(pid_file) is None and signal_pid_file(pid_file) is None
        assert other.poll() is None  # not signalled
        pid_file.write_text(f"{other.pid} {started:.3f}\n")
        assert running_pid(pid_file) == other.pid
        pid_file.write_text(f"{other.pid}\n")  # an earlier fedlora's pid file: only a fedlora process counts
        assert running_pid(pid_file) is None
    finally:
        other.kill()
        other.wait()


def test_a_supervisors_files_are_made_private_and_so_is_what_it_creates_later(tmp_path):
    from fedlora.deploy.permissions import make_private

    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    db, wal = state / "superlink.db", state / "sub" / "superlink.db-wal"
    for path in (db, wal):
        path.write_text("x")
        path.chmod(0o644)
    previous = os.umask(0o022)
    try:
        make_private(state, tmp_path / "missing")
        assert {oct(p.stat().st_mode & 0o777) for p in (db, wal)} == {"0o600"}
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        created = subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'later.log')!r}, 'w')"])
        assert created.returncode == 0 and oct((tmp_path / "later.log").stat().st_mode & 0o777) == "0o600"
    finally:
        os.umask(previous)
