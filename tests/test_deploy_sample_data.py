"""`fedlora site sample-data`: a site's share of the synthetic corpus, as a file a trial site can use."""

from __future__ import annotations

import json

from fedlora.cli import main as fedlora_main
from fedlora.data import synthetic


def test_sample_data_writes_the_sites_share_as_jsonl(tmp_path, capsys):
    out = tmp_path / "data" / "notes.jsonl"
    assert fedlora_main(["site", "sample-data", str(out), "--site", "1", "--sites", "3", "--records", "40"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == synthetic.site_records(1, 3, 40, seed=0, alpha=0.5)  # what `fedlora simulate` gives site 1
    assert "wrote 40 synthetic notes" in capsys.readouterr().out
    other = tmp_path / "site0.jsonl"
    assert fedlora_main(["site", "sample-data", str(other), "--site", "0", "--sites", "3", "--records", "40"]) == 0
    assert other.read_text() != out.read_text()  # each site its own share
    # A site can check it and train on it: every row parses, every label is the run's.
    labels = ",".join(synthetic.LABELS)
    assert fedlora_main(["site", "check-data", str(out), "--labels", labels]) == 0
    # Refusals: an existing file (without --force), a site index outside 0..N-1.
    assert fedlora_main(["site", "sample-data", str(out), "--site", "0", "--sites", "3"]) == 1
    assert "exists" in capsys.readouterr().err
    assert fedlora_main(["site", "sample-data", str(out), "--force", "--site", "0", "--sites", "3",
                         "--records", "5", "--iid"]) == 0
    assert len(out.read_text().splitlines()) == 5
    assert fedlora_main(["site", "sample-data", str(tmp_path / "x.jsonl"), "--site", "3", "--sites", "3"]) == 1
    assert "site 3 not in [0, 3)" in capsys.readouterr().err
