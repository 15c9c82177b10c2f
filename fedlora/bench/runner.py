"""`fedlora bench`: run the benchmark suites, write BENCHMARKS.md sections and a JSON file of every figure.

Each suite (fedlora/bench/<suite>.py, interface in suite.py) replaces only its
own section of BENCHMARKS.md, between two HTML comments, and its own entry of
BENCHMARKS.json; the rest of both files is left as it was, so one suite can be
rerun alone. Each entry carries the exact command, the mode, the date, the
machine and the library versions it was measured with.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from fedlora.bench.report import write_report
from fedlora.bench.suite import BenchContext, SuiteResult
from fedlora.progress import progress
from fedlora.versions import library_versions

SUITES = {  # name -> module, in the order they run (the cheap ones first)
    "lora-vs-full": "fedlora.bench.lora_vs_full",
    "communication": "fedlora.bench.communication",
    "overheads": "fedlora.bench.overheads",
    "secure-aggregation": "fedlora.bench.secure_aggregation",
    "privacy": "fedlora.bench.privacy",
    "deployment": "fedlora.bench.deployment",
    "quality": "fedlora.bench.quality",
    "curves": "fedlora.bench.curves",
    "strategies": "fedlora.bench.strategies",
    "drift": "fedlora.bench.drift",
    "scale": "fedlora.bench.scale",
    "gpu": "fedlora.bench.gpu",
}
# Suites too long for a mode's default run: without --only that mode skips them (name them to run them).
# Quick: the deployment starts real processes (minutes), curves are 6 runs, strategies 32; full: privacy
# takes about an hour, curves and strategies about two each, drift about 20 minutes, scale over an hour
# (quick: three Ray runs, minutes); gpu's quick mode runs on the CPU, figures not worth quoting.
OPT_IN = {"quick": ("deployment", "curves", "strategies", "drift", "scale", "gpu"),
          "full": ("privacy", "curves", "strategies", "drift", "scale")}
PARENT_HEADING = "## `fedlora bench`"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "load_average_1min": load}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- fedlora bench: {name} (begin) -->", f"<!-- fedlora bench: {name} (end) -->"


def update_markdown(path: Path, name: str, section: str) -> None:
    """Replace suite `name`'s section in `path` (added under the parent heading if new)."""
    begin, end = _markers(name)
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        if not has_parent_heading(text):
            text = text.rstrip() + f"\n\n{PARENT_HEADING}\n\nProduced by `fedlora bench`; each section says the " \
                "command, mode, machine and versions it was measured with.\n"
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a crash mid-write never leaves half a file


def has_parent_heading(text: str) -> bool:
    """Whether `text` has the parent heading as a line of its own (words may follow it on that line)."""
    return re.search("^" + re.escape(PARENT_HEADING) + r"(\s.*)?$", text, re.M) is not None


def default_suites(quick: bool) -> list[str]:
    """The suites `fedlora bench` runs without --only: all but the mode's opt-in ones, in order."""
    return [name for name in SUITES if name not in OPT_IN["quick" if quick else "full"]]


