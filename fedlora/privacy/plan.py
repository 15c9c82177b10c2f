"""`fedlora privacy plan`: the noise to use and the epsilon after each round, before
anything is spent — so a privacy officer can approve a run before it starts.

Site level (DP-SGD): from the site's unit count (records, or patients), expected
batch, local steps or epochs, rounds and a target (epsilon, delta).
A deployed site (`--site DIR`): what its ledger says is spent and what remains of
its budget and of its per-run share, and, with `--records`, the next run's plan
from there (the ledger is read and verified, never written).
Client level (`plan-clients`): from the number of sites, sites per round and rounds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from fedlora.config import RunConfig, load_config
from fedlora.privacy.accounting import calibrate_noise, epsilon_by_round
from fedlora.privacy.budget import NODE_DELTA, NODE_EPSILON, SITE_DELTA, Budget, positive, run_share
from fedlora.privacy.client_dp import utility_warning
from fedlora.privacy.distributed_site import EVENT as DISTRIBUTED_DP
from fedlora.privacy.ledger import Ledger
from fedlora.privacy.secagg.distributed_dp import epsilon_of_releases
from fedlora.privacy.site import REFUSED, SiteAccountant
from fedlora.privacy.utility import PARTLY, NoisedParameters, count_noised_parameters, noise_to_signal, remedies, \
    report, verdict
from fedlora.training import planned_steps


@dataclass
class Plan:
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    calibrated: bool
    epsilon: float           # target
    delta: float
    accountant: str
    by_round: list[tuple[float, float]]   # (epsilon prv, epsilon rdp) after each round

    @property
    def enforced(self) -> list[float]:
        return [prv if self.accountant == "prv" else rdp for prv, rdp in self.by_round]

    @property
    def refuses_at(self) -> int | None:
        """The first round a site would refuse (its epsilon would exceed the target)."""
        return next((r for r, e in enumerate(self.enforced, start=1) if e > self.epsilon), None)


def make_plan(sample_rate: float, steps_per_round: int, rounds: int, epsilon: float, delta: float,
              accountant: str = "prv", noise_multiplier: float = 0.0) -> Plan:
    calibrated = noise_multiplier <= 0
    if calibrated:
        noise_multiplier = calibrate_noise(epsilon, delta, sample_rate, steps_per_round * rounds,
                                           accountant=accountant)
    prv = epsilon_by_round(noise_multiplier, sample_rate, steps_per_round, rounds, delta, "prv")
    rdp = epsilon_by_round(noise_multiplier, sample_rate, steps_per_round, rounds, delta, "rdp")
    return Plan(sample_rate, steps_per_round, rounds, noise_multiplier, calibrated, epsilon, delta, accountant,
                list(zip(prv, rdp)))


def site_plan(units: int, batch_size: int, rounds: int, epsilon: float, delta: float, local_epochs: float = 1.0,
              local_steps: int = 0, accountant: str = "prv", noise_multiplier: float = 0.0) -> Plan:
    """The plan of one site, exactly as the site computes it at run time."""
    if units < 1 or batch_size < 1 or rounds < 1:
        raise ValueError("units, batch size and rounds must be >= 1")
    steps = planned_steps(units, batch_size, local_epochs, local_steps)
    return make_plan(min(1.0, batch_size / units), steps, rounds, epsilon, delta, accountant, noise_multiplier)


def format_plan(plan: Plan, title: str) -> str:
    lines = [title,
             f"  sampling rate q = {plan.sample_rate:.4g}, {plan.steps_per_round} step(s) per round, "
             f"{plan.rounds} rounds, target epsilon {plan.epsilon:g} at delta {plan.delta:g} ({plan.accountant})",
             f"  noise multiplier sigma = {plan.noise_multiplier:g}"
             + (" (calibrated: the smallest that fits the target)" if plan.calibrated else " (given)"),
             "", "  round  epsilon(prv)  epsilon(rdp)"]
    for r, (prv, rdp) in enumerate(plan.by_round, start=1):
        mark = "  <- exceeds the target: the site refuses this round" if r == plan.refuses_at else ""
        lines.append(f"  {r:5d}  {prv:12.4f}  {rdp:12.4f}{mark}")
    return "\n".join(lines)


# A deployed site's folder -> (its ledger folder, its node config); the deployment layer provides it.
SiteLoader = Callable[[str], "tuple[Path, Mapping[str, Any]]"]


def site_accountant(state: Path, node: Mapping[str, Any], run_epsilon: float, accountant: str) -> SiteAccountant:
    """The site's accountant as its next round would build it: its own budget (else the given
    epsilon), the delta it last enforced (else its own bound), its per-run share."""
    eps = positive(node, NODE_EPSILON) if NODE_EPSILON in node else run_epsilon
    trained = [e for e in Ledger(state, read_only=True).entries() if e["event"] == "train"]
    delta = trained[-1]["delta"] if trained else (
        min(positive(node, NODE_DELTA), SITE_DELTA) if NODE_DELTA in node else SITE_DELTA)
    return SiteAccountant(state, Budget(eps, delta, "node config" if NODE_EPSILON in node else "--epsilon"),
                          accountant, share=run_share(node), read_only=True)


def site_status(site: SiteAccountant) -> str:
    """What a site has spent and what remains, from its verified ledger."""
    entries, spent, budget, accountant = site.ledger.entries(), site.spent(), site.budget, site.accountant
    lines = [f"site ledger {site.ledger.directory} ({len(entries)} entries, verified)",
             f"  budget: epsilon {budget.epsilon:g} at delta {budget.delta:g} ({budget.source}); "
             + (f"per-run share {site.share.epsilon:g} ({site.share.action})" if site.share else "no per-run share"),
             f"  DP-SGD spent: epsilon {spent['epsilon']:.4f} ({accountant}; prv {spent['epsilon_prv']:.4f}, "
             f"rdp {spent['epsilon_rdp']:.4f}) over {spent['rounds']} round(s) in {spent['runs']} run(s)",
             f"  remaining: epsilon {max(0.0, budget.epsilon - spent['epsilon']):.4f}"]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if e["event"] == "train":
            by_run.setdefault(str(e.get("run", "")), []).append(e)
    for run, trained in by_run.items():
        lines.append(f"    run {run or '-'}: {len(trained)} round(s), sigma {trained[-1]['noise_multiplier']:g}, "
                     f"epsilon after {trained[-1]['epsilon']:.4f}, last {trained[-1].get('time', '?')}")
    refusals = [e for e in entries if e["event"] == REFUSED]
    if refusals:
        lines.append(f"  refused: {len(refusals)} round(s); last: {refusals[-1]['reason']}")
    releases = [e for e in entries if e["event"] == DISTRIBUTED_DP]
    if releases:
        lines.append(f"  distributed DP: {len(releases)} release(s), epsilon "
                     f"{epsilon_of_releases([e['noise_multiplier'] for e in releases], releases[-1]['delta']):.4f} "
                     f"of {releases[-1]['budget_epsilon']:g}")
    return "\n".join(lines)


def _deployed_site(args: argparse.Namespace) -> int:
    try:
        state, node = args.load_site(args.site)
        site = site_accountant(state, node, args.epsilon, args.accountant)
        print(site_status(site))
        if args.records is None:
            return 0
        steps = planned_steps(args.records, args.batch_size, args.local_epochs, args.local_steps)
        f = site.forecast(min(1.0, args.batch_size / args.records), steps, args.noise_multiplier, args.rounds, "next")
    except (RuntimeError, ValueError, OSError) as err:  # not a site folder, a ledger that does not verify
        print(f"fedlora privacy plan: {err}", file=sys.stderr)
        return 1
    print(f"\n  the next run ({args.rounds} rounds, {args.records} units, batch {args.batch_size}, {steps} step(s) "
          f"per round): sigma {f.noise_multiplier:g}{' (calibrated)' if f.calibrated else ''}, epsilon "
          f"{f.run_epsilon:.4f} for the run, {f.after_epsilon:.4f} in all"
          + (f"; the site refuses round {f.refuses_at}: {f.why}" if f.refuses_at else ""))
    if f.noise_multiplier > 0 and f.refuses_at != 1:
        # the run's own rounds at the epsilon the forecast gives them: the same sigma, from a fresh plan
        print(will_it_learn(args, f.noise_multiplier, steps, f.run_epsilon, f.delta))
    return 0


def _site(args: argparse.Namespace) -> int:
    if args.site:
        return _deployed_site(args)
    if args.records is None:
        print("fedlora privacy plan: give --records (the site's units), or --site DIR (a deployed site)",
              file=sys.stderr)
        return 2
    plan = site_plan(args.records, args.batch_size, args.rounds, args.epsilon, args.delta, args.local_epochs,
                     args.local_steps, args.accountant, args.noise_multiplier)
    print(format_plan(plan, f"fedlora privacy plan: one site, {args.records} units of privacy "
                            f"(records, or patients with privacy.unit-column), expected batch {args.batch_size}"))
    print(will_it_learn(args, plan.noise_multiplier, plan.steps_per_round, args.epsilon, args.delta))
    if plan.calibrated:
        print(f"\n  run with --set privacy.noise-multiplier={plan.noise_multiplier:g} (or leave it 0: each site "
              "calibrates the same way for its own unit count)")
    if args.delta >= 1 / args.records:
        print(f"\n  warning: delta {args.delta:g} is not below 1/{args.records}: choose a smaller one")
    return 0


def noised_parameters(args: argparse.Namespace) -> NoisedParameters | None:
    """d: `--trainable-parameters`, else counted from the run configuration (`--config`, `--set`)."""
    if args.trainable_parameters:
        return NoisedParameters(args.trainable_parameters)
    try:
        return count_noised_parameters(load_config(args.config, args.set))
    except (ValueError, OSError) as err:  # ModelLoadError: the model's config.json is not here
        print(f"\n  noise-to-signal not computed: cannot count the trainable parameters ({err}); "
              "give --trainable-parameters N", file=sys.stderr)
        return None


def will_it_learn(args: argparse.Namespace, noise_multiplier: float, steps: int, epsilon: float,
                  delta: float) -> str:
    """The per-step noise-to-signal ratio of the plan, the verdict, and (when it is not expected to
    learn) what would: each figure from the same calibration as the plan's."""
    parameters = noised_parameters(args)
    if parameters is None:
        return ""
    nsr = noise_to_signal(noise_multiplier, parameters.total, args.batch_size)
    fix = None
    if verdict(nsr) != PARTLY:
        def calibrate(units: int, batch: int) -> tuple[float, int, int]:
            p = site_plan(units, batch, args.rounds, epsilon, delta, args.local_epochs, args.local_steps,
                          args.accountant, args.noise_multiplier)
            return p.noise_multiplier, p.steps_per_round, p.rounds
        fix = remedies(args.records, args.batch_size, noise_multiplier, steps, args.rounds, delta, args.accountant,
                       parameters, calibrate)
    return report(nsr, noise_multiplier, parameters, args.batch_size, steps * args.rounds, fix, epsilon)


