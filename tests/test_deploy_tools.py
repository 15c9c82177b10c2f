"""Deployment tooling without a federation: certificates, site keys, folders and commands,
the data check, the site worker protocol, fault injection."""

import json
import os
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedlora import config as cfg
from fedlora.arrays import check_update
from fedlora.cli import main as fedlora_main
from fedlora.simulations import faults
from fedlora.deploy.data_check import check_data, format_report
from fedlora.deploy.site import supernode_command
from fedlora.deploy.keys import fingerprint, generate_key_pair, load_public_key
from fedlora.deploy.site_home import SiteHome, init_site
from fedlora.data.pii import find_identifiers, mask
from fedlora.deploy.certificates import certificate_names, create_tls, renew_server_cert
from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome, init_coordinator
from fedlora.deploy.coordinator import superlink_command
from fedlora.deploy.pki import handshake
from fedlora.deploy.registry import add_site, read_registry, remove_site


# -- certificates ------------------------------------------------------------------------
def test_certificates_name_the_hosts_and_verify_against_the_ca(tmp_path):
    files = create_tls(tmp_path, ["fl.example.org", "10.0.0.5"])
    assert set(certificate_names(files.server_cert)) == {"fl.example.org", "10.0.0.5", "localhost", "127.0.0.1"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for name in ("127.0.0.1", "fl.example.org"):
        handshake(files, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, "other.example.org")


def test_renewed_server_certificate_is_new_and_still_trusted(tmp_path):
    files = create_tls(tmp_path, ["a.example.org"])
    old_key = files.server_key.read_bytes()
    renew_server_cert(files, ["b.example.org"])
    assert files.server_key.read_bytes() != old_key
    assert "b.example.org" in certificate_names(files.server_cert)
    handshake(files, "b.example.org")


# -- site keys ---------------------------------------------------------------------------------
def test_site_key_pair_is_what_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    public = generate_key_pair(tmp_path / "site.key", comment="hospital-a")
    private = load_ssh_private_key((tmp_path / "site.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().strip().endswith("hospital-a")
    assert load_public_key(public).public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(public)  # `flwr supernode register` loads it
    assert fingerprint(public).startswith("SHA256:")
    with pytest.raises(FileExistsError):
        generate_key_pair(tmp_path / "site.key")


# -- folders and commands -----------------------------------------------------------------------
def test_coordinator_folder_and_superlink_command(tmp_path):
    assert fedlora_main(["coordinator", "init", str(tmp_path / "c"), "--host", "fl.example.org",
                         "--listen", "127.0.0.1:19092", "--superlink-port", "19093"]) == 0
    home = CoordinatorHome.load(tmp_path / "c")
    assert home.listen == "127.0.0.1:19092" and home.hosts == ["fl.example.org"]
    assert "fl.example.org" in certificate_names(home.tls.server_cert)
    skeleton = cfg.load_config(home.path / "run.toml")  # the run skeleton is a valid configuration
    assert skeleton.task.labels and skeleton.privacy.enabled
    command = superlink_command(home)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile",
                 "--ssl-keyfile", "--ssl-ca-certfile", "--database"):
        assert flag in command
    assert "--insecure" not in command
    assert command[command.index("--host") + 1] == "127.0.0.1"  # Control API never on the network
    assert command[command.index("--port") + 1] == "19093"
    connection = tomllib.loads((home.flwr_home / "config.toml").read_text())["superlink"]["fedlora"]
    assert connection["address"] == "127.0.0.1:19093" and Path(connection["root-certificates"]) == home.tls.ca_cert
    with pytest.raises(CoordinatorError, match="already holds"):
        init_coordinator(tmp_path / "c", [])


def test_site_folder_node_config_and_supernode_command(tmp_path):
    coord = init_coordinator(tmp_path / "c", ["fl.example.org"])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "chest pain", "label": "cardiology"}\n')
    assert fedlora_main(["site", "init", str(tmp_path / "s"), "--name", "hospital-a", "--data", str(data),
                         "--superlink", "fl.example.org:9092", "--ca", str(coord.tls.ca_cert),
                         "--epsilon", "3", "--runtime-port", "19111"]) == 0
    home = SiteHome.load(tmp_path / "s")
    node = home.flower_node_config()
    assert node["data-path"] == str(data.resolve()) and node["site"] == "hospital-a"
    assert node["privacy-epsilon"] == 3.0 and node["privacy-delta"] == 1e-5  # the DP colleague's key names
    assert node["privacy-epsilon-per-run"] == 0.75 and node["privacy-per-run"] == "refuse"  # a quarter per run
    assert node["state-dir"] == str(home.path / "state") and node["worker-socket"].endswith("worker.sock")
    command = supernode_command(home)
    assert command[command.index("--superlink") + 1] == "fl.example.org:9092"
    assert command[command.index("--port") + 1] == "19111" and command[command.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" not in command and "--root-certificates" in command
    assert command[command.index("--auth-supernode-private-key") + 1] == str(home.private_key)
    written = tomllib.loads(Path(command[command.index("--node-config") + 1]).read_text())
    assert written == node
    no_budget = init_site(tmp_path / "s2", "hospital-b", data, "fl.example.org:9092", coord.tls.ca_cert,
                          epsilon=None)
    assert not {"privacy-epsilon", "privacy-epsilon-per-run"} & set(no_budget.flower_node_config())


def test_register_site_while_the_superlink_is_down_then_revoke(tmp_path):
    coord = init_coordinator(tmp_path / "c", [], "127.0.0.1:19192", 19193)
    pub = generate_key_pair(tmp_path / "k" / "site.key")
    assert "registered when" in add_site(coord, "hospital-a", pub)
    assert (coord.sites / "hospital-a.pub").read_text() == pub.read_text()
    assert read_registry(coord)["hospital-a"]["fingerprint"] == fingerprint(pub)
    assert "already accepted" in add_site(coord, "hospital-a", pub)
    other = generate_key_pair(tmp_path / "k" / "other.key")
    with pytest.raises(CoordinatorError, match="--replace"):
        add_site(coord, "hospital-a", other)
    with pytest.raises(CoordinatorError, match="site name"):
        add_site(coord, "bad name!", pub)
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x\n")
    with pytest.raises(CoordinatorError, match="not a usable site key"):
        add_site(coord, "hospital-b", tmp_path / "rsa.pub")
    assert "revoked" in remove_site(coord, "hospital-a")
    assert not (coord.sites / "hospital-a.pub").exists() and list((coord.sites / "revoked").iterdir())
    # A revoked key is never accepted again, under any name, and the refusal says what the site does.
    for name in ("hospital-a", "hospital-c"):
        with pytest.raises(CoordinatorError, match="revoked .* new key pair"):
            add_site(coord, name, pub)


# -- data check ------------------------------------------------------------------------------------
def test_data_check_reports_every_kind_of_problem_with_line_numbers(tmp_path):
    base = "Seen today, a 55 year old man with crushing chest pain radiating to the left arm since this morning"
    rows = [
        {"text": base, "label": "cardiology"},                                   # 1
        {"text": base, "label": "cardiology"},                                   # 2 exact duplicate of 1
        {"text": base.replace("55", "56") + ".", "label": "neurology"},           # 3 near duplicate, other label
        {"text": "", "label": "cardiology"},                                     # 4 empty
        {"label": "cardiology"},                                                 # 5 schema: no text
        "not json",                                                              # 6 schema: not JSON
        {"text": "word " * 300, "label": "orthopedics"},                         # 7 over-long
        {"text": "Contact jane.doe@example.org, DOB: 03/04/1961, MRN 12345678", "label": "cardiology"},  # 8
        {"text": "Numb right hand after a fall on an outstretched arm", "label": "dermatology"},          # 9
    ]
    path = tmp_path / "site.jsonl"
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    report = check_data(path, labels=["cardiology", "neurology", "orthopedics"], max_length=256)
    assert [line for line, _ in report.schema_errors] == [5, 6]
    assert report.empty == [4]
    assert [line for line, _ in report.too_long] == [7]
    assert report.exact_duplicates == [[1, 2]]
    assert report.near_duplicates == [[1, 2, 3]]
    assert report.conflicting_labels == [([1, 2, 3], ["cardiology", "neurology"])]
    assert {kind: [line for line, _ in hits] for kind, hits in report.identifiers.items()} == {
        "email": [8], "date of birth": [8], "medical record number": [8]}
    assert report.unknown_labels == {"dermatology": 1}
    assert report.labels["cardiology"] == 3
    text = format_report(report, 256)
    assert "jane.doe@example.org" not in text and "12345678" not in text  # identifiers are masked
    assert "email: 1 — lines 8 (20 characters)" in text and "ja**" not in text
    assert "line 6: not valid JSON" in text and "Nothing was sent anywhere" in text
    assert fedlora_main(["site", "check-data", str(path)]) == 1  # unusable rows: non-zero exit


def test_data_check_of_a_clean_file_passes(tmp_path):
    texts = ["crushing chest pain on exertion", "sudden weakness of the left arm and slurred speech",
             "swollen ankle after a twisting fall", "black stools and upper abdominal pain",
             "productive cough with fever for a week", "palpitations at rest with dizziness",
             "worst headache of her life this morning", "knee gives way when climbing stairs",
             "vomiting blood after heavy drinking", "wheeze and breathlessness at night"]
    rows = [{"text": t, "label": "a" if i % 2 else "b"} for i, t in enumerate(texts)]
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_data(path).problems == 0
    assert fedlora_main(["site", "check-data", str(path), "--strict"]) == 0


def test_identifier_patterns_flag_identifiers_not_clinical_numbers():
    def kinds(text):
        return [f.kind for f in find_identifiers(text)]

    assert kinds("mail jo@x.org") == ["email"]
    assert kinds("call +44 20 7946 0958") == ["phone number"]
    assert kinds("SSN 123-45-6789") == ["US social security number"]
    assert kinds("NHS 943 476 5919") == ["NHS number"]       # valid checksum
    assert kinds("ref 943 476 5918") == ["phone number"]     # invalid NHS checksum: only a long number
    assert kinds("date of birth 1961-03-04") == ["date of birth"]
    assert kinds("passport no. X1234567") == ["national id"]
    assert kinds("BP 120/80, HR 72, temp 37.5, 3 days, 2 x 500 mg, age 55") == []
    # North-American numbers, in the ways they are written
    for phone in ("call (617) 555-0142", "617-555-0142", "617.555.0142", "+1 617 555 0142", "+1 (617) 555-0142",
                  "1-617-555-0142", "(617)555-0142", "tel 617 555 0142."):
        assert kinds(phone) == ["phone number"], phone
    # ... and clinical numbers that look a little like them
    for clinical in ("Na 135-145 mmol/L, K 3.5-5.1", "BP 145/95 mmHg, O2 3.5-4.5 L/min", "(100) 200-3000",
                     "seen 2023-01-15 at 10.30", "ICD-10 I21.4, CPT 99213", "weight 72.5 kg, EF 55-60%",
                     "platelets 150-400 x10^9/L", "lot 212-555-01428", "v617-555-0142", "dose 0.5 mg/kg q6h"):
        assert kinds(clinical) == [], clinical
    # A report may be shared: it shows the kind and the length, no character of the identifier.
    assert mask("jane@example.org") == "16 characters"
    assert mask("(617) 555-0142") == "14 characters"


# -- fault injection and the site worker -------------------------------------------------------------
def test_every_injected_fault_is_caught_by_the_update_check():
    reference = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    assert faults.parse("nan@1, shape@3") == {1: "nan", 3: "shape"}
    with pytest.raises(ValueError, match="test-fault"):
        faults.parse("explode@1")
    for kind in faults.KINDS:
        assert check_update(faults.corrupt(reference, kind), reference) is not None, kind
    assert check_update(reference, reference) is None


@pytest.fixture()
def inprocess_run(tmp_path, tiny_bert_dir):
    """A real ServerApp run over Flower-serialized messages in this process, sites answered by
    the relay ClientApp (optionally through a site worker on a Unix socket)."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from fedlora.simulations.faults import relay_app
    from fedlora.server.app import main
    from fedlora.simulations.inprocess import RUN_ID, InProcessGrid
    from fedlora.data.labels import infer_labels

    def run(node_configs: list[dict], rounds: int, name: str, *settings: str) -> Path:
        out = tmp_path / name
        config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32",
                                        f"federation.num-sites={len(node_configs)}", f"federation.rounds={rounds}",
                                        "federation.min-sites=2", "data.records-per-site=24",
                                        "train.local-steps=1", "train.batch-size=8", f'output.dir="{out}"',
                                        *settings])
        flat = infer_labels(config).to_flat()
        grid = InProcessGrid(relay_app, flat, len(node_configs))
        for context, extra in zip(grid.contexts.values(), node_configs):
            context.node_config.update(extra)
        main(grid, Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                           run_config=flat))
        return out

    return run


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_broken_updates_of_every_kind_are_rejected_and_the_others_aggregated(inprocess_run, caplog):
    # Sites 0 and 1 each send a different broken update every round; sites 2 and 3 are aggregated.
    schedule = [{"test-fault": "nan@1,extra-key@2,norm@3"}, {"test-fault": "inf@1,missing-key@2,shape@3"}, {}, {}]
    with caplog.at_level("WARNING", logger="fedlora"):
        out = inprocess_run(schedule, rounds=3, name="faults")
    rows = _rows(out)
    assert [(r["round"], r["sites"], r["rejected"]) for r in rows] == [(1, 2, 2), (2, 2, 2), (3, 2, 2)]
    rejected = "\n".join(r.message for r in caplog.records if "rejected the update" in r.message)
    for reason in ("contains NaN or Inf", "unexpected ['base_model.injected.weight']", "update norm",
                   "missing ['", "shape"):
        assert reason in rejected, reason
    assert all(np.isfinite(r["train_loss"]) for r in rows)


@pytest.fixture()
def worker_sockets():
    """Three site workers, each serving on its own Unix socket in a thread of this process."""
    from fedlora.deploy.worker import serve

    sockets = [Path(f"/tmp/fedlora-test-{os.getpid()}-{i}.sock") for i in range(3)]  # AF_UNIX paths are short
    for path in sockets:
        threading.Thread(target=serve, args=(path,), daemon=True).start()
    for path in sockets:
        _wait_for_socket(path)
    yield sockets
    for path in sockets:
        path.unlink(missing_ok=True)


def test_site_workers_started_together_bind_private_sockets_and_leave_the_umask_alone():
    # The workers once set a restrictive umask around bind(): started concurrently they
    # left the whole process at 0o177, so every folder it made later was unusable.
    from fedlora.deploy.worker import serve

    umask = os.umask(0o022)
    os.umask(umask)
    folder = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))  # AF_UNIX paths are short
    sockets = [folder / f"w{i}.sock" for i in range(4)]
    for path in sockets:
        threading.Thread(target=serve, args=(path,), daemon=True).start()
    for path in sockets:
        _wait_for_socket(path)
    now = os.umask(umask)
    assert now == umask
    for path in sockets:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in sockets)  # no staging folder left
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sockets[0]))  # the renamed socket is the one being served
    shutil.rmtree(folder)


def test_relay_answers_through_the_site_worker_and_keeps_the_model_loaded(inprocess_run, worker_sockets, tmp_path):
    nodes = [{"worker-socket": str(path), "state-dir": str(tmp_path / f"state{i}")}
             for i, path in enumerate(worker_sockets[:2])]
    out = inprocess_run(nodes, rounds=2, name="worker")
    assert [r["round"] for r in _rows(out)] == [1, 2]
    timings = [json.loads(x) for x in (tmp_path / "state0" / "timings.jsonl").read_text().splitlines()]
    assert [t["type"] for t in timings] == ["query", "train", "evaluate", "train", "evaluate"]  # forecast first
    assert all(t["mode"] == "worker" for t in timings)
    timings = timings[1:]  # without DP the forecast needs no model: the first train loads it
    assert all(t["load_seconds"] < 0.5 for t in timings[1:])  # loaded by the first train message only
    assert timings[0]["train_seconds"] > 0


def test_secure_aggregation_through_the_site_worker_keeps_the_secrets_in_the_context(inprocess_run, worker_sockets,
                                                                                      tmp_path):
    # The SecAgg+ stages keep each site's private keys and shares in context.state between
    # messages: the worker must hand the updated state back, or the later stages fail.
    nodes = [{"worker-socket": str(path)} for path in worker_sockets]
    out = inprocess_run(nodes, 1, "secagg", "secagg.enabled=true", "federation.min-sites=3",
                        "secagg.max-weight=100")
    assert [(r["round"], r["sites"]) for r in _rows(out)] == [(1, 3)]


def _wait_for_socket(path: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(str(path)) == 0:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"no worker on {path}")


def test_relay_without_a_worker_runs_the_message_itself(inprocess_run, tmp_path):
    nodes = [{"worker-socket": str(tmp_path / "nobody.sock"), "state-dir": str(tmp_path / f"s{i}")} for i in range(2)]
    out = inprocess_run(nodes, rounds=1, name="fallback")
    assert [r["sites"] for r in _rows(out)] == [2]
    timings = [json.loads(x) for x in (tmp_path / "s0" / "timings.jsonl").read_text().splitlines()]
    assert {t["mode"] for t in timings} == {"in-process"} and "import_seconds" in timings[0]


def test_run_needs_a_running_coordinator_and_the_label_list(tmp_path, capsys):
    from fedlora.deploy.submit import resolve

    from fedlora.processes import free_ports

    listen, superlink = free_ports(2)  # nothing listens there
    home = init_coordinator(tmp_path / "c", [], f"127.0.0.1:{listen}", superlink)
    assert fedlora_main(["run", "--dir", str(home.path), "--set", "task.labels=a,b"]) == 1
    assert "not running" in capsys.readouterr().err
    with pytest.raises(cfg.ConfigError, match="task.labels"):
        resolve(home, cfg.load_config(None, []), None, resume=False)
    config, out = resolve(home, cfg.load_config(None, ["task.labels=a,b"]), None, resume=True)
    assert out.parent == home.runs and config.output.dir == str(out) and config.output.resume
    assert config.privacy.ledger_heads == str(home.ledger_heads)  # one record of the sites' ledgers, across runs


def test_the_supernodes_flower_exit_code_is_read_from_its_log(tmp_path):
    """flower-supernode exits with status 1 on every error; which one (305: not activated) is in its log."""
    from fedlora.deploy.site import REFUSED, flower_exit_code

    log = tmp_path / "supernode.log"
    log.write_bytes(b"ERROR : Exit Code: 305\nFailed to activate SuperNode.\n")
    start = log.stat().st_size
    assert flower_exit_code(log, 0, 1) == REFUSED
    assert flower_exit_code(log, start, 1) == 1  # that was an earlier start's
    assert flower_exit_code(log, 0, 0) == 0 and flower_exit_code(log, 0, -9) == -9  # no error: the status stands


def test_a_broken_log_stream_does_not_end_a_run_that_goes_on_at_the_coordinator(tmp_path, monkeypatch, capsys):
    """`flwr run --stream` can end while the run goes on (Flower's Control API fails under load); the
    run's status at the coordinator then decides whether `fedlora run` keeps following it."""
    from fedlora.deploy import submit

    statuses = iter(["running", "running", "finished:completed"])
    asked = []

    def run_status(flwr_home, run_id):
        asked.append(run_id)
        status = next(statuses)
        if status == "boom":
            raise submit.FlowerCommandFailed("no answer")
        return status

    monkeypatch.setattr(submit, "run_status", run_status)
    home = init_coordinator(tmp_path / "c", [], "127.0.0.1:1", 2)
    out = tmp_path / "run"
    out.mkdir()
    watch = submit.StatusWatch(home, out, every=0.0)
    assert watch(None) is False and asked == []  # no run id yet: nothing to ask
    assert watch("7") is True and watch("7") is True
    assert "the log stream from the coordinator ended, but run 7 is not finished" in capsys.readouterr().out
    assert watch("7") is False and asked == ["7", "7", "7"]  # finished
    statuses = iter(["boom"] * submit.UNANSWERED_LIMIT)
    lost = submit.StatusWatch(home, out, every=0.0)
    # the API that broke the stream may not answer for a while: the run goes on until it never does
    assert [lost("7") for _ in range(submit.UNANSWERED_LIMIT)] == [True] * (submit.UNANSWERED_LIMIT - 1) + [False]
    quiet = submit.StatusWatch(home, out, every=3600.0)
    statuses = iter(["running"])
    assert quiet("8") is True and quiet("8") is True and asked[-1] == "8" and asked.count("8") == 1  # asked once
    (out / "summary.json").write_text("{}")
    assert quiet("8") is False  # the run wrote its summary: done, whatever the status says


def test_a_resumed_run_is_followed_under_its_new_run_id(tmp_path):
    """The log of a resumed run directory still holds the previous attempt's run id."""
    from fedlora.deploy import submit

    log, out = tmp_path / "flower.log", tmp_path / "out"
    out.mkdir()
    log.write_text("Successfully started run 111\nlogs of the first attempt\n")
    offset = log.stat().st_size
    assert submit._run_id(log, out, offset) is None  # the new attempt has printed nothing yet
    with log.open("a") as f:
        f.write("Successfully started run 222\n")
    assert submit._run_id(log, out, offset) == "222" and submit._run_id(log, out) == "222"
    assert json.loads((out / submit.RUN_RECORD).read_text())["run_id"] == "222"
