"""Selection on validation: grids within the tuning budget, choices made on validation only (no training)."""

import numpy as np
import pytest

from lhf_torchrec.bench.selection import (
    SELECTION_GRIDS,
    TUNING_BUDGET,
    chosen_flags_report,
    family_of,
    grid_specs,
    select_on_validation,
    selection_methods,
    selection_report,
    table_settings_report,
    train_flags,
)
from lhf_torchrec.arguments import fit_settings_of
from lhf_torchrec.cli import build_parser, main
from lhf_torchrec.mapping.fit import check_fit_settings
from lhf_torchrec.mapping.budget import plan_budget
from lhf_torchrec.mapping.methods import make_estimator
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.pipeline.compare import RunRecord
from lhf_torchrec.pipeline.methods import get_method
from lhf_torchrec.pipeline.table_choice import TABLE_SETTINGS


def _record(method: str, validation: float, test: float, seed: int = 0, compression: float = 10,
            dataset: str = "d") -> RunRecord:
    return RunRecord(dataset, method, 1.0 if method == "full" else compression, seed, 100, 90, 10, 1000, 0.1, 1.0, 50,
                     {"logloss": test, "auc": 0.7, "ne": 0.9},
                     [{"step": 50, "logloss": validation, "auc": 0.7, "ne": 0.9}], epoch=1)


def test_every_grid_is_within_the_tuning_budget_and_starts_with_the_default() -> None:
    for method, grid in SELECTION_GRIDS.items():
        assert 1 <= len(grid) <= TUNING_BUDGET, method
        assert all(spec.method == method for spec in grid)
        assert len({spec.label for spec in grid}) == len(grid)
        get_method(method)  # a registered method
    default = SELECTION_GRIDS["combination"][0]
    assert default.hyperparams == {} and default.unseen_id_rate == 0  # the default is always among the candidates


def test_combination_grid_settings_are_valid_and_one_tail_row_means_one_hash_row() -> None:
    # 300 ids seen 50 times, 100 seen 20 times, 1000 seen once: more than enough candidates for 200 rows.
    profile = IdProfile.from_ids(np.repeat(np.arange(1400), [50] * 300 + [20] * 100 + [1] * 1000))
    layouts = {}
    for spec in SELECTION_GRIDS["combination"]:
        estimator_settings = {k: v for k, v in spec.hyperparams.items() if k != "mapping_share"}  # a budget setting
        layouts[spec.label] = make_estimator("combination", 200, **estimator_settings).split(profile)
    assert layouts["combination [tail 1 row, floor 10, unseen ids 5%]"].num_hashed == 1
    assert layouts["combination [tail 10%, floor 10]"].num_hashed == 20
    # A higher clustering floor gives fewer ids an entry.
    assert (layouts["combination [tail 1 row, floor 30]"].num_entries
            < layouts["combination [tail 1 row, floor 10, unseen ids 5%]"].num_entries)


def test_a_mapping_share_of_half_clusters_more_ids_where_the_budget_raises_the_floor() -> None:
    # Zipf-like: at 50x a quarter of the budget cannot hold an entry for every id seen 10 times (808). Ids spread
    # far apart, so that the entries need a sparse storage (a dense table of 2-byte rows would hold them all).
    rng = np.random.default_rng(0)
    profile = IdProfile.from_ids(rng.zipf(1.3, 200_000) % 20_000 * 7919)
    budget = profile.num_ids * 4 * 16 // 50
    default = plan_budget(profile, embedding_dim=16, total_bytes=budget, **TABLE_SETTINGS["tail 10%, floor 10"])
    half = plan_budget(profile, embedding_dim=16, total_bytes=budget, **TABLE_SETTINGS["tail 10%, mapping 50%"])
    assert default.hyperparams["min_count"] > 10  # the budget raised the floor
    assert half.hyperparams["min_count"] < default.hyperparams["min_count"]
    assert half.split.num_entries > default.split.num_entries and half.mapping_bytes > default.mapping_bytes
    assert half.split.num_rows < default.split.num_rows  # paid for with rows, at the same budget
    assert default.mapping_bytes <= 0.25 * budget and half.mapping_bytes <= 0.5 * budget
    assert max(default.total_bytes, half.total_bytes) <= budget