def update_json(path: Path, name: str, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("suites", {})[name] = entry
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def section(title: str, result: SuiteResult, entry: dict) -> str:
    v = entry["versions"]
    header = (f"### {title}{' (quick mode)' if entry['mode'] == 'quick' else ''}\n\n"
              f"`{entry['command']}` — {entry['finished'][:16].replace('T', ' ')} UTC, {entry['seconds']:.0f} s; "
              f"{entry['machine']['cores']} cores ({entry['machine']['cpu']}), load {entry['machine']['load_average_1min']:.1f} "
              f"at start; torch {v.get('torch')}, flwr {v.get('flwr')}, transformers {v.get('transformers')}, "
              f"peft {v.get('peft')}, opacus {v.get('opacus')}.\n")
    notes = "".join(f"\n- {n}" for n in result.notes)
    return header + "\n" + result.markdown.rstrip() + ("\n" + notes if notes else "") + "\n"


def progress_bar(items, label: str):
    return progress(items, label)


def run_suites(names: list[str], quick: bool, workdir: Path, markdown: Path | None, json_path: Path,
               command: str) -> dict[str, str]:
    """Run the suites in order; returns the ones that failed, with why. Finished suites are written at once."""
    failed: dict[str, str] = {}
    ctx = BenchContext(quick=quick, workdir=workdir / ("quick" if quick else "full"), progress=progress_bar)
    for name in progress_bar(names, "suites"):
        module = importlib.import_module(SUITES[name])
        print(f"== {name} ({'quick' if quick else 'full'} mode)", flush=True)
        load = machine()
        started = time.perf_counter()
        try:
            result: SuiteResult = module.run(ctx)
        except Exception as err:  # noqa: BLE001 - one broken suite must not lose the others' figures
            traceback.print_exc()
            failed[name] = f"{type(err).__name__}: {err}"
            continue
        entry = {"command": command, "mode": "quick" if quick else "full",
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "seconds": time.perf_counter() - started, "machine": load, "versions": library_versions(),
                 "figures": result.figures, "notes": result.notes}
        update_json(json_path, name, entry)
        text = section(module.TITLE, result, entry)
        if markdown is not None:  # quick figures get sections of their own, beside the full ones
            update_markdown(markdown, f"{name} (quick)" if quick else name, text)
        try:
            write_report(json_path)
        except (OSError, KeyError, TypeError, ValueError) as err:  # the plots are extra: the figures are written
            print(f"fedlora bench: BENCHMARKS.html not written: {type(err).__name__}: {err}", file=sys.stderr)
        print(text, flush=True)
    return failed


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", help="run the benchmark suites; write BENCHMARKS.md sections and BENCHMARKS.json",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__ + "\nSuites, in the order they "
        "run: " + ", ".join(SUITES) + ".\n\nWithout --only, quick mode runs all but " + ", ".join(OPT_IN["quick"])
        + ", and full mode all but " + ", ".join(OPT_IN["full"]) + "; name a suite in --only to run it anyway. "
        "Quick mode takes about 5 minutes on 2 cores (small models and data, few rounds); full mode runs the "
        "default scenario and takes over an hour there (privacy adds about an hour, curves and strategies "
        "about two each). The plots of every suite that has some go to BENCHMARKS.html (the JSON file's "
        "name, .html) after each suite. "
        "Run directories are kept in --workdir; a finished one is reused, so an interrupted bench continues "
        "where it stopped.")
    bench.add_argument("--quick", action="store_true", help="a few minutes on 2 cores instead of the full suite")
    bench.add_argument("--only", default="", help="comma-separated suites to run, opt-in ones included "
                                                  "(default: all but the mode's opt-in suites)")
    bench.add_argument("--workdir", default="runs/bench", help="where the suites' run directories go")
    bench.add_argument("--markdown", default="BENCHMARKS.md", help="Markdown file whose sections are replaced")
    bench.add_argument("--json", default="", help="JSON file of every figure (default: next to --markdown, "
                                                  "BENCHMARKS.json, or BENCHMARKS.quick.json in quick mode)")
    bench.add_argument("--no-markdown", action="store_true", help="leave the Markdown file alone")
    bench.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.only.split(",") if n.strip()] or default_suites(args.quick)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"fedlora bench: unknown suite(s) {unknown}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    markdown = None if args.no_markdown else Path(args.markdown)
    default_json = Path(args.markdown).with_name("BENCHMARKS.quick.json" if args.quick else "BENCHMARKS.json")
    json_path = Path(args.json) if args.json else default_json
    command = " ".join(["fedlora bench", *(["--quick"] if args.quick else []),
                        *([f"--only {shlex.quote(args.only)}"] if args.only else []),
                        *([f"--workdir {shlex.quote(args.workdir)}"] if args.workdir != "runs/bench" else [])])
    failed = run_suites(names, args.quick, Path(args.workdir), markdown, json_path, command)
    for name, why in failed.items():
        print(f"fedlora bench: suite {name} failed: {why}", file=sys.stderr)
    print(f"fedlora bench: figures in {json_path}" + (f", sections in {markdown}" if markdown else ""))
    return 1 if failed else 0
