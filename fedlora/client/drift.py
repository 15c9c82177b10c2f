"""What a site trained on, kept at the site, and the drift figures it may share.

When the site trains, it writes a training snapshot to its state folder
(`drift-snapshot.json`, mode 600): aggregate statistics of the rows it read
(record count, label counts, word-frequency table; fedlora.data.drift) and
when; when it evaluates the global adapter, the accuracy on its held-out rows
joins it. The snapshot is never sent: its word table is as sensitive as the
notes. What may identify it upstream is `snapshot_digest`, an HMAC-SHA256
keyed with a random secret of the site's own (`drift-key`), so a coordinator
cannot test guesses of its content.

`fedlora site drift` compares the site's data now with the snapshot. The
ClientApp answers the coordinator's drift query (`wire.DRIFT_QUERY`) with
`answer`'s figures only when the site's node config says `share-drift = true`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlora import wire
from fedlora.client.private_files import secret, write_private
from fedlora.data import drift
from fedlora.privacy.budget import PrivacyStateError, state_dir

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "drift-snapshot.json"
KEY_FILE = "drift-key"
NODE_SHARE_DRIFT = "share-drift"   # node config: answer the coordinator's drift query (default: no)
STATISTICS = ("records", "label_counts", "word_counts")  # what the digest covers: the data, not the times
SHARED_DIGITS = 3                  # figures leave the site rounded to this many decimals
TRAINED_IN_RUN = "fedlora-drift-trained"  # context.state: this site trained in this run


def site_folder(config, node: Mapping[str, Any], site: str) -> Path | None:
    """The site's state folder (its privacy ledger's), or None when it has none (a deployed site
    without a state-dir keeps no snapshot)."""
    try:
        return state_dir(node, config.output.dir, site, simulated="data-path" not in node)
    except PrivacyStateError:
        return None


def now_utc() -> datetime:
    return datetime.now(UTC)


def load_snapshot(path: str | Path) -> dict | None:
    """The snapshot in a state folder (or the snapshot file itself); None when there is none."""
    path = Path(path).expanduser()
    file = path / SNAPSHOT_FILE if path.is_dir() else path
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def record_training(folder: Path, rows: Iterable[Mapping], text_column: str, label_column: str | None,
                    when: datetime | None = None) -> dict:
    """Write the snapshot of the rows the site trains on. The accuracy recorded at training is kept
    while the data are the same, and dropped when they changed (it measured another model)."""
    stats = drift.profile(rows, text_column, label_column)
    old = load_snapshot(folder) or {}
    same = all(old.get(k) == stats[k] for k in STATISTICS)
    snapshot = {"version": 1, "trained_at": (when or now_utc()).isoformat(timespec="seconds"), **stats}
    if same:
        snapshot.update({k: old[k] for k in ("accuracy", "accuracy_records", "evaluated_at") if k in old})
    write_private(folder / SNAPSHOT_FILE, json.dumps(snapshot, sort_keys=True))
    return snapshot


def record_accuracy(folder: Path, correct: int, count: int, when: datetime | None = None) -> None:
    """The global adapter's accuracy on the site's held-out rows, beside the snapshot it trained on
    (nothing when the site has not trained)."""
    snapshot = load_snapshot(folder)
    if snapshot is None or count <= 0:
        return
    snapshot.update({"accuracy": correct / count, "accuracy_records": count,
                     "evaluated_at": (when or now_utc()).isoformat(timespec="seconds")})
    write_private(folder / SNAPSHOT_FILE, json.dumps(snapshot, sort_keys=True))


def site_key(folder: Path) -> bytes:
    """The site's own secret for digests (created on first use; never leaves the site)."""
    folder.mkdir(parents=True, exist_ok=True)
    return secret(folder / KEY_FILE)


def digest(snapshot: Mapping, key: bytes) -> str:
    """HMAC-SHA256 of the snapshot's statistics under the site's key: names the snapshot upstream
    without letting anyone who lacks the key test a guess of its content."""
    body = json.dumps({k: snapshot[k] for k in STATISTICS}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def snapshot_digest(folder: str | Path) -> str | None:
    """The digest of the snapshot in the site's state folder; None when it has none."""
    folder = Path(folder).expanduser()
    snapshot = load_snapshot(folder)
    return None if snapshot is None else digest(snapshot, site_key(folder))


def age_days(snapshot: Mapping, when: datetime | None = None) -> float:
    """Days since the snapshot's training."""
    trained = datetime.fromisoformat(snapshot["trained_at"])
    return max(0.0, ((when or now_utc()) - trained).total_seconds() / 86400)


def shares_drift(node: Mapping[str, Any]) -> bool:
    """Whether the site's node config lets it answer the drift query."""
    value = node.get(NODE_SHARE_DRIFT, False)
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _shown(value: float | None) -> float:
    return -1.0 if value is None or not math.isfinite(value) else round(float(value), SHARED_DIGITS)


def answer(snapshot: Mapping | None, now: Mapping, limits: drift.Thresholds | None = None,
           when: datetime | None = None) -> dict[str, float]:
    """The drift query's answer (MetricRecord values): the figures of `now` (a profile of the site's
    rows) against its snapshot, rounded, and whether retraining is due by `limits`. No record count,
    no word, no label: a count would give the site's size away, which secure aggregation hides."""
    if snapshot is None:
        return {wire.DRIFT_HAS_SNAPSHOT: 0.0}
    figures = drift.compare(snapshot, now)
    age = age_days(snapshot, when)
    due = drift.verdict(figures, limits or drift.Thresholds(), age_days=age).due
    return {wire.DRIFT_HAS_SNAPSHOT: 1.0, wire.DRIFT_LABEL_PSI: _shown(figures.label_psi),
            wire.DRIFT_LABEL_CHI2_P: _shown(figures.label_chi2_p), wire.DRIFT_TEXT_JS: _shown(figures.text_js),
            wire.DRIFT_UNSEEN_WORDS: _shown(figures.unseen_word_share), wire.DRIFT_DAYS: float(math.floor(age)),
            wire.DRIFT_DUE: 1.0 if due else 0.0}