def _clients(args: argparse.Namespace) -> int:
    k = max(1, round(args.fraction * args.sites))
    plan = make_plan(k / args.sites, 1, args.rounds, args.epsilon, args.delta, args.accountant,
                     args.noise_multiplier)
    print(format_plan(plan, f"fedlora privacy plan-clients: client-level DP, unit = a site; "
                            f"{k} of {args.sites} sites per round"))
    eps = plan.enforced[-1]
    print("\n  " + utility_warning(plan.noise_multiplier, args.clip_norm, k, args.adapter_size, eps, args.delta,
                                   args.rounds))
    if args.sites > 1 and args.delta >= 1 / args.sites:
        print(f"\n  warning: delta {args.delta:g} is not below 1/{args.sites} sites: choose a smaller one")
    return 0


def add_parsers(sub, load_site: SiteLoader | None = None) -> None:
    """Register `privacy plan` and `privacy plan-clients` under the `fedlora` command; `load_site`
    reads a deployed site's folder for `privacy plan --site`."""
    d = RunConfig()
    privacy = sub.add_parser("privacy", help="plan differential privacy before a run")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)

    plan = psub.add_parser("plan", help="noise multiplier and epsilon per round for one site (DP-SGD)")
    plan.add_argument("--records", type=int,
                      help="the site's training units: records, or patients with privacy.unit-column")
    if load_site is not None:
        plan.add_argument("--site", metavar="DIR",
                          help="a deployed site's folder: show what its ledger says is spent and what remains "
                               "(with --records: and the next run's plan from there)")
    plan.add_argument("--batch-size", type=int, default=d.privacy.batch_size,
                      help="expected units per step (default: %(default)s)")
    plan.add_argument("--local-epochs", type=float, default=d.privacy.local_epochs,
                      help="local epochs per round (default: %(default)s)")
    plan.add_argument("--local-steps", type=int, default=0, help="local steps per round; overrides --local-epochs")
    plan.add_argument("--trainable-parameters", type=int, default=0, metavar="N",
                      help="noised (trainable) parameters d, for the noise-to-signal ratio; default: counted "
                           "from the run configuration (--config, --set) without loading weights")
    plan.add_argument("--config", "-c", help="the run's TOML configuration (model, lora, task, strategy): for d")
    plan.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                      help="override one key of the run configuration, e.g. --set lora.rank=4 (repeatable)")
    _common(plan, d)
    plan.set_defaults(func=_site, site=None, load_site=load_site)

    clients = psub.add_parser("plan-clients", help="noise multiplier and epsilon per round for client-level DP")
    clients.add_argument("--sites", type=int, required=True, help="sites in the federation")
    clients.add_argument("--fraction", type=float, default=d.federation.fraction_train,
                         help="share of sites sampled per round (default: %(default)s)")
    clients.add_argument("--clip-norm", type=float, default=d.privacy.client_clip_norm,
                         help="L2 bound of one site's update (default: %(default)s)")
    clients.add_argument("--adapter-size", type=int, default=100_000,
                         help="adapter coordinates, for the signal-to-noise estimate (default: %(default)s)")
    _common(clients, d)
    clients.set_defaults(func=_clients)


def _common(parser: argparse.ArgumentParser, d: RunConfig) -> None:
    parser.add_argument("--rounds", type=int, default=d.federation.rounds, help="rounds (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=d.privacy.epsilon, help="target epsilon (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=d.privacy.delta, help="target delta (default: %(default)s)")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default=d.privacy.accountant,
                        help="accountant that enforces the budget (default: %(default)s)")
    parser.add_argument("--noise-multiplier", type=float, default=0.0,
                        help="evaluate this sigma instead of calibrating one")
