"""report.html of a real run, opened in a real browser (headless Chromium): the plots are drawn.

The run is a tiny one (in-process ServerApp and ClientApp, DP-SGD on, so the rows carry
ε per site). A copy of the report gets a probe script that measures each plot and each
series as laid out by the browser and writes the figures into the page, which
`--dump-dom` returns; a screenshot shows that pixels were painted. The summary in words is
the first thing on the page, above every plot and table, within the first screen. The report itself
carries no script. Without Chromium the tests skip, unless FEDLORA_REQUIRE_BROWSER=1 (CI).
"""

import html
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedlora import config as cfg
from fedlora.server import report_summary as rs
from fedlora.server.report import COLOURS, HEIGHT, WIDTH
from fedlora.simulations.inprocess import run_inprocess

ROUNDS = 3
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<script>
const plots = [...document.querySelectorAll("svg.plot")].map(svg => {
  const box = svg.getBoundingClientRect();
  return {title: svg.getAttribute("aria-label"), width: box.width, height: box.height,
          series: [...svg.querySelectorAll("polyline.series")].map(line => {
            const b = line.getBBox();
            return {name: line.dataset.name, length: line.getTotalLength(),
                    points: line.points.numberOfItems, box: [b.x, b.y, b.width, b.height]};
          })};
});
const sites = [...document.querySelectorAll("#sites tbody tr")].map(tr => [...tr.cells].map(td => td.textContent));
const header = [...document.querySelectorAll("#sites thead th")].map(th => th.textContent);
const summary = document.querySelector("#summary");
const topOf = el => el ? el.getBoundingClientRect().top : null;
const first = summary && {
  top: topOf(summary), height: summary.getBoundingClientRect().height, viewport: window.innerHeight,
  after: document.querySelector("h1").nextElementSibling.id,
  plot: topOf(document.querySelector("svg.plot")), table: topOf(document.querySelector("table")),
  visibility: getComputedStyle(summary).visibility,
  paragraphs: Object.fromEntries([...summary.querySelectorAll("p")].map(p => [p.id, p.innerText]))};
const out = document.createElement("pre");
out.id = "probe";
out.textContent = JSON.stringify({plots, sites, header, summary: first});
document.body.appendChild(out);
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
    if found is None:
        reason = "headless Chromium not installed (Debian: apt-get install chromium)"
        if os.environ.get("FEDLORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FEDLORA_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def chromium():
    return _chromium()


@pytest.fixture(scope="module")
def run_dir(chromium, tiny_bert_dir, tmp_path_factory):
    """A real 3-round run with DP-SGD: loss, accuracy, ε per site, bytes, aggregation error per round."""
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2",
                                    f"federation.rounds={ROUNDS}", "data.records-per-site=30",
                                    "train.local-steps=2", "privacy.enabled=true", "privacy.batch-size=8",
                                    "privacy.delta=1e-3"])
    return run_inprocess(config, tmp_path_factory.mktemp("report-run"))


