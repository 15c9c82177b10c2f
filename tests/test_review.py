"""Blind human review at a site: the stored outputs, the verdict counts that are all that may leave the
site, and the review page in headless Chromium (served on 127.0.0.1, no script, a token in every link)."""

import json
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedlora.client import review
from fedlora.deploy.review_page import ReviewServer
from test_report_browser import FLAGS, _chromium

PAIR = "0123456789abcdef-vs-fedcba9876543210"
PROMPTS = [f"note {i}: chest pain <b>and</b> dyspnea" for i in range(6)]
CANDIDATE = ["cardiology", "neurology", "cardiology", "pulmonology", "orthopedics", "cardiology"]
CURRENT = ["cardiology", "cardiology", "neurology", "neurology", "orthopedics", "pulmonology"]  # rows 0, 4 agree


@pytest.fixture
def state(tmp_path) -> Path:
    review.keep_outputs(tmp_path, PAIR, "candidate", PROMPTS, CANDIDATE)
    review.keep_outputs(tmp_path, PAIR, "current", PROMPTS, CURRENT)
    return tmp_path


def _side(state: Path, index: int) -> str:
    """Which model the page shows as A on row `index` (the site's own record of the draw)."""
    return json.loads((state / review.FOLDER / PAIR / review.ASSIGNMENT).read_text())[index]


def test_rows_are_blind_and_identical_outputs_are_not_asked(state):
    shown = review.items(state, PAIR)
    assert [item["index"] for item in shown] == [1, 2, 3, 5]
    for item in shown:
        model_a = _side(state, item["index"])
        expected_a = (CANDIDATE if model_a == "candidate" else CURRENT)[item["index"]]
        assert item["A"] == expected_a and {item["A"], item["B"]} == {CANDIDATE[item["index"]], CURRENT[item["index"]]}
        assert set(item) == {"index", "prompt", "A", "B", "verdict"}  # nothing names the models
    assert review.items(state, PAIR) == shown  # the draw is kept: reloading the page does not swap sides
    assert oct((state / review.FOLDER / PAIR / "candidate.json").stat().st_mode & 0o777) == "0o600"


def test_counts_follow_the_verdicts_from_the_candidates_side(state):
    assert review.counts(state, PAIR) == {"wins": 0, "ties": 0, "losses": 0, "same": 2, "unrated": 4}
    review.rate(state, PAIR, 1, "A")
    review.rate(state, PAIR, 2, "B")
    review.rate(state, PAIR, 3, "tie")
    expected = {"wins": 0, "ties": 1, "losses": 0, "same": 2, "unrated": 1}
    for index, verdict in ((1, "A"), (2, "B")):
        chose_candidate = (_side(state, index) == "candidate") == (verdict == "A")
        expected["wins" if chose_candidate else "losses"] += 1
    assert review.counts(state, PAIR) == expected
    assert review.win_rate(expected) == pytest.approx((expected["wins"] + 0.5) / 3)
    review.rate(state, PAIR, 3, "A")  # a verdict can be changed; it is counted once
    assert sum(review.counts(state, PAIR)[k] for k in ("wins", "ties", "losses")) == 3


def test_what_cannot_be_rated_is_refused(state):
    with pytest.raises(review.ReviewError, match="no row 0"):
        review.rate(state, PAIR, 0, "A")  # both models said the same
    with pytest.raises(review.ReviewError, match="verdict"):
        review.rate(state, PAIR, 1, "C")
    with pytest.raises(review.ReviewError, match="not a review"):
        review.counts(state, "../../etc")
    assert review.counts(state, "1111111111111111-vs-2222222222222222") is None


@pytest.fixture
def server(state):
    server = ReviewServer(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_page_answers_only_with_its_token_and_its_own_host_name(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert server.server_address[0] == "127.0.0.1"
    assert _get(server.url) == 200
    assert _get(f"{base}/") == 403  # no token
    assert _get(f"{base}/rate/{PAIR}/1/A?token=wrong") == 403
    assert _get(server.url, host=f"evil.example:{server.server_address[1]}") == 403  # DNS rebinding
    assert review.counts(server.state, PAIR)["unrated"] == 4  # nothing was rated by those requests


def _dom(chromium: str, url: str, profile: Path) -> str:
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "dbus" not in line][-10:]
    return done.stdout


def test_an_expert_rates_in_the_browser_and_only_counts_change(server, tmp_path):
    chromium = _chromium()
    index_page = _dom(chromium, server.url, tmp_path / "p0")
    link = re.search(r'href="(/review/[^"]+)"', index_page).group(1).replace("&amp;", "&")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    page = _dom(chromium, base + link, tmp_path / "p1")
    assert "<script" not in page.lower()
    rows = re.findall(r'<div class="row" id="row-(\d+)" data-verdict="">', page)
    assert rows == ["1", "2", "3", "5"]
    assert "candidate" not in page and "current" not in page  # blind
    assert "&lt;b&gt;and&lt;/b&gt;" in page  # a record's text is shown as text, never as markup
    # the expert clicks "A is better" on row 2: the browser follows the link and the redirect back
    rate = re.search(r'href="(/rate/[^"]+/2/A\?token=[^"]+)"', page).group(1).replace("&amp;", "&")
    after = _dom(chromium, base + rate, tmp_path / "p2")
    assert re.search(r'id="row-2" data-verdict="A"', after) and "1 of 4 rated" in after
    counts = review.counts(server.state, PAIR)
    assert counts["unrated"] == 3
    assert counts["wins" if _side(server.state, 2) == "candidate" else "losses"] == 1


def test_verdicts_given_at_once_are_all_kept(state):
    """The page may get several clicks at once (two tabs, two reviewers): none is lost, the file stays whole."""
    rows = [item["index"] for item in review.items(state, PAIR)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: review.rate(state, PAIR, i, "tie"), rows * 10))
    assert review.counts(state, PAIR)["ties"] == len(rows)
    assert json.loads((state / review.FOLDER / PAIR / review.RATINGS).read_text()) == {str(i): "tie" for i in rows}


def test_a_pair_name_with_a_trailing_newline_is_not_a_review(state):
    with pytest.raises(review.ReviewError, match="not a review"):
        review.counts(state, PAIR + "\n")
