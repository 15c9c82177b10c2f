import json
import re

from fedlora.server.report import line_chart, write_report


def _run_dir(tmp_path):
    rows = [{"round": r, "train_loss": 1.0 / r, "eval_loss": 1.2 / r, "eval_accuracy": 0.5 + 0.1 * r,
             "eval_macro_f1": 0.4 + 0.1 * r, "bytes_up": 1000, "bytes_down": 2000, "round_seconds": 1.5,
             "epsilon_per_site": {"site-a": 0.5 * r, "site-b": 0.4 * r}} for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"strategy": "fedit", "rounds": 3,
                                                        "sites": {"site-a": {"last_round": 3}},
                                                        "parameters": {"adapter": 10, "base": 1000}}))
    return tmp_path


def test_report_has_a_plot_per_recorded_quantity_and_the_tables(tmp_path):
    page = write_report(_run_dir(tmp_path)).read_text()
    titles = re.findall(r'<svg class="plot" role="img" aria-label="([^"]+)"', page)
    assert titles == ["Loss", "Accuracy and macro-F1", "Privacy spent (ε)", "Bytes per round"]
    names = re.findall(r'class="series" data-name="([^"]+)"', page)
    assert {"train_loss", "eval_loss", "eval_accuracy", "ε site-a", "ε site-b", "bytes_up"} <= set(names)
    assert "<td>site-a</td>" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_points_follow_the_data():
    svg = line_chart("t", {"s": [(1, 0.0), (2, 1.0), (3, 0.5)]})
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[1] < ys[2] < ys[0]  # SVG y grows downwards: the highest value is drawn highest
    assert line_chart("empty", {"s": []}) == ""