def _browse(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per call
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        # Chromium logs dozens of harmless D-Bus errors here (no system bus); show what else it said
        said = [line for line in done.stderr.splitlines() if "dbus" not in line]
        pytest.fail(f"Chromium exited with {done.returncode} (umask {_umask():#o}); it said:\n" + "\n".join(said[-15:]))
    return done


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_report_is_plain_html_without_script(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"\son[a-z]+\s*=", page)  # no inline event handlers either
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched


@pytest.fixture(scope="module")
def probe(run_dir, chromium, tmp_path_factory) -> dict:
    """The report as the browser laid it out (one Chromium run for the tests that read it)."""
    tmp_path = tmp_path_factory.mktemp("probe")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text((run_dir / "report.html").read_text() + PROBE)
    dom = _browse(chromium, tmp_path, "--window-size=1200,1000", "--dump-dom", probe_page.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the probe did not run; Chromium returned: {dom[:500]!r}"
    return json.loads(html.unescape(found.group(1)))


def test_every_plot_and_series_is_drawn_by_the_browser(run_dir, probe):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    plots = {p["title"]: p for p in probe["plots"]}

    sites = sorted(rows[-1]["epsilon_per_site"])
    assert sites == ["site-0", "site-1"]
    expected = {
        "Loss": {"eval_loss", "test_loss"},  # no train_loss under DP-SGD: it stays at the sites
        "Accuracy and macro-F1": {"eval_accuracy", "eval_macro_f1"},
        "Accuracy at each site (its own held-out rows)": set(sites),
        "Privacy spent (ε)": {f"ε {s}" for s in sites},
        "Bytes per round": {"bytes_up", "bytes_down"},
        "Aggregation error": {"aggregation_error"},
    }
    for title, names in expected.items():
        assert title in plots, f"no plot {title!r}; plots: {list(plots)}"
        plot = plots[title]
        assert plot["width"] > 0 and plot["height"] > 0, plot
        drawn = {s["name"]: s for s in plot["series"]}
        assert names <= drawn.keys(), (title, list(drawn))
        for series in plot["series"]:
            assert series["points"] == ROUNDS, series
            assert series["length"] > 0, series
            x, y, w, h = series["box"]
            assert 0 <= x and x + w <= WIDTH and 0 <= y and y + h <= HEIGHT, series  # inside the axes' area

    # the per-site table: every site, with the privacy it spent
    header, table = probe["header"], {r[0]: dict(zip(probe["header"], r)) for r in probe["sites"]}
    assert header[0] == "site" and {"last_round", "epsilon", "delta", "eval_accuracy", "eval_count"} <= set(header)
    assert sorted(table) == sites
    for site in sites:
        assert table[site]["last_round"] == str(ROUNDS)
        assert float(table[site]["epsilon"]) == pytest.approx(rows[-1]["epsilon_per_site"][site], rel=1e-3)


def test_the_summary_in_words_is_seen_first(run_dir, probe):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = probe["summary"]
    assert summary, "no #summary on the page"
    assert summary["after"] == "summary"  # right under the title
    assert 0 <= summary["top"] < summary["viewport"] and summary["height"] > 0 and summary["visibility"] == "visible"
    assert summary["top"] + summary["height"] <= min(summary["plot"], summary["table"])  # above every plot and table
    text = summary["paragraphs"]
    assert set(text) == {"summary-trained", "summary-quality", "summary-weaker", "summary-privacy", "summary-traffic"}
    final = rows[-1]
    assert f"{100 * final['eval_accuracy']:.1f}%" in text["summary-quality"]  # the pooled figure, in words
    weak = rs.weaker_sites(rows)[3]  # the sites clearly below the pooled accuracy, from the rows themselves
    for site in weak:
        assert f"{site} {100 * final['eval_sites'][site]['eval_accuracy']:.1f}%" in text["summary-weaker"]
    assert bool(weak) != text["summary-weaker"].startswith("No site is clearly weaker")
    for site, eps in final["epsilon_per_site"].items():  # the privacy each site spent
        assert f"{site} {eps:.2f}" in text["summary-privacy"]
    totals = json.loads((run_dir / "summary.json").read_text())["totals"]
    assert rs.human_bytes(totals["bytes_up"]) in text["summary-traffic"]


def test_a_screenshot_of_the_report_shows_the_plots(run_dir, chromium, tmp_path):
    shot = tmp_path / "report.png"
    _browse(chromium, tmp_path, "--hide-scrollbars", "--window-size=1200,1000", f"--screenshot={shot}",
            (run_dir / "report.html").as_uri())
    pixels = _read_png(shot.read_bytes())
    assert pixels.shape[:2] == (1000, 1200)
    rgb = pixels[..., :3].reshape(-1, 3).astype(int)
    assert (rgb != 255).any(axis=1).mean() > 0.01  # not a blank page
    for colour in COLOURS[:2]:  # the first two series of a plot are painted in their colours
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - target).max(axis=1) <= 8).sum() > 100, colour


def _read_png(data: bytes) -> np.ndarray:
    """Pixels of an 8-bit RGB or RGBA PNG (what Chromium writes), without an imaging library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.uint8)
    prev = np.zeros(width * bpp, np.int64)
    for y in range(height):  # undo the per-row filters (PNG spec, section 9)
        kind, line = int(raw[y, 0]), raw[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:
            cur = (line + prev) % 256
        else:
            f, b, cur_list = line.tolist(), prev.tolist(), [0] * (width * bpp)
            for x in range(width * bpp):
                a = cur_list[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur_list[x] = (f[x] + (a + b[x]) // 2) % 256
                else:
                    c = b[x - bpp] if x >= bpp else 0
                    p = a + b[x] - c
                    pa, pb, pc = abs(p - a), abs(p - b[x]), abs(p - c)
                    cur_list[x] = (f[x] + (a if pa <= pb and pa <= pc else b[x] if pb <= pc else c)) % 256
            cur = np.array(cur_list, np.int64)
        out[y], prev = cur, cur
    return out.reshape(height, width, bpp)