def test_selection_chooses_on_validation_never_on_test() -> None:
    records = [
        _record("combination [tail 10%, floor 10]", validation=0.50, test=0.40),  # best test, worse validation
        _record("combination [tail 1 row, floor 10, unseen ids 5%]", validation=0.45, test=0.48),
        _record("combination [per table on validation]", validation=0.47, test=0.30),
    ]
    selected, choices = select_on_validation(records)
    assert [r.method for r in selected] == ["combination"]
    assert selected[0].test["logloss"] == 0.48
    assert choices[0].setting == "combination [tail 1 row, floor 10, unseen ids 5%]" and choices[0].tried == 3


def test_selection_is_per_seed_and_budget_ties_keep_the_default_and_failures_take_no_part() -> None:
    default, one_row = "combination [tail 10%, floor 10]", "combination [tail 1 row, floor 10, unseen ids 5%]"
    failed = _record(one_row, validation=0.1, test=0.1, seed=1)
    failed.error, failed.validation = "does not fit", []
    records = [_record(one_row, 0.45, 0.45, seed=0), _record(default, 0.45, 0.46, seed=0),
               _record(default, 0.50, 0.50, seed=1), failed,
               _record(default, 0.40, 0.40, seed=0, compression=50),
               _record(one_row, 0.30, 0.30, seed=0, compression=50)]
    _, choices = select_on_validation(records)
    chosen = {(c.seed, c.compression): c.setting for c in choices}
    assert chosen == {(0, 10): default, (1, 10): default, (0, 50): one_row}


def test_report_shows_gap_recovered_on_validation_and_test_and_the_epochs() -> None:
    records = [_record("full", 0.40, 0.41), _record("hash", 0.50, 0.51),
               _record("combination [tail 10%, floor 10]", 0.42, 0.43),
               _record("combination [tail 1 row, floor 10, unseen ids 5%]", 0.44, 0.40),
               _record("mch [lfu]", 0.45, 0.46)]
    for r in records:  # the passes compare_methods records: 1 epoch, + the learn step, + MCH's id-only replay
        r.train_epochs, r.learn_epochs = 1, int(r.method.startswith("combination"))
        r.id_passes = int(r.method.startswith("mch"))
    report = selection_report(*select_on_validation(records))
    # combination: validation (0.50 - 0.42) / 0.10 = 80%, test (0.51 - 0.43) / 0.10 = 80%.
    assert "| d | 10x | combination | 2 | 0.4200 ± 0.0000 | 0.4300 ± 0.0000 | 80% | 80% | 1 + 1 learn |" \
           " 0: combination [tail 10%, floor 10] |" in report
    assert "| d | 10x | mch | 1 | 0.4500 ± 0.0000 | 0.4600 ± 0.0000 | 50% | 50% | 1 + 1 ids only |" \
        in report
    assert report.index("| d | full | full |") < report.index("| d | 10x | hash |")
    untrained = selection_report(*select_on_validation(records), untrained={"d"})
    assert "| d | 10x | mch | 1 | 0.4500 ± 0.0000 | 0.4600 ± 0.0000 | n/a | n/a |" in untrained


def test_unknown_settings_and_methods_without_a_grid_are_clear_errors(capsys) -> None:
    with pytest.raises(ValueError, match="no setting of any selection grid"):
        family_of("combination [made up]")
    with pytest.raises(ValueError, match="no selection grid for \\['learned'\\]"):
        grid_specs(selection_methods(["learned"]))
    assert [s.method for s in grid_specs(selection_methods(["mch"]))] == ["full", "hash", "mch", "mch"]
    assert main(["bench", "quality", "--select", "--methods", "learned", "--quick"]) == 2
    assert "--select: no selection grid for learned" in capsys.readouterr().err


