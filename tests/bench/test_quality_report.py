"""The quality report's arithmetic and its warning when the full tables learned nothing (no training)."""

import pytest

from lhf_torchrec.pipeline.compare import RunRecord, num_runs, summarize
from lhf_torchrec.bench.quality import QualityConfig, gap_recovered, untrained_datasets, verdicts, write_report


def _record(dataset: str, method: str, logloss: float, compression: float = 10, validation_ne: float = 0.9,
            steps: int = 50, seed: int = 0) -> RunRecord:
    validation = [{"step": steps, "logloss": logloss, "auc": 0.7 if validation_ne < 1 else 0.5, "ne": validation_ne}]
    return RunRecord(dataset, method, 1.0 if method == "full" else compression, seed, 100, 90, 10, 1000, 0.1, 1.0,
                     steps, {"logloss": logloss, "auc": 0.7, "ne": 0.9}, validation, epoch=1)


def _records():
    return [
        _record("good", "full", 0.40), _record("good", "hash", 0.50), _record("good", "combination", 0.42),
        _record("noise", "full", 0.68, validation_ne=1.02, steps=8), _record("noise", "hash", 0.69),
        _record("noise", "combination", 0.71),
    ]


def test_gap_recovered_skips_datasets_whose_full_tables_learned_nothing() -> None:
    records = _records()
    untrained = untrained_datasets(records)
    assert list(untrained) == ["noise"]
    assert "validation NE 1.0200" in untrained["noise"] and "after 8 training steps" in untrained["noise"]
    rows = summarize(records)
    assert gap_recovered(rows) == pytest.approx({("good", "combination", 10): 0.8, ("noise", "combination", 10): -2})
    assert gap_recovered(rows, untrained) == pytest.approx({("good", "combination", 10): 0.8})
    noise = [line for line in verdicts(rows, untrained) if line.startswith("- noise")]
    assert noise and "the full tables learned nothing here: these differences are noise" in noise[0]


def test_a_full_model_without_a_training_step_is_flagged() -> None:
    records = [_record("tiny", "full", 0.69, steps=0), _record("tiny", "hash", 0.69)]
    records[0].validation = []
    assert "had no training step" in untrained_datasets(records)["tiny"]


def test_report_marks_the_dataset_instead_of_printing_percentages(tmp_path, capsys) -> None:
    records = _records() + [_record("overfit", "full", 0.52), _record("overfit", "hash", 0.51),
                            _record("overfit", "combination", 0.50)]
    write_report(records, QualityConfig(out_dir=str(tmp_path), seeds=(0,)), seconds=1.0)
    report = (tmp_path / "results.md").read_text()
    assert "**Warning, noise**: the full-table model learned nothing" in report
    assert "| good | 10x | 80% |" in report and "| noise | 10x | n/a |" in report
    assert "n/a on noise: the full tables learned nothing" in report
    assert "| overfit | 10x | - |" in report
    assert ("No gap on overfit at 10x: the hashing trick's test logloss (0.5100) is no worse than the full "
            "tables' (0.5200).") in report


def test_num_runs_counts_what_compare_methods_trains() -> None:
    assert num_runs(["full", "hash", "combination"], [4, 10, 50], [0, 1]) == 2 * (1 + 3 * 2)
