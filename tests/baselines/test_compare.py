import pytest
from baseline_helpers import MODEL, TRAIN

from lhf_torchrec.mapping.tables import full_table_bytes
from lhf_torchrec.pipeline import compare
from lhf_torchrec.pipeline.methods import METHODS, FitInputs, fit_method
from lhf_torchrec.training.trainer import TrainConfig


def test_baselines_run_in_the_comparison_at_equal_total_bytes(tiny_split, tiny_profiles):
    config = TrainConfig(**{**TRAIN, "max_steps": 10})
    records = compare.compare_methods(tiny_split, ["qr", "mch", "cce"], [4], [0], MODEL, config)
    assert [r.method for r in records] == ["qr", "mch", "cce"]
    full = full_table_bytes(tiny_split.tables, tiny_profiles, "rowwise_adagrad")
    for r in records:
        fitted = fit_method(r.method, tiny_split.tables, tiny_profiles, FitInputs(train=tiny_split.train, batch_size=128),
                            compression=4, optimizer="rowwise_adagrad")
        assert (r.total_bytes, r.table_bytes, r.mapping_bytes) == (
            fitted.total_bytes, fitted.table_bytes, fitted.mapping_bytes)
        # Compressed tables at a quarter of their bytes, the few small ones at full size: well under full.
        assert r.total_bytes < 0.5 * full
        assert r.steps == 10 and 0 < r.test["logloss"] < 1


def test_unknown_methods_name_every_method(tiny_split):
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of full, hash, .*qr, mch, cce"):
        compare.compare_methods(tiny_split, ["nope"], [4], [0], MODEL, TrainConfig(**TRAIN))
    assert list(METHODS)[0] == "full"


def test_warm_start_needs_a_mapping_method(tiny_split):
    spec = compare.MethodSpec("qr, warm", "qr", warm_start=True)
    with pytest.raises(ValueError, match="qr, warm: warm start needs a method that maps ids to rows, not 'qr'"):
        compare.compare_methods(tiny_split, [spec], [4], [0], MODEL, TrainConfig(**TRAIN))
