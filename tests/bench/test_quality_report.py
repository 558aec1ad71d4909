"""The quality report's arithmetic and its warning when the full tables learned nothing (no training)."""

import json

import pytest
import torch

from lhf_torchrec.cli import _quality_config, build_parser
from lhf_torchrec.pipeline.compare import RunRecord, epochs_seen, num_runs, summarize
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


def test_a_diverged_or_single_label_full_model_is_flagged_not_read() -> None:
    from lhf_torchrec.training.metrics import binary_metrics

    diverged = _record("huge", "full", float("nan"))
    diverged.validation[0].update(logloss=float("nan"), auc=float("nan"), ne=float("nan"))
    one_label = _record("zeros", "full", 0.01)
    # What evaluation gives on a split whose labels are all 0: AUC and NE undefined, the rate recorded.
    one_label.validation[0].update(binary_metrics(torch.tensor([-3.0, -4.0]), torch.tensor([0.0, 0.0])))
    records = [diverged, _record("huge", "hash", 0.69), one_label, _record("zeros", "hash", 0.02)]
    untrained = untrained_datasets(records)
    assert "the full-table model diverged: its validation logloss is nan after 50 training steps" in untrained["huge"]
    assert "log1p or standardize" in untrained["huge"]
    assert "every validation label is 0, so AUC and NE are undefined" in untrained["zeros"]
    assert gap_recovered(summarize(records), untrained) == {}


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


def test_the_report_and_results_json_show_the_epochs_each_method_saw(tmp_path) -> None:
    # What compare_methods records with equal passes: 2 epochs without a learn step, 1 + 1 with one.
    passes = {"full": (2, 0, 0), "hash": (2, 0, 0), "mch": (2, 0, 1), "combination": (1, 1, 0)}
    records = [_record("good", method, logloss) for method, logloss in
               (("full", 0.40), ("hash", 0.50), ("mch", 0.46), ("combination", 0.42))]
    for r in records:
        r.train_epochs, r.learn_epochs, r.id_passes = passes[r.method]
    write_report(records, QualityConfig(out_dir=str(tmp_path), seeds=(0,), equal_passes=True), seconds=1.0)
    report = (tmp_path / "results.md").read_text()
    assert "| dataset | method | budget | epochs seen | test logloss |" in report
    assert "| good | full | full | 2 | 0.4000 |" in report and "| good | hash | 10x | 2 | 0.5000 |" in report
    assert "| good | mch | 10x | 2 + 1 ids only | 0.4600 |" in report
    assert "| good | combination | 10x | 1 + 1 learn | 0.4200 |" in report
    assert "Equal passes: the methods without a learn step train as many more epochs" in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["train_epochs"], r["learn_epochs"], r["id_passes"]) for r in saved] == list(passes.values())

    assert "each table at 1/compression of its full bytes" in report
    write_report(records, QualityConfig(out_dir=str(tmp_path / "split"), seeds=(0,), budget_split="access"), 1.0)
    split_report = (tmp_path / "split" / "results.md").read_text()
    assert "split across the tables by access (`--budget-split access`" in split_report

    # results.json written before the passes were kept still loads; its passes read as unknown.
    old = {k: v for k, v in saved[3].items() if k not in ("train_epochs", "learn_epochs", "id_passes")}
    assert epochs_seen(RunRecord(**old)) == "?"


def test_equal_passes_and_best_epoch_are_quality_options() -> None:
    def config(*argv):
        return _quality_config(build_parser().parse_args(["bench", "quality", *argv]))

    assert (config().equal_passes, config().best_epoch, config().budget_split) == (False, False, "table")
    assert config("--budget-split", "access").budget_split == "access"
    assert (config("--equal-passes", "--best-epoch").equal_passes, config("--best-epoch").best_epoch) == (True, True)


def test_a_report_whose_every_fit_failed_is_written_without_a_plot(tmp_path) -> None:
    failed = RunRecord("tiny", "combination", 50, 0, 0, 0, 0, 1000, 0.0, 0.0, 0, {},
                       error="table 't': a budget of 42 bytes cannot hold method 'combination'")
    write_report([failed], QualityConfig(out_dir=str(tmp_path), seeds=(0,), compressions=(50,)), 1.0)
    assert "a budget of 42 bytes cannot hold" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())[0]["error"]
    assert not (tmp_path / "quality_vs_bytes.png").exists()
