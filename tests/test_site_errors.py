"""Nothing derived from a row, and no local path, leaves a site in an error.

Replays what an audit found on a loopback deployment: a malformed row at a
site (a patient's name, MRN and phone number typed into the label column) made
the site's error reply, and the coordinator's log, carry the file's path, the
line number and the full label. Now the site logs the detail itself and the
coordinator gets a category and a count.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Context, RecordDict

from fedlora import config as cfg
from fedlora import flower, wire
from fedlora.client.app import app as site_app
from fedlora.client.mods import upstream_reason
from fedlora.data import synthetic
from fedlora.data.readers import DataError
from fedlora.server.app import main
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid

SECRETS = ("Jane Roe", "4471-22", "555-0142", "ward7-private")


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply as the coordinator received it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.received += replies
        return replies


def test_a_bad_row_stays_at_the_site_and_the_coordinator_gets_a_category_and_a_count(tmp_path, caplog):
    folder = tmp_path / "ward7-private"
    folder.mkdir()
    rows = synthetic.site_records(2, 3, 30, seed=0)
    rows[4] = {"text": rows[4]["text"], "label": "Jane Roe MRN 4471-22 (617) 555-0142"}  # typed into the label
    rows[9] = {"text": rows[9]["text"], "label": "cardiology, call (617) 555-0142"}
    data = folder / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = cfg.load_config(None, ["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=30",
                                    "train.local-steps=1", "federation.rounds=1", "federation.num-sites=3",
                                    f"task.labels={','.join(synthetic.LABELS)}", f'output.dir="{tmp_path / "run"}"'])
    grid = RecordingGrid(site_app, config.to_flat(), 3)
    hospital = list(grid.contexts.values())[2]
    hospital.node_config.update({"data-path": str(data), "site": "hospital-c"})  # deployed: its own file
    with caplog.at_level(logging.INFO, logger="fedlora"):
        main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                           run_config=config.to_flat()))

    errors = [r.error.reason for r in grid.received if r.has_error()]
    assert errors and all("DataError: the site's data has 2 unusable row(s)" in e for e in errors)
    coordinator = [r.getMessage() for r in caplog.records if r.name.startswith("fedlora.server")]
    assert any("2 unusable row(s)" in line for line in coordinator)  # the coordinator knows what failed
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file()
                      and p.suffix in (".jsonl", ".json", ".html", ".toml"))
    for secret in SECRETS:
        assert not any(secret in e for e in errors), secret
        assert not any(secret in line for line in coordinator), secret
        assert secret not in written, secret
    site_log = "\n".join(r.getMessage() + str(r.exc_text or r.exc_info) for r in caplog.records
                         if r.name.startswith("fedlora.client"))
    assert "555-0142" in site_log and "ward7-private" in site_log  # the site's own log has the detail
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["final"]["sites"] == 2  # the other sites went on


def test_only_protocol_and_configuration_errors_travel_with_their_message():
    assert upstream_reason(cfg.ConfigError(["lora.rank: 0 must be >= 1"])).endswith("lora.rank: 0 must be >= 1")
    leak = DataError("/secret/ward7/notes.jsonl, line 5: label 'Jane Roe' is not one of task.labels", bad_rows=1)
    assert upstream_reason(leak) == ("DataError: the site's data has 1 unusable row(s); the site's own log "
                                     "names them")
    assert upstream_reason(FileNotFoundError("/secret/ward7/model")) == \
        "FileNotFoundError at the site; the site's own log has the details"
    assert wire.SITE_FAILED not in (wire.BUDGET_EXHAUSTED, wire.CLEAR_UPLOAD_REFUSED)
