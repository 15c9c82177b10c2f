"""The systemd units `fedlora coordinator|site init` write: valid for systemd, hardened, restarting.

`systemd-analyze verify` and `systemd-analyze security --offline=true` (systemd >= 252) run
unprivileged, without a running systemd; where the command is missing these tests skip,
unless FEDLORA_REQUIRE_SYSTEMD is set (CI), where they fail.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedlora.cli import main as fedlora_main
from fedlora.deploy.coordinator_home import CoordinatorHome, init_coordinator
from fedlora.deploy.site_home import init_site
from fedlora.deploy.systemd import fedlora_executable, service_account, site_unit_name, unit_text
from fedlora.flower import FLOWER_ENV

# `systemd-analyze security --offline=true` of the coordinator unit measured 1.7-1.9 ("OK") with
# systemd 252 (site: 1.7); fail if a change loosens the sandbox past this.
MAX_EXPOSURE = 2.5


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("FEDLORA_REQUIRE_SYSTEMD"):
            pytest.fail("systemd-analyze is missing and FEDLORA_REQUIRE_SYSTEMD is set (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (a key may repeat)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                          dict_type=_MultiDict, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return {name: {k: v if isinstance(v, list) else [v] for k, v in parser[name].items()}
            for name in parser.sections()}


class _MultiDict(dict):
    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def _one(unit: dict, section: str, key: str) -> str:
    return unit[section][key][-1]


@pytest.fixture()
def homes(tmp_path):
    coord = init_coordinator(tmp_path / "c", ["fl.example.org"], service_user="fedlora-svc")
    data = tmp_path / "data" / "notes.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "chest pain", "label": "cardiology"}\n')
    site = init_site(tmp_path / "s", "hospital-a", data, "fl.example.org:9092", coord.tls.ca_cert,
                     service_user="fedlora-svc")
    return coord, site


def test_init_writes_units_that_restart_stop_every_process_and_are_sandboxed(homes):
    coord, site = homes
    for path, command in ((coord.path / "systemd" / "fedlora-coordinator.service", "coordinator"),
                          (site.path / "systemd" / "fedlora-site-hospital-a.service", "site")):
        unit = _unit(path)
        service = unit["Service"]
        assert _one(unit, "Service", "ExecStart") == f"{fedlora_executable()} {command} start --dir {path.parents[1]}"
        assert Path(_one(unit, "Service", "ExecStart").split()[0]).is_absolute()
        assert _one(unit, "Service", "User") == "fedlora-svc" and _one(unit, "Service", "Group") == "fedlora-svc"
        assert _one(unit, "Service", "Restart") == "on-failure" and int(_one(unit, "Service", "RestartSec")) > 0
        assert _one(unit, "Unit", "StartLimitIntervalSec") == "0"  # never gives up coming back
        assert _one(unit, "Service", "KillMode") == "control-group"
        assert _one(unit, "Service", "KillSignal") == "SIGTERM"
        assert int(_one(unit, "Service", "TimeoutStopSec")) >= 25  # fedlora waits 15 s + 5 s for its children
        hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateDevices": "yes",
                     "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                     "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes",
                     "RestrictRealtime": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
                     "CapabilityBoundingSet": ""}
        assert {k: _one(unit, "Service", k) for k in hardening} == hardening
        assert "AmbientCapabilities" not in service
        assert _one(unit, "Service", "ReadWritePaths").split() == [str(path.parents[1])]
        # tmp_path is under /tmp: a private /tmp would hide the folder, so the unit keeps the real one
        assert _one(unit, "Service", "PrivateTmp") == "no"
        assert _one(unit, "Service", "ProtectHome") in ("yes", "read-only")
        env = dict(re.findall(r'"?([A-Z_]+)=([^" ]*)"?', " ".join(service["Environment"])))
        assert {k: env.get(k) for k in FLOWER_ENV} == FLOWER_ENV and env["HF_HUB_OFFLINE"] == "1"
        assert _one(unit, "Install", "WantedBy") == "multi-user.target"
    site_env = " ".join(_unit(site.path / "systemd" / "fedlora-site-hospital-a.service")["Service"]["Environment"])
    assert f"FLWR_HOME={site.path / 'flwr-home'}" in site_env  # ~/.flwr is read-only to the service


def test_unit_choices_follow_the_folder_the_port_and_the_gpu(tmp_path):
    exe = fedlora_executable()
    srv = unit_text("x", [str(exe), "coordinator", "start", "--dir", "/srv/fedlora"], Path("/srv/fedlora"),
                    "fedlora", "fedlora", readable=[Path("/data/notes.jsonl")])
    assert "\nPrivateTmp=yes\n" in srv  # nothing it needs is under /tmp
    protect = "read-only" if any(str(p).startswith(("/home", "/root")) for p in (exe, exe.resolve())) else "yes"
    assert f"\nProtectHome={protect}\n" in srv
    home = unit_text("x", [str(exe)], Path("/home/it/fedlora"), "it", "it")
    assert "\nProtectHome=read-only\n" in home and "\nReadWritePaths=/home/it/fedlora\n" in home
    low = unit_text("x", [str(exe)], Path("/srv/fedlora"), "fedlora", "fedlora", bind_low_port=True)
    assert "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in low and "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in low
    gpu = unit_text("x", [str(exe)], Path("/srv/fedlora"), "fedlora", "fedlora", devices=True)
    assert "\nPrivateDevices=no\n" in gpu
    spaced = unit_text("x", [str(exe), "--dir", "/srv/fed lora 100%"], Path("/srv/fed lora 100%"), "u", "u")
    assert 'ExecStart=' + str(exe) + ' --dir "/srv/fed lora 100%%"' in spaced
    assert '\nReadWritePaths="/srv/fed lora 100%%"\n' in spaced


def test_service_account_defaults_to_the_folder_owner_never_root(tmp_path):
    owner = tmp_path.stat().st_uid
    user, _ = service_account(tmp_path)
    assert user == ("fedlora" if owner == 0 else __import__("pwd").getpwuid(owner).pw_name)
    assert service_account(tmp_path, "svc-fl") == ("svc-fl", "svc-fl")  # an account not created yet
    for bad in ("root", "0", "a b", "x;rm"):
        with pytest.raises(ValueError, match="unprivileged account"):
            service_account(tmp_path, bad)


def test_coordinator_on_a_low_port_gets_only_the_bind_capability(tmp_path, capsys):
    assert fedlora_main(["coordinator", "init", str(tmp_path / "c"), "--listen", "0.0.0.0:443",
                         "--service-user", "fedlora"]) == 0
    printed = capsys.readouterr().out
    unit = tmp_path / "c" / "systemd" / "fedlora-coordinator.service"
    assert f"sudo cp {unit} /etc/systemd/system/" in printed
    assert "sudo systemctl enable --now fedlora-coordinator" in printed
    parsed = _unit(unit)
    assert _one(parsed, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert _one(parsed, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert fedlora_main(["coordinator", "init", str(tmp_path / "c2"), "--service-user", "root"]) == 1
    assert "unprivileged account" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()  # refused before anything was written


def test_site_init_with_gpu_and_odd_names(tmp_path, capsys):
    coord = init_coordinator(tmp_path / "c", [])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "x", "label": "y"}\n')
    assert fedlora_main(["site", "init", str(tmp_path / "s"), "--name", "St. Mary's/ICU", "--data", str(data),
                         "--superlink", "fl.example.org:9092", "--ca", str(coord.tls.ca_cert), "--gpu"]) == 0
    name = site_unit_name("St. Mary's/ICU")
    assert name == "fedlora-site-St.-Mary-s-ICU.service"
    assert f"enable --now {name.removesuffix('.service')}" in capsys.readouterr().out
    assert _one(_unit(tmp_path / "s" / "systemd" / name), "Service", "PrivateDevices") == "no"


def test_units_pass_systemd_analyze_verify(homes, tmp_path):
    analyze = _systemd_analyze()
    coord, site = homes
    units = [coord.path / "systemd" / "fedlora-coordinator.service",
             site.path / "systemd" / "fedlora-site-hospital-a.service"]
    # A low port, a GPU, a folder with a space: the variants verify too.
    spaced = init_coordinator(tmp_path / "c d", [], "0.0.0.0:443")
    units.append(spaced.path / "systemd" / "fedlora-coordinator.service")
    for unit in units:
        # --man=no: no man pages in the image; ExecStart= must exist and be executable, which verify checks.
        done = subprocess.run([analyze, "verify", "--man=no", "--generators=no", str(unit)],
                              capture_output=True, text=True, timeout=60)
        said = (done.stdout + done.stderr).strip()
        assert done.returncode == 0 and said == "", f"{unit}: {said}"
    broken = tmp_path / "broken.service"
    broken.write_text(units[0].read_text().replace(str(fedlora_executable()), "/nonexistent/fedlora")
                      + "\n[Service]\nProtectHome=maybe\n")
    done = subprocess.run([analyze, "verify", "--man=no", "--generators=no", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert "not executable" in done.stderr and "protect home" in done.stderr  # the check does check


def _exposure(analyze: str, unit: Path) -> float:
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    said = done.stdout + done.stderr
    if "offline" in said and "unrecognized option" in said:
        pytest.skip("this systemd-analyze has no --offline (systemd < 252)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", said)
    assert match, said[-2000:]
    return float(match.group(1))


def test_units_security_exposure_stays_low(tmp_path):
    analyze = _systemd_analyze()
    exe = fedlora_executable()
    # Where a hospital puts them: /srv, not under /tmp (a private /tmp would then be off).
    text = unit_text("fedlora coordinator", [str(exe), "coordinator", "start", "--dir", "/srv/fedlora"],
                     Path("/srv/fedlora"), "fedlora", "fedlora")
    site_text = unit_text("fedlora site", [str(exe), "site", "start", "--dir", "/srv/fedlora-site"],
                          Path("/srv/fedlora-site"), "fedlora", "fedlora", readable=[Path("/data/notes.jsonl")])
    scores = {}
    for name, body in (("fedlora-coordinator.service", text), ("fedlora-site-a.service", site_text)):
        (tmp_path / name).write_text(body)
        scores[name] = _exposure(analyze, tmp_path / name)
    print(json.dumps(scores))
    assert all(score <= MAX_EXPOSURE for score in scores.values()), scores


def test_coordinator_home_still_loads_with_its_unit(homes):
    coord, _ = homes
    assert CoordinatorHome.load(coord.path).listen == coord.listen
