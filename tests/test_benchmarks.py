"""Smoke runs of the benchmarks (no thresholds: benchmarks measure, tests only check they run)."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quality_benchmark_quick_mode_runs_every_method(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    from lhf_torchrec.bench.quality import QUALITY_METHODS

    labels = {m if isinstance(m, str) else m.label for m in QUALITY_METHODS}
    records = json.load(open(tmp_path / "results.json"))
    assert {r["method"] for r in records} == labels
    assert all(0 < r["test"]["logloss"] < 1 and r["total_bytes"] > 0 for r in records)
    bucketed = {m.label for m in QUALITY_METHODS if not isinstance(m, str) and "num_buckets" in m.hyperparams}
    totals = [r["total_bytes"] for r in records if r["method"] != "full" and r["method"] not in bucketed]
    assert max(totals) <= 1.05 * min(totals)  # every method at (nearly) the same total bytes
    assert max(totals) < 0.2 * records[0]["full_bytes"]
    # Bucketed mappings round each table's rows down to whole buckets (up to B - 1 rows fewer per table:
    # 7.6% of the bytes of these tiny tables), never up; their entries are keyed by 8-byte bucket hash
    # (12 bytes per entry, against 4 to 8 unbucketed), which costs these tiny tables about one more
    # bucket of rows (measured: 0.854 of the unbucketed totals).
    assert all(0.8 * min(totals) <= r["total_bytes"] <= max(totals) for r in records if r["method"] in bucketed)
    assert (tmp_path / "quality_vs_bytes.png").stat().st_size > 10_000
    assert "Where combination wins and loses" in (tmp_path / "results.md").read_text()


def test_embedding_signal_benchmark_quick_mode_measures_every_method(tmp_path):
    out_file = tmp_path / "embedding_signal.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "embedding_signal.py"), "--quick",
                          "--out", str(out_file)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out_file.read_text()
    for method in ("hash", "frequency", "learned", "combination"):
        assert text.count(f"| {method} |") == 6  # 3 budgets x (groups, effects)
    assert "| 10x | hash | 1 | 1 | 1 | 1 |" in text  # effects are relative to the hashing trick


def test_quality_benchmark_selects_each_setting_on_validation(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick", "--select",
                          "--methods", "mch", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.load(open(tmp_path / "results.json"))
    assert {r["method"] for r in records} == {"full", "hash", "mch [lfu]", "mch [lru]"}  # every setting trained
    report = (tmp_path / "results.md").read_text()
    mch = {r["method"]: r["validation"][-1]["logloss"] for r in records if r["method"].startswith("mch")}
    kept = min(mch, key=mch.get)
    assert "| 10x | mch | 2 |" in report and f"0: {kept} |" in report


def test_sharding_benchmark_quick_mode_measures_both_mappings_on_one_and_two_ranks(tmp_path):
    doc, results = tmp_path / "performance.md", tmp_path / "sharding.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sharding.py"), "--quick", "--world-sizes",
                          "1", "2", "--json", str(results), "--doc", str(doc)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(results))
    rows = {(r["W"], r["rank"], r["mappings"]): r for r in report["memory"]}
    assert sorted(rows) == sorted((w, rank, kind) for w in (1, 2) for rank in range(w)
                                  for kind in ("cosharded", "replicated"))
    one = rows[1, 0, "cosharded"]
    assert one["co-sharded layout B"] > 0 and one["replicated B"] == 0
    for rank in (0, 1):
        co, rep = rows[2, rank, "cosharded"], rows[2, rank, "replicated"]
        # Each of 2 ranks holds half of the co-sharded mappings; the replicated ones stay whole.
        assert abs(co["co-sharded layout B"] / one["co-sharded layout B"] - 0.5) <= 0.025
        assert rep["replicated B"] == rows[1, 0, "replicated"]["replicated B"] > 0
        for row in (co, rep):
            assert abs(row["estimate / layout + replicated"] - 1) <= 0.05, row
        # TorchRec's managed-collision buffers: a constant per co-sharded table and rank, not counted.
        assert co["MC engine B"] == one["MC engine B"] > 0
    assert [t["W"] for t in report["timing"]] == [1, 2]
    assert all(t["co-sharded step ms"] > 0 and t["replicated step ms"] > 0 for t in report["timing"])
    text = doc.read_text()
    assert "## Sharding (benchmarks/sharding.py)" in text and "CUDA timings were not taken" in text
    assert "layout bytes per rank fall as 1/W within 5%: yes" in text


def test_learn_step_benchmark_quick_mode_measures_both_floors(tmp_path):
    doc = tmp_path / "performance.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learn_step.py"), "--quick", "--doc", str(doc)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = doc.read_text()
    assert "## Learn step (benchmarks/learn_step.py)" in text
    for ids in ("dense", "sparse 40-bit"):
        assert f"| {ids} | 1 | 100,000 | " in text and f"| {ids} | 10 | 9,143 | 10,058 | " in text


def test_data_benchmark_quick_mode_times_the_text_and_the_cache(tmp_path):
    doc = tmp_path / "performance.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data.py"), "--quick", "--rows", "3000",
                          "--doc", str(doc)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = doc.read_text()
    assert "## CSV reading (benchmarks/data.py)" in text and "3,000 records" in text
    for step in ("count records", "pass over the text", "build the cache, 1 process", "open the cache",
                 "pass over the cache"):
        assert f"| {step} |" in text
    assert re.search(r"\| build the cache, \d+ workers \|", text)
