import json

import pytest

from fedlora import config as cfg
from fedlora.data import synthetic
from fedlora.data.partition import partition_indices, train_eval_split
from fedlora.data.readers import DataError, read_rows, site_files
from fedlora.data.sites import simulated_site_data
from fedlora.data.labels import infer_labels
from fedlora.tasks import CausalLMTask, ClassificationTask, build_task

TASK = ClassificationTask("text", "label", ["a", "b"])


def test_jsonl_error_names_file_line_and_problem(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "x", "label": "c"}\n')
    with pytest.raises(DataError, match=r"site.jsonl, line 2: label 'c' is not one of"):
        read_rows(path, TASK.check_row)
    path.write_text('{"text": "ok", "label": "a"}\n\n{broken\n')
    with pytest.raises(DataError, match=r"line 3: not valid JSON"):
        read_rows(path, TASK.check_row)


def test_bad_rows_are_skipped_only_when_asked_and_then_counted(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [{"text": "fine", "label": "a"}, {"text": "", "label": "a"}, {"label": "b"}, {"text": "also", "label": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    site = read_rows(path, TASK.check_row, skip_bad_rows=True)
    assert [r["text"] for r in site.rows] == ["fine", "also"]
    assert [line for line, _ in site.skipped] == [2, 3]
    assert "empty" in site.skipped[0][1] and "missing" in site.skipped[1][1]


def test_csv_rows_with_wrong_field_count_are_named(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('text,label\n"chest pain",a\n"too",b,many\n')
    with pytest.raises(DataError, match=r"s.csv, line 3: more fields"):
        read_rows(path, TASK.check_row)


def test_parquet_and_unsupported_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": ["a", "zzz"]}), path)
    with pytest.raises(DataError, match=r"s.parquet, row 2: label 'zzz'"):
        read_rows(path, TASK.check_row)
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "s.txt", TASK.check_row)


def test_causal_lm_row_shapes_are_checked():
    t = CausalLMTask()
    assert t.check_row({"prompt": "Q", "completion": "A"}) is None
    assert t.check_row({"instruction": "Do", "input": "", "output": "done"}) is None
    assert t.check_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) is None
    assert "last message" in t.check_row({"messages": [{"role": "user", "content": "hi"}]})
    assert "completion" in t.check_row({"prompt": "Q", "completion": ""})
    assert "expected" in t.check_row({"text": "x"})


def test_site_folder_duplicate_sites_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "a.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="two files for site 'a'"):
        site_files(tmp_path)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "column"])
def test_partitions_cover_every_row_exactly_once(scheme):
    rows = [{"label": "ab"[i % 3 == 0], "hospital": f"h{i % 4}"} for i in range(203)]
    parts = partition_indices(rows, 4, scheme, seed=1, alpha=0.3, column="hospital")
    assert sorted(i for p in parts for i in p) == list(range(203))
    assert all(parts) and len(parts) == 4
    assert parts == partition_indices(rows, 4, scheme, seed=1, alpha=0.3, column="hospital")


def test_column_partition_must_match_site_count():
    rows = [{"h": "x"}, {"h": "y"}, {"h": "x"}, {"h": "y"}]
    with pytest.raises(DataError, match="2 distinct values"):
        partition_indices(rows, 3, "column", column="h")


def test_train_eval_split_is_disjoint_and_deterministic():
    train, held = train_eval_split(50, 0.2, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(50))
    assert (train, held) == train_eval_split(50, 0.2, seed=3)


def test_synthetic_sites_are_deterministic_and_non_iid():
    a = synthetic.site_records(0, 4, 200, seed=0)
    assert a == synthetic.site_records(0, 4, 200, seed=0)
    mixes = [{lab: sum(r["label"] == lab for r in synthetic.site_records(k, 4, 400)) / 400 for lab in synthetic.LABELS}
             for k in range(4)]
    # Label mix differs strongly between some pair of sites.
    spread = max(max(abs(m1[lab] - m2[lab]) for lab in synthetic.LABELS) for m1 in mixes for m2 in mixes)
    assert spread > 0.2
    # Writing style differs: abbreviations at the abbreviated site, not at the formal one.
    assert sum("c/o" in r["text"] for r in synthetic.site_records(1, 4, 200)) > 150
    assert sum("c/o" in r["text"] for r in synthetic.site_records(0, 4, 200)) < 30
    test = synthetic.central_test_records(100)
    assert {r["label"] for r in test} == set(synthetic.LABELS)


def _label_spread(alpha):
    mixes = [[sum(r["label"] == lab for r in synthetic.site_records(k, 4, 400, alpha=alpha)) / 400
              for lab in synthetic.LABELS] for k in range(4)]
    return max(max(abs(a - b) for a, b in zip(m1, m2)) for m1 in mixes for m2 in mixes)


def test_synthetic_corpus_follows_the_partition_keys():
    # IID: every site the same label and style mix (only sampling noise and the 8% label noise differ).
    assert _label_spread(None) < 0.12
    assert _label_spread(0.1) > _label_spread(1.0) > _label_spread(None)
    assert sum("c/o" in r["text"] for r in synthetic.site_records(1, 4, 200, alpha=None)) < 100
    assert synthetic.site_records(2, 4, 50) == synthetic.site_records(2, 4, 50, alpha=0.5)  # the default scenario
    with pytest.raises(ValueError, match="alpha"):
        synthetic.site_records(0, 4, 10, alpha=0)
    iid = cfg.load_config(None, ["data.partition=iid", "data.records-per-site=40"])
    rows = simulated_site_data(1, 4, iid, build_task(infer_labels(iid)))
    assert len(rows.train) + len(rows.eval) == 40
    with pytest.raises(cfg.ConfigError, match="needs data.path"):
        cfg.load_config(None, ["data.partition=column", "data.partition-column=site"])


def test_simulated_site_reads_its_share_of_one_file(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i}", "label": "ab"[i % 2]}) + "\n" for i in range(100)))
    c = cfg.load_config(None, [f"data.path={json.dumps(str(path))}", "data.partition=iid", "task.labels=a,b"])
    shares = [simulated_site_data(k, 4, c, TASK) for k in range(4)]
    texts = [r["text"] for s in shares for r in s.train + s.eval]
    assert sorted(texts) == sorted(f"note {i}" for i in range(100))
    assert all(len(s.eval) == 5 for s in shares)
