"""The deployment commands of `fedlora`: `coordinator ...`, `site ...` and `run`.

Each command parses its arguments here and calls one module that does the
work (in fedlora.deploy).
Step-by-step use: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora import config as cfg
from fedlora.data import drift, synthetic
from fedlora.data.readers import DataError
from fedlora.deploy import nginx, review_page, supervise
from fedlora.deploy.certificates import certificate_names, renew_server_cert
from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome, init_coordinator
from fedlora.deploy.flwr_cli import FlowerCommandFailed
from fedlora.deploy.pki import OwnTls, own_pki
from fedlora.deploy.registry import add_site, remove_site
from fedlora.deploy.site_drift import DriftCheckError
from fedlora.deploy.site_drift import check as drift_check_site
from fedlora.deploy.site_home import SiteError, SiteHome, init_site, public_key_line
from fedlora.deploy.submit import RELAY_CLIENTAPP, RunFailed, submit
from fedlora.deploy.systemd import UnitError, install_hint, site_unit_name
from fedlora.model_sources import ModelLoadError
from fedlora.server import drift_check
from fedlora.processes import stop_supervisor

RAW = argparse.RawDescriptionHelpFormatter


def _fail(command: str, err: Exception) -> int:
    print(f"fedlora {command}: {err}", file=sys.stderr)
    return 1


# -- coordinator --------------------------------------------------------------
def _own_tls(args: argparse.Namespace) -> OwnTls | None:
    """--ca-cert, --server-cert and --server-key: all three (the hospital's PKI) or none (a new CA)."""
    given = [args.ca_cert, args.server_cert, args.server_key]
    if not any(given):
        return None
    if not all(given):
        missing = [f for f, v in zip(("--ca-cert", "--server-cert", "--server-key"), given) if not v]
        raise CoordinatorError(f"your own certificates need --ca-cert, --server-cert and --server-key together; "
                               f"missing {', '.join(missing)}")
    return OwnTls(Path(args.ca_cert), Path(args.server_cert), Path(args.server_key))


def _coordinator_init(args: argparse.Namespace) -> int:
    try:
        own_tls = _own_tls(args)
        home = init_coordinator(args.dir, args.host or [], args.listen, args.superlink_port, args.proxy,
                                own_tls=own_tls, service_user=args.service_user)
    except CoordinatorError as err:
        return _fail("coordinator init", err)
    names = ", ".join(args.host) if args.host else "loopback only (add --host for the names sites use)"
    unit = home.path / "systemd" / "fedlora-coordinator.service"
    keep = ("  certificates:     your PKI's (renew server.crt there; no CA key here)\n" if own_tls else
            f"  keep offline:     {home.tls.ca_key} (needed only to issue a new server certificate)\n")
    print(f"coordinator folder {home.path}\n"
          f"  certificate for: {names}\n"
          f"  give every site:  {home.tls.ca_cert}\n"
          f"{keep}"
          f"  edit:             {home.path / 'coordinator.toml'}, {home.path / 'run.toml'}\n"
          f"  run as a service: {install_hint(unit)}\n"
          f"next: fedlora coordinator register-site NAME KEY.pub --dir {home.path}")
    return 0


def _coordinator_renew(args: argparse.Namespace) -> int:
    try:
        home = CoordinatorHome.load(args.dir)
        if own_pki(home.tls):
            return _fail("coordinator renew-certificate", CoordinatorError(
                f"{home.tls.server_cert} comes from your own PKI (see {home.tls.server_cert.parent / 'own-pki.txt'}): "
                "renew it there, naming the same hosts plus localhost and 127.0.0.1, copy the new server.crt and "
                "server.key into that folder (key mode 600), and restart the coordinator"))
        renew_server_cert(home.tls, args.host or home.hosts)
    except (CoordinatorError, FileNotFoundError) as err:
        return _fail("coordinator renew-certificate", err)
    print(f"new server certificate for {', '.join(certificate_names(home.tls.server_cert))}; "
          "restart the coordinator to use it (sites keep their ca.crt)")
    return 0


def _coordinator_register(args: argparse.Namespace) -> int:
    return _report("coordinator register-site",
                   lambda home: add_site(home, args.name, Path(args.key), args.replace), args.dir)


def _coordinator_unregister(args: argparse.Namespace) -> int:
    return _report("coordinator unregister-site", lambda home: remove_site(home, args.name), args.dir)


def _report(command: str, action, folder: str) -> int:
    """Run `action(coordinator folder)` and print the line it returns, or the error."""

    try:
        print(action(CoordinatorHome.load(folder)))
    except (CoordinatorError, FlowerCommandFailed) as err:
        return _fail(command, err)
    return 0


# -- site ---------------------------------------------------------------------
def _site_init(args: argparse.Namespace) -> int:
    try:
        home = init_site(args.dir, args.name, Path(args.data), args.superlink, Path(args.ca),
                         None if args.no_privacy_budget else args.epsilon, args.delta, args.runtime_port,
                         args.epsilon_per_run, key=Path(args.key) if args.key else None,
                         service_user=args.service_user, gpu=args.gpu)
    except (SiteError, FileExistsError, UnitError) as err:
        return _fail("site init", err)
    unit = home.path / "systemd" / site_unit_name(home.name)
    print(f"site folder {home.path}\n"
          f"  send to the coordinator: {public_key_line(home)}\n"
          f"  never share:             {home.private_key}\n"
          f"  edit:                    {home.path / 'site.toml'}\n"
          f"  run as a service:        {install_hint(unit)}\n"
          f"next: fedlora site check-data {home.data_path}   then   fedlora site start --dir {home.path}")
    return 0


def _site_sample_data(args: argparse.Namespace) -> int:
    """`fedlora site sample-data OUT`: one site's share of the synthetic corpus, to try a deployment."""
    try:
        rows = synthetic.records("drifted" if args.drifted else "original", args.site, args.sites, args.records,
                                 seed=args.seed, alpha=None if args.iid else args.alpha)
    except ValueError as err:
        return _fail("site sample-data", err)
    out = Path(args.out)
    if out.exists() and not args.force:
        return _fail("site sample-data", FileExistsError(f"{out} exists (--force overwrites it)"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} {'drifted ' if args.drifted else ''}synthetic notes (site {args.site} of "
          f"{args.sites}) to {out}\n"
          f"labels: {','.join(synthetic.LABELS)}")
    return 0


def _site_check_data(args: argparse.Namespace) -> int:
    # Imported here alone: its tokenizer brings transformers and peft (4 s), which no other
    # deployment command needs, so `fedlora site stop` and the rest start without them.
    from fedlora.deploy.data_check import check_data, format_report, report_json


    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    try:
        report = check_data(Path(args.path), args.task, args.text_column, args.label_column, labels,
                            args.max_length, args.tokenizer)
    except DataError as err:
        return _fail("site check-data", err)
    print(format_report(report, args.max_length))
    if args.json:
        Path(args.json).write_text(report_json(report))
    return 1 if report.schema_errors or (args.strict and report.problems) else 0


def _site_drift(args: argparse.Namespace) -> int:
    """`fedlora site drift`: the site's data now against its last training snapshot; exit 3 when
    retraining is due (for cron or a systemd timer), 1 when the check cannot run."""
    limits = drift.Thresholds(psi=args.psi, chi2_p=args.chi2_p, js=args.js, unseen=args.unseen,
                              accuracy_drop=args.accuracy_drop, max_age_days=args.max_age_days)
    try:
        home = None if args.data and args.state else SiteHome.load(args.dir)
        report = drift_check_site(args.data or home.data_path, args.state or home.state, limits,
                                  adapter=args.adapter, config_file=args.config, model=args.model,
                                  labelled=args.labelled, text_column=args.text_column,
                                  label_column=args.label_column, baseline_accuracy=args.baseline_accuracy)
    except (SiteError, DriftCheckError, ModelLoadError, OSError, ValueError) as err:
        return _fail("site drift", err)
    print(report.text())
    if args.json:
        Path(args.json).write_text(json.dumps(report.upstream(), indent=2) + "\n")
    return drift.DUE_EXIT if report.verdict.due else 0


# -- start / stop (coordinator and site alike) ------------------------------------
def _start(args: argparse.Namespace) -> int:
    try:
        supervise.load_home(args.what, args.dir)  # a bad folder is reported here, before anything is replaced
    except (CoordinatorError, SiteError, FileNotFoundError) as err:
        return _fail(f"{args.what} start", err)
    supervise.exec_supervisor(args.what, args.dir)  # does not return: the supervisor runs in this pid


def _stop(args: argparse.Namespace) -> int:
    """Stop the supervisor and wait for it; end whatever a supervisor killed outright left running."""
    try:
        home = supervise.load_home(args.what, args.dir)
    except (CoordinatorError, SiteError) as err:
        return _fail(f"{args.what} stop", err)
    pid, leftovers = stop_supervisor(home.pid_file, home.path)
    if isinstance(home, CoordinatorHome):
        leftovers += nginx.end_leftover(home)
    print(f"stopped the {args.what} (pid {pid})" if pid else f"the {args.what} was not running")
    if leftovers:
        print(f"stopped {len(leftovers)} process(es) it had left running (pids {', '.join(map(str, leftovers))})")
    return 0


def _site_review(args: argparse.Namespace) -> int:
    """Serve the blind review page of the site's held-out rows on this machine until Ctrl-C."""
    try:
        state = Path(args.state) if args.state else supervise.load_home("site", args.dir).state
    except SiteError as err:
        return _fail("site review", err)
    if not state.is_dir():
        return _fail("site review", FileNotFoundError(f"{state}: no such state folder"))
    review_page.serve(state, args.port)
    return 0


# -- run ----------------------------------------------------------------------
def run_command(args: argparse.Namespace, clientapp: str = RELAY_CLIENTAPP) -> int:
    """`fedlora run`: submit a run with `clientapp` as the sites' ClientApp."""

    try:
        home = CoordinatorHome.load(args.dir)
    except CoordinatorError as err:
        return _fail("run", err)
    out = Path(args.out) if args.out else None
    if args.resume and out is None:
        print("fedlora run: --resume needs --out, the run directory to continue", file=sys.stderr)
        return 2
    config_file = args.config
    if config_file is None and args.resume and (out / "config.toml").exists():
        config_file = out / "config.toml"  # continue with the configuration the run started with
    config = cfg.load_config(config_file, list(args.set or []))
    try:
        out = submit(home, config, out, args.resume, clientapp)
    except (RunFailed, DataError, ModelLoadError) as err:
        return _fail("run", err)
    except KeyboardInterrupt:
        return 130
    if config.federation.drift_check:  # for cron and systemd timers: the verdict, and 3 when retraining is due
        report = json.loads((out / drift_check.DRIFT_FILE).read_text())
        print("\n".join(drift_check.lines(report)))
        return drift_check.exit_code(report)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `coordinator`, `site` and `run` on the main parser's subcommands."""
    dir_help = "the coordinator folder (default: the current folder)"

    coord = sub.add_parser("coordinator", help="run the consortium's aggregator (Flower SuperLink)",
                           formatter_class=RAW, description=(
                               "The coordinator: a private CA, the registered sites' keys, and Flower's SuperLink "
                               "behind a proxy that exposes only the Fleet API (sites) to the network.\n\n"
                               "  fedlora coordinator init DIR --host fl.example.org\n"
                               "  fedlora coordinator register-site hospital-a hospital-a.pub --dir DIR\n"
                               "  fedlora coordinator start --dir DIR\n"
                               "  fedlora run --dir DIR --config DIR/run.toml\n\n"
                               "Step by step: docs/deployment.md."))
    csub = coord.add_subparsers(dest="coordinator_command", required=True)
    p = csub.add_parser("init", help="create the coordinator folder: CA, server certificate, settings",
                        description="Create a coordinator folder: a private CA (ca/), a TLS server certificate "
                                    "naming every --host (tls/) -- or your own PKI's (--ca-cert, --server-cert, "
                                    "--server-key) -- coordinator.toml, a run.toml to edit, and a systemd unit "
                                    "(systemd/fedlora-coordinator.service).")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="DNS name or IP address sites use to reach the coordinator (repeatable); "
                        "localhost and 127.0.0.1 are always included")
    p.add_argument("--listen", default="0.0.0.0:9092", metavar="HOST:PORT",
                   help="public address of the Fleet-only TLS proxy (default: %(default)s)")
    p.add_argument("--superlink-port", type=int, default=9093,
                   help="port of the SuperLink on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--ca-cert", metavar="FILE",
                   help="your PKI's CA certificate (PEM), with --server-cert and --server-key: use them instead "
                        "of creating a CA; sites get this file")
    p.add_argument("--server-cert", metavar="FILE",
                   help="the coordinator's TLS certificate (PEM, intermediates after it), issued by --ca-cert for "
                        "every --host plus localhost and 127.0.0.1")
    p.add_argument("--server-key", metavar="FILE", help="the private key of --server-cert (PEM, unencrypted)")
    p.add_argument("--service-user", metavar="USER",
                   help="the account the systemd unit (systemd/fedlora-coordinator.service) runs as (default: "
                        "the folder's owner, or 'fedlora' when that is root)")
    p.add_argument("--proxy", choices=("python", "nginx"), default="python",
                   help="what serves --listen: the built-in Python proxy, or nginx (installed separately; "
                        "the coordinator writes and runs its config) (default: %(default)s)")
    p.set_defaults(func=_coordinator_init)

    p = csub.add_parser("renew-certificate", help="issue a new server certificate from the CA (rotation)",
                        description="Issue a new TLS server key and certificate, signed by the coordinator's CA, "
                                    "for --host names (default: the hosts in coordinator.toml). Sites keep "
                                    "trusting it without any change.")
    p.add_argument("--dir", default=".", help=dir_help)
    p.add_argument("--host", action="append", metavar="NAME", help="names for the new certificate (repeatable)")
    p.set_defaults(func=_coordinator_renew)

    p = csub.add_parser("register-site", help="accept a site's public key (only registered sites connect)",
                        description="Accept a site's public key (keys/site.key.pub from `fedlora site init`). "
                                    "Compare the printed fingerprint with the site's over another channel. "
                                    "The key is registered with the SuperLink now if it runs, otherwise at "
                                    "the next `fedlora coordinator start`.")
    p.add_argument("name", help="the site's name, e.g. hospital-a")
    p.add_argument("key", metavar="KEY.pub", help="the site's public key file")
    p.add_argument("--replace", action="store_true", help="rotate: replace and revoke the site's current key")
    p.add_argument("--dir", default=".", help=dir_help)
    p.set_defaults(func=_coordinator_register)

    p = csub.add_parser("unregister-site", help="revoke a site's key",
                        description="Revoke a site: its key is unregistered from the SuperLink (now, or at the "
                                    "next start) and archived in sites/revoked/.")
    p.add_argument("name")
    p.add_argument("--dir", default=".", help=dir_help)
    p.set_defaults(func=_coordinator_unregister)

    p = csub.add_parser("start", help="run the SuperLink (loopback) and the Fleet-only proxy (foreground)",
                        description="Start Flower's SuperLink on 127.0.0.1 (TLS, site authentication, state "
                                    "database on disk, no runtime dependency installation) and, on the listen "
                                    "address, a TLS proxy that forwards only the Fleet API. Runs until Ctrl-C, "
                                    "SIGTERM or `fedlora coordinator stop`.")
    p.add_argument("--dir", default=".", help=dir_help)
    p.set_defaults(func=_start, what="coordinator")

    p = csub.add_parser("stop", help="stop a running coordinator")
    p.add_argument("--dir", default=".", help=dir_help)
    p.set_defaults(func=_stop, what="coordinator")

    site = sub.add_parser("site", help="take part in a federation as a hospital (Flower SuperNode)",
                          formatter_class=RAW, description=(
                              "A site (hospital): its key pair, its data and privacy budget, and Flower's "
                              "SuperNode, which connects out to the coordinator.\n\n"
                              "  fedlora site init DIR --name hospital-a --data notes.jsonl \\\n"
                              "      --superlink fl.example.org:9092 --ca ca.crt\n"
                              "  fedlora site sample-data notes.jsonl --site 0 --sites 3   (trial data)\n"
                              "  fedlora site check-data notes.jsonl\n"
                              "  fedlora site start --dir DIR\n"
                              "  fedlora site drift --dir DIR   (has the data moved since training?)\n\n"
                              "Step by step: docs/deployment.md."))
    ssub = site.add_subparsers(dest="site_command", required=True)
    p = ssub.add_parser("init", help="create the site folder: key pair, node configuration",
                        description="Create a site folder: an ECDSA P-384 key pair (OpenSSH format, as "
                                    "`ssh-keygen -t ecdsa -b 384` makes; or --key, your own), the coordinator's CA "
                                    "certificate, site.toml naming the data file, the state folder and the site's "
                                    "own privacy budget, and a systemd unit (systemd/fedlora-site-NAME.service).")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--name", required=True, help="the site's name, as the coordinator registers it")
    p.add_argument("--data", required=True, help="the site's data file (.jsonl, .csv, .parquet)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's public address")
    p.add_argument("--ca", required=True, help="the coordinator's ca.crt")
    p.add_argument("--epsilon", type=float, default=8.0,
                   help="the site's privacy budget epsilon for the whole collaboration (default: %(default)s)")
    p.add_argument("--delta", type=float, default=1e-5, help="the site's delta (default: %(default)s)")
    p.add_argument("--epsilon-per-run", type=float, default=None,
                   help="the most epsilon one run may spend at this site (default: a quarter of --epsilon; "
                        "0: no cap)")
    p.add_argument("--no-privacy-budget", action="store_true",
                   help="set no site budget (the run's [privacy] section then decides whether DP-SGD runs)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local port of the SuperNode's ClientApp API; distinct per site on one machine")
    p.add_argument("--key", metavar="FILE",
                   help="use this existing site key (OpenSSH ECDSA P-384 private key, as `ssh-keygen -t ecdsa "
                        "-b 384` makes) instead of creating one; it is copied into keys/")
    p.add_argument("--service-user", metavar="USER",
                   help="the account the systemd unit (systemd/fedlora-site-NAME.service) runs as (default: the "
                        "folder's owner, or 'fedlora' when that is root)")
    p.add_argument("--gpu", action="store_true",
                   help="let the systemd unit reach the GPU (PrivateDevices=no); by default it sees no devices")
    p.set_defaults(func=_site_init)

    p = ssub.add_parser("check-data", help="report data quality problems (nothing leaves the site)",
                        description="Report what is wrong or risky in a site file: rows that do not parse or "
                                    "fit the task (with line numbers), empty and over-long texts, exact and "
                                    "near duplicates, identical texts with conflicting labels, the label "
                                    "balance, likely personal identifiers (emails, phone numbers, dates of "
                                    "birth, record numbers, national ids; shown masked). Reads the file only; "
                                    "sends nothing. Exit code 1 when rows are unusable (or, with --strict, on "
                                    "any finding).")
    p.add_argument("path")
    p.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--labels", help="comma-separated label list of the run, to flag unknown and absent labels")
    p.add_argument("--max-length", type=int, default=256,
                   help="longest text, in words (or tokens with --tokenizer) (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="MODEL", help="count tokens with this model's tokenizer")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to this local file")
    p.add_argument("--strict", action="store_true", help="exit 1 on any finding")
    p.set_defaults(func=_site_check_data)

    p = ssub.add_parser("sample-data", help="write a share of the synthetic triage corpus, to try a deployment",
                        description="Write site I's share of fedlora's synthetic clinical-notes triage corpus "
                                    "(the data `fedlora simulate` uses by default) as JSONL (text, label), for a "
                                    "trial deployment before real data. Sites 0..N-1 get different label mixes "
                                    "and writing styles.")
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("--site", type=int, default=0, metavar="I", help="this site's index, 0 to N-1 (default: 0)")
    p.add_argument("--sites", type=int, default=3, metavar="N", help="number of sites (default: %(default)s)")
    p.add_argument("--records", type=int, default=320, metavar="R", help="notes to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed, the same at every site (default: 0)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet label skew across sites (smaller: more skew) (default: %(default)s)")
    p.add_argument("--iid", action="store_true", help="every site the same label and style mix")
    p.add_argument("--drifted", action="store_true",
                   help="the drifted corpus: new jargon, a telehealth service's notes, a shifted label mix "
                        "(to try `fedlora site drift`; docs/drift.md)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.set_defaults(func=_site_sample_data)

    defaults = drift.Thresholds()
    p = ssub.add_parser("drift", help="has the site's data moved since it last trained? (nothing leaves the site)",
                        formatter_class=RAW, description=(
                            "Compare the records the site has now (its data file) with the snapshot it kept when it "
                            "last trained: label mix (PSI, chi-square), wording (Jensen-Shannon divergence, share "
                            "of words never seen in training) and, with --adapter, the model's accuracy on newly "
                            "labelled records against its accuracy at training. Prints the figures and a verdict; "
                            "exit code 3 when retraining is due, 0 when not, 1 when the check cannot run.\n\n"
                            "  fedlora site drift --dir DIR --adapter RUN_DIR/adapter --json drift.json\n\n"
                            "Thresholds, schedule, cron and systemd timer examples: docs/drift.md."))
    p.add_argument("--dir", default=".", help="the site folder: its data file and state folder (default: .)")
    p.add_argument("--data", metavar="FILE", help="compare this file instead of the site's data file")
    p.add_argument("--state", metavar="DIR", help="the folder holding the training snapshot (default: the site's "
                                                  "state folder)")
    p.add_argument("--adapter", metavar="PATH", help="the model in use: a run directory or an adapter folder; "
                                                     "scores it on the labelled records")
    p.add_argument("--config", metavar="FILE", help="the run's configuration (default: the run directory's "
                                                    "config.toml, else the adapter's own settings)")
    p.add_argument("--model", metavar="NAME", help="the base model where this site keeps it (a local folder, or "
                                                   "minilm)")
    p.add_argument("--labelled", metavar="FILE", help="newly labelled records to score (default: the data file)")
    p.add_argument("--baseline-accuracy", type=float, metavar="A",
                   help="accuracy to compare with (default: the one recorded at training)")
    p.add_argument("--psi", type=float, default=defaults.psi, help="label mix: PSI at which retraining is due "
                                                                   "(default: %(default)s)")
    p.add_argument("--chi2-p", type=float, default=defaults.chi2_p,
                   help="... and the chi-square p-value it must be below (default: %(default)s)")
    p.add_argument("--js", type=float, default=defaults.js,
                   help="wording: Jensen-Shannon divergence (default: %(default)s)")
    p.add_argument("--unseen", type=float, default=defaults.unseen,
                   help="share of words never seen in training (default: %(default)s)")
    p.add_argument("--accuracy-drop", type=float, default=defaults.accuracy_drop,
                   help="accuracy below the one at training by this much (default: %(default)s)")
    p.add_argument("--max-age-days", type=float, default=defaults.max_age_days,
                   help="retrain at least this often, in days; 0: never for age alone (default: %(default)s)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--json", metavar="FILE", help="also write the aggregate figures and the verdict as JSON (no "
                                                  "word, label, record or path: fit to pass on)")
    p.set_defaults(func=_site_drift)

    p = ssub.add_parser("start", help="run the SuperNode and the site worker (foreground)",
                        description="Start the site worker (keeps the base model loaded) and Flower's SuperNode, "
                                    "which connects to the coordinator over TLS with the site's key. Runs until "
                                    "Ctrl-C, SIGTERM or `fedlora site stop`; a restart keeps the privacy ledger.")
    p.add_argument("--dir", default=".", help="the site folder (default: the current folder)")
    p.set_defaults(func=_start, what="site")

    p = ssub.add_parser("stop", help="stop a running site")
    p.add_argument("--dir", default=".", help="the site folder (default: the current folder)")
    p.set_defaults(func=_stop, what="site")

    p = ssub.add_parser("review", help="rate two models' outputs blind, on this machine (only counts leave)",
                        description="Serve, on 127.0.0.1 only, the outputs the candidate and the current model "
                                    "gave for this site's held-out rows in an evaluation-only run "
                                    "(model.compare-with), side by side and blind, for a domain expert to rate. "
                                    "Verdicts stay in the site's state folder; the coordinator gets the counts of "
                                    "wins, ties and losses when it runs the same evaluation again "
                                    "(docs/registry.md).")
    p.add_argument("--dir", default=".", help="the site folder (default: the current folder)")
    p.add_argument("--state", metavar="DIR", help="a state folder instead (a simulated site's: RUN/sites/NAME)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    p.set_defaults(func=_site_review)

    run = sub.add_parser("run", help="submit a training run to the coordinator and follow it",
                         formatter_class=RAW, description=(
                             "Submit a federated run to this coordinator's SuperLink (works on the coordinator "
                             "host only) and print one line per round until it ends. The run directory "
                             "(adapter/, metrics.jsonl, summary.json, checkpoints/, report.html) is written "
                             "on this host.\n\n"
                             "  fedlora run --dir DIR --config DIR/run.toml --set federation.rounds=3\n"
                             "  fedlora run --dir DIR --resume --out DIR/runs/20250101-120000\n\n"
                             "Configuration keys: `fedlora simulate --help`."))
    run.add_argument("--dir", default=".", help=dir_help)
    run.add_argument("--config", "-c", help="TOML run configuration (e.g. the coordinator's run.toml)")
    run.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override one key (repeatable)")
    run.add_argument("--out", "-o", help="run directory (default: <coordinator>/runs/<UTC timestamp>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (after a coordinator restart)")
    run.set_defaults(func=run_command)
