"""fedlora.progress: a bar only for a person at a terminal; and the round watch that feeds it."""

import io
import json

from fedlora.progress import echo, progress
from fedlora.progress import round_line, watch_rounds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_item_passes_and_nothing_is_written_when_stderr_is_not_a_terminal(capsys):
    assert list(progress(iter(range(5)), "rounds", total=5)) == [0, 1, 2, 3, 4]  # pytest's stderr: no tty
    echo("a line")
    assert capsys.readouterr() == ("a line\n", "")


def test_a_terminal_gets_a_bar_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FEDLORA_NO_PROGRESS", raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert list(progress(["a", "b", "c"], "rounds", unit="round")) == ["a", "b", "c"]
    assert "rounds" in terminal.getvalue() and "3/3" in terminal.getvalue()

    monkeypatch.setenv("FEDLORA_NO_PROGRESS", "1")
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert list(progress(range(3), "rounds")) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_watch_rounds_yields_each_row_once_as_it_is_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"round": r, "eval_loss": 1.0 / r, "round_seconds": 2.0} for r in (1, 2, 3)]
    writes = iter([json.dumps(rows[0]) + "\n", json.dumps(rows[1]) + "\n" + json.dumps(rows[2])[:10],
                   json.dumps(rows[2])[10:] + "\n"])  # round 3 arrives in two pieces

    def running() -> bool:
        chunk = next(writes, None)
        if chunk is not None:
            with metrics.open("a") as fh:
                fh.write(chunk)
        return chunk is not None

    assert list(watch_rounds(tmp_path, running, poll=0)) == rows
    assert round_line(rows[0], 3) == "  round 1/3 · eval_loss 1.0000 · 2.0s"
