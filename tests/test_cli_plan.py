"""``lhf plan`` end to end: the printed per-rank tables are consistent with the model they describe."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from lhf_torchrec import fit_mapping, save_mappings
from lhf_torchrec.cli import main
from lhf_torchrec.distributed.presets import CRITEO_KAGGLE_CARDINALITIES, CRITEO_TERABYTE_CARDINALITIES

GB = 1024**3
COLUMNS = ("tables", "optimizer", "io", "replicated", "co-sharded", "reserved", "total")
_ROW = re.compile(r"^  (rank \d+|min|median|max|sum \(\d+\))\s+((?:-?\d+\.\d+\s*)+)")


def _sections(text):
    """{'before': {row name: {column: GB}}, 'after': ...} from the printed report."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith(("before (full tables)", "after (learned hash)")):
            current = sections.setdefault(line.split(" ", 1)[0], {})
            continue
        match = _ROW.match(line)
        if current is not None and match:
            numbers = [float(x) for x in match.group(2).split()]
            current.setdefault(match.group(1), dict(zip(COLUMNS, numbers)))
    return sections


def _compression_line(text):
    """(cluster-wide ratio, tables GB before, tables GB after) from the cluster line."""
    match = re.search(r"^cluster: .* \(([\d.]+)x; every mapping replica and shard counted\); tables ([\d.]+) GB -> ([\d.]+) GB",
                      text, re.MULTILINE)
    return float(match.group(1)), float(match.group(2)), float(match.group(3))


def test_small_world_size_prints_one_consistent_row_per_rank():
    result = subprocess.run(
        [sys.executable, "-m", "lhf_torchrec.cli", "plan", "--preset", "criteo-kaggle", "--world-size", "4",
         "--compression", "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    sections = _sections(result.stdout)
    full_gb = sum(CRITEO_KAGGLE_CARDINALITIES) * 128 * 4 / GB
    ratio, before_tables, after_tables = _compression_line(result.stdout)
    assert 9.0 < ratio <= 10.0
    assert before_tables == pytest.approx(full_gb, abs=0.005)
    for name, section in sections.items():
        ranks = [row for key, row in section.items() if key.startswith("rank")]
        assert len(ranks) == 4, (name, section)
        total = section["sum (4)"]
        for column in COLUMNS:
            assert sum(r[column] for r in ranks) == pytest.approx(total[column], abs=0.003)
        for r in ranks:
            assert r["total"] == pytest.approx(sum(r[c] for c in COLUMNS[:-1]), abs=0.003)
    before, after = sections["before"], sections["after"]
    # Every table is split or placed whole (no replicas): the ranks' tables add up to the model's.
    assert before["sum (4)"]["tables"] == pytest.approx(full_gb, abs=0.003)
    assert after["sum (4)"]["tables"] == pytest.approx(after_tables, abs=0.006)
    # At 4 ranks every compressed Criteo Kaggle table co-shards (4 buckets): no replicated mapping, and
    # each rank holds a quarter of every co-sharded mapping.
    ranks = [row for key, row in after.items() if key.startswith("rank")]
    assert all(row["replicated"] == 0 and row["co-sharded"] > 0 for row in ranks)
    assert max(row["co-sharded"] for row in ranks) == pytest.approx(after["sum (4)"]["co-sharded"] / 4, abs=0.002)
    assert all(row["replicated"] == row["co-sharded"] == 0 for row in before.values())
    assert "co-sharded, row_wise (4 buckets, 1 per rank): 10 tables" in result.stdout
    assert after["sum (4)"]["total"] < before["sum (4)"]["total"]
    assert max(r["total"] for k, r in after.items() if k.startswith("rank")) < max(
        r["total"] for k, r in before.items() if k.startswith("rank")
    )


def test_large_world_size_prints_a_summary(capsys):
    assert main(["plan", "--preset", "criteo-1tb", "--world-size", "256", "--compression", "10"]) == 0
    out = capsys.readouterr().out
    assert "topology: 256 ranks (8 per host), cuda, 80.00 GB HBM per rank" in out
    sections = _sections(out)
    for section in sections.values():
        assert {"min", "median", "max", "sum (256)"} <= set(section)
        assert section["min"]["total"] <= section["median"]["total"] <= section["max"]["total"]
        assert sum(1 for key in section if key.startswith("rank")) == 3  # the most loaded ranks
    full_gb = sum(CRITEO_TERABYTE_CARDINALITIES) * 128 * 4 / GB
    assert sections["before"]["sum (256)"]["tables"] == pytest.approx(full_gb, abs=0.003)
    ratio, _, after_tables = _compression_line(out)
    assert sections["after"]["sum (256)"]["tables"] == pytest.approx(after_tables, abs=0.006)
    assert 9.0 < ratio <= 10.0
    # The co-sharded tables are row-wise, whose input/output buffers (io) TorchRec estimates for the
    # global batch on every rank: the cluster's weights, optimizer state and mappings shrink, io grows.
    model_gb = {name: sum(section["sum (256)"][c] for c in ("tables", "optimizer", "replicated", "co-sharded"))
                for name, section in sections.items()}
    assert model_gb["before"] / model_gb["after"] == pytest.approx(ratio, rel=0.01)
    assert "co-sharded, row_wise (256 buckets, 1 per rank): 13 tables" in out
    assert sections["after"]["max"]["tables"] < sections["before"]["max"]["tables"]


def test_a_model_that_does_not_fit_exits_non_zero_naming_ranks(capsys):
    code = main(["plan", "--preset", "criteo-1tb", "--world-size", "2", "--hbm-gb", "4", "--compression", "10"])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: after compression, the model does not fit in 4.00 GB of HBM per rank on 2 ranks" in captured.err
    assert re.search(r"needs at least [\d.]+ GB per rank \(short by [\d.]+ GB per rank\)", captured.err)
    assert re.search(r"rank [01] needs [\d.]+ GB \(short by [\d.]+ GB\)", captured.err)
    assert "after (learned hash): DOES NOT FIT" in captured.out


def test_tables_file_and_mappings_file(tmp_path, capsys):
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([
        {"name": "users", "num_embeddings": 300_000, "embedding_dim": 32},
        {"name": "item", "num_embeddings": 40_000},
    ]))
    ids = np.random.default_rng(0).zipf(1.3, 50_000) % 300_000
    mapping = fit_mapping(ids, method="frequency", num_rows=30_000, table="users")
    save_mappings(str(tmp_path / "m.safetensors"), {"users": mapping})
    argv = ["plan", "--tables", str(tables), "--world-size", "2", "--compute-device", "cpu", "--ddr-gb", "2",
            "--embedding-dim", "16", "--optimizer", "adagrad", "--mappings", str(tmp_path / "m.safetensors")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dim 16/32, optimizer adagrad" in out and "2.00 GB DDR per rank" in out
    assert "mappings: given, 1 tables" in out
    after = _sections(out)["after"]
    assert after["rank 0"]["replicated"] == after["rank 1"]["replicated"] == pytest.approx(mapping.nbytes / GB, abs=5e-4)
    assert "replicated: users (not bucketed: fit it with num_buckets)" in out

    assert main(argv + ["--num-buckets", "4"]) == 2
    assert "--num-buckets is for synthetic mappings" in capsys.readouterr().err

    for bad, error in (('{"users": "many"}', "num_embeddings must be an integer"),
                       ('{"items": 100}', "table names ['items'] are not usable"),
                       ("[1, 2]", "expected")):
        tables.write_text(bad)
        assert main(["plan", "--tables", str(tables), "--world-size", "2", "--compression", "4"]) == 2
        assert error in capsys.readouterr().err
