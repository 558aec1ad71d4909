"""A user's own CSV end to end: no table sizes given, ids of every shape, the benchmark and `lhf train`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lhf_torchrec.cli import main
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.training.model import make_tables

SPEC = {"label": "click", "categorical": ["user", "item", "ad", "site", "flag", "tags"],
        "multi_valued": {"tags": {"separator": "|", "max_values": 4}}}


def write_ids_only_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """Clicks driven by the user's group, with no dense column: string user ids, dense integer items,
    sparse integers of 13+ digits for ads, strings with missing values, small integers with missing,
    bags of 0 to 4 string tags."""
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.4, rows) % 400
    click_rate = np.where(users % 3 == 0, 0.6, 0.08)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["click", "user", "item", "ad", "site", "flag", "tags"])
        for i in range(rows):
            out.writerow([
                int(rng.random() < click_rate[i]),
                f"user-{users[i]:x}",
                int(rng.integers(0, 300)),
                int(rng.integers(0, 500)) * 10**12 + 7,
                "" if rng.random() < 0.3 else f"site.{rng.integers(0, 40)}.example",
                "" if rng.random() < 0.5 else int(rng.integers(0, 3)),
                "|".join(f"tag-{t}" for t in rng.integers(0, 300, rng.integers(0, 5))),
            ])
    return path


@pytest.fixture(scope="module")
def ids_csv(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("csv")
    spec = folder / "spec.json"
    spec.write_text(json.dumps(SPEC))
    return str(write_ids_only_csv(folder / "my_clicks.csv", 2500)), str(spec)


def test_tables_are_sized_from_the_data_and_named_after_the_file(ids_csv, tmp_path) -> None:
    data_path, spec_path = ids_csv
    data = load_split(DatasetSpec("csv", [data_path], csv_spec=spec_path), embedding_dim=8)
    assert data.name == "my_clicks"
    rows = {t.name: t.num_embeddings for t in data.tables}
    assert rows["t_item"] == 300  # integer-coded: its id space
    assert rows["t_flag"] == 3
    assert 100 < rows["t_user"] <= 401 and 400 < rows["t_ad"] <= 501  # vocabularies, + 1 unseen row
    assert 30 < rows["t_site"] <= 41
    assert 250 < rows["t_tags"] <= 301  # one table for the values of every bag
    assert data.train.feature_names == ["user", "item", "ad", "site", "flag", "tags"]
    named = tmp_path / "named.json"
    named.write_text(json.dumps({**SPEC, "name": "shop clicks"}))
    assert load_split(DatasetSpec("csv", [data_path], csv_spec=str(named)), embedding_dim=8).name == "shop clicks"


def test_a_table_that_cannot_be_allocated_names_its_feature() -> None:
    with pytest.raises(ValueError, match=r"table 't_user' \(features \['user'\]\): 9,223,372,036,854,775,807 rows "
                                         r"x 16 cannot be allocated"):
        make_tables(["item", "user"], [300, 2**63 - 1], 16)


def test_quality_benchmark_on_a_csv_of_ids(ids_csv, tmp_path, capsys) -> None:
    data_path, spec_path = ids_csv
    data = ["--data", "csv", "--data-path", data_path, "--csv-spec", spec_path, "--batch-size", "128",
            "--embedding-dim", "8"]
    out = tmp_path / "bench"
    assert main(["bench", "quality", *data, "--seeds", "0", "--compressions", "10",
                 "--methods", "full", "hash", "combination", "--out-dir", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["method"], r["compression"]) for r in records] == [
        ("my_clicks", "full", 1.0), ("my_clicks", "hash", 10), ("my_clicks", "combination", 10)]
    assert all(r["steps"] == 2000 // 128 and 0 < r["test"]["logloss"] < 1 for r in records)
    assert records[1]["total_bytes"] < 0.2 * records[0]["full_bytes"]
    report = (out / "results.md").read_text()
    assert "| my_clicks | combination | 10x |" in report
    err = capsys.readouterr().err
    assert "[1/3] my_clicks full full seed 0: test logloss" in err and "[3/3] my_clicks combination 10x" in err

    quick = tmp_path / "quick"  # --quick takes the data given, not the synthetic smoke set
    assert main(["bench", "quality", "--quick", *data, "--methods", "hash", "--out-dir", str(quick)]) == 0
    records = json.loads((quick / "results.json").read_text())
    assert [(r["dataset"], r["method"], r["compression"], r["seed"]) for r in records] == [("my_clicks", "hash", 10, 0)]

    # Another run into a folder that holds a report is refused before it trains anything.
    before = (quick / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["bench", "quality", "--quick", *data, "--methods", "full", "--out-dir", str(quick)]) == 2
    assert f"--out-dir {quick} already holds a quality report (results.md, results.json, quality_vs_bytes.png)" \
        in capsys.readouterr().err
    assert (quick / "results.json").read_bytes() == before


def test_train_says_when_the_model_learned_nothing(ids_csv, tmp_path, capsys) -> None:
    data_path, spec_path = ids_csv
    results = tmp_path / "train.json"
    assert main(["train", "--data", "csv", "--data-path", data_path, "--csv-spec", spec_path, "--batch-size", "64",
                 "--max-steps", "1", "--no-progress", "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    warning = record["warning"]
    # The synthetic generator's settings are not recorded for a file.
    assert record["dataset"]["kind"] == "csv" and not {"rows", "scale"} & set(record["dataset"])
    assert warning.startswith("the model learned nothing: validation NE ") and "after 1 training steps" in warning
    assert warning in capsys.readouterr().err


def test_a_column_first_filled_after_the_training_rows_gets_one_row(tmp_path) -> None:
    import torch

    from lhf_torchrec.pipeline.steps import fit_mappings, profile_tables

    path = tmp_path / "late.csv"
    path.write_text("y,user,late\n" + "".join(f"{i % 2},u{i % 9},{f'x{i}' if i >= 90 else ''}\n" for i in range(100)))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"label": "y", "categorical": ["user", "late"]}))
    data = load_split(DatasetSpec("csv", [str(path)], csv_spec=str(spec)), embedding_dim=4)
    assert {t.name: t.num_embeddings for t in data.tables}["t_late"] == 11  # 10 ids in the file + 1 unseen
    full = fit_mappings(data.tables, profile_tables(data.train, data.tables), "full", compression=1)
    assert full.rows["t_late"] == 1  # no id in training: every id is unseen and shares one row
    assert full.compression.mappings["t_late"](torch.tensor([5, 1 << 62])).tolist() == [0, 0]


def test_an_event_log_sorted_by_user_splits_in_time_order(tmp_path) -> None:
    """A user-behaviour log as such logs are published: no header, sorted by user, the label an event
    type, a unix time column."""
    import gzip

    rng = np.random.default_rng(0)
    events = [(u, int(rng.integers(0, 80)), str(rng.choice(["pv", "pv", "pv", "cart", "buy"])),
               1_511_500_000 + int(rng.integers(0, 10**6))) for u in range(150) for _ in range(8)]
    path = tmp_path / "UserBehavior.csv.gz"
    path.write_bytes(gzip.compress("".join(f"{u},{i},{b},{t}\n" for u, i, b, t in events).encode()))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"label": "behavior", "categorical": ["user", "item"], "header": False,
                                "column_names": ["user", "item", "behavior", "timestamp"],
                                "positive_labels": ["buy", "cart"], "order_by": "timestamp"}))
    data = load_split(DatasetSpec("csv", [str(path)], csv_spec=str(spec)), embedding_dim=4)
    assert data.name == "UserBehavior"
    by_time = sorted(events, key=lambda e: e[3])
    loaded = [data.train.load(), data.validation.load(), data.test.load()]
    assert [len(d) for d in loaded] == [960, 120, 120]
    np.testing.assert_array_equal(np.concatenate([d.sparse[:, 0] for d in loaded]), [e[0] for e in by_time])
    np.testing.assert_array_equal(np.concatenate([d.labels for d in loaded]),
                                  [float(e[2] != "pv") for e in by_time])
    # The test users are the training users (in file order they would be the last 15 users, all unseen).
    assert set(loaded[2].sparse[:, 0]) <= set(loaded[0].sparse[:, 0])


@pytest.mark.parametrize("example, name, header, delimiter", [
    ("ml-100k-ratings.json", "ml-100k ratings (csv)", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n",
     "\t"),  # RecBole's ml-100k.inter, as docs/results.md runs it
    ("ml-1m-ratings.json", "ml-1m ratings (dat)", "", "::"),  # MovieLens-1M's ratings.dat, as GroupLens ships it
])
def test_the_example_specs_read_rating_logs(tmp_path, example: str, name: str, header: str, delimiter: str) -> None:
    """The specs in examples/csv/ read a rating log of their format: ids, the rating as a click, time order."""
    spec = Path(__file__).parents[2] / "examples" / "csv" / example
    path = tmp_path / "ratings.log"
    rows = [(196, 242, 3, 881250949), (186, 302, 5, 891717742), (22, 377, 1, 878887116), (244, 51, 4, 880606923)]
    path.write_text(header + "".join(delimiter.join(map(str, r)) + "\n" for r in rows * 5))
    data = load_split(DatasetSpec("csv", [str(path)], csv_spec=str(spec), split=(0.5, 0.25, 0.25)), embedding_dim=4)
    assert data.name == name
    loaded = [split.load() for split in (data.train, data.validation, data.test)]
    by_time = sorted(rows * 5, key=lambda r: r[3])
    np.testing.assert_array_equal(np.concatenate([d.sparse[:, 1] for d in loaded]), [r[1] for r in by_time])
    np.testing.assert_array_equal(np.concatenate([d.labels for d in loaded]), [float(r[2] >= 4) for r in by_time])