def test_quality_batch_size_follows_the_dataset_unless_given():
    from lhf_torchrec.cli import _quality_config, build_parser

    def batch_sizes(*argv):
        config = _quality_config(build_parser().parse_args(["bench", "quality", *argv]))
        return [config.batch_size.get(spec.kind, config.default_batch_size) for spec in config.datasets]

    assert batch_sizes() == [1024, 256]  # synthetic, MovieLens
    assert batch_sizes("--data", "movielens") == [256]
    assert batch_sizes("--data", "movielens", "--batch-size", "512") == [512]
    assert batch_sizes("--batch-size", "64") == [64, 64]


def test_selection_report_says_where_the_selected_combination_loses_on_test(tmp_path) -> None:
    from lhf_torchrec.bench.quality import QualityConfig, write_selection_report
    from lhf_torchrec.pipeline.datasets import DatasetSpec

    records = [_record("full", 0.40, 0.41), _record("hash", 0.50, 0.51),
               # Validation chooses the one-row tail (0.44), whose test logloss then loses to MCH's.
               _record("combination [tail 10%, floor 10]", 0.46, 0.43),
               _record("combination [tail 1 row, floor 10, unseen ids 5%]", 0.44, 0.47),
               _record("mch [lfu]", 0.45, 0.46), _record("mch [lru]", 0.47, 0.42),
               _record("qr", 0.48, 0.49)]
    config = QualityConfig(datasets=[DatasetSpec("synthetic")], compressions=(10,), seeds=(0,), out_dir=str(tmp_path))
    write_selection_report(records, config, seconds=1.0)
    report = (tmp_path / "results.md").read_text()
    verdicts = report[report.index("## Where combination wins and loses"):report.index("## Every setting tried")]
    # MCH's own choice is LFU (validation 0.45), so its test logloss is 0.46, not LRU's 0.42.
    assert "d, 10x: combination test logloss 0.4700, 40% of the hashing trick's gap" in verdicts
    assert "**combination loses to**: mch (0.4600, +0.0100)." in verdicts
    assert "qr" not in verdicts


def test_the_report_shows_each_tables_choice_of_the_runs_that_chose_per_table() -> None:
    per_table = _record("combination [per table on validation]", 0.44, 0.45)
    per_table.table_settings = {"t_user": "tail 1 row, floor 30", "t_item": "tail 10%, floor 10"}
    report = table_settings_report([_record("combination [tail 10%, floor 10]", 0.42, 0.43), per_table])
    assert report.count("\n") == 2  # header, separator, one run
    assert "t_item: tail 10%, floor 10; t_user: tail 1 row, floor 30" in report
    assert table_settings_report([_record("combination [tail 10%, floor 10]", 0.42, 0.43)]) == ""


def test_every_kept_setting_has_the_lhf_train_flags_that_train_it() -> None:
    parser = build_parser()
    trainable = 0
    for method, grid in SELECTION_GRIDS.items():
        for spec in grid:
            flags = train_flags(spec, 10)
            if not get_method(method).maps_ids:
                assert flags == "", spec.label  # QR, MCH, CCE: baselines of the benchmark only
                continue
            trainable += 1
            args = parser.parse_args(["train", *flags.split()])
            settings = fit_settings_of(args.params)
            assert (args.method, settings, args.unseen_id_rate, args.per_table) == (
                spec.method, dict(spec.hyperparams), spec.unseen_id_rate, spec.per_table), spec.label
            if method != "full":
                assert args.compression == 10
            if settings:
                check_fit_settings(spec.method, settings)
    assert trainable == sum(len(SELECTION_GRIDS[m]) for m in ("full", "hash", "frequency", "double_hash", "combination"))
    report = chosen_flags_report(select_on_validation([
        _record("full", 0.40, 0.41), _record("hash", 0.50, 0.51), _record("mch [lfu]", 0.45, 0.46),
        _record("combination [tail 1 row, floor 30]", 0.42, 0.43),
        _record("combination [tail 1 row, floor 30]", 0.42, 0.43, seed=1)])[1])
    assert ("| d | 10x | combination [tail 1 row, floor 30] | 0, 1 | `--method combination --compression 10 --param "
            "hashed_fraction=0.0 --param min_count=30` |") in report
    assert "| d | 10x | mch [lfu] | 0 | a baseline of the benchmark, not in lhf train |" in report
    assert "| full |" not in report and "| hash |" not in report
