import pytest
from baseline_helpers import MODEL, TRAIN

from lhf_torchrec.baselines import fit_baseline
from lhf_torchrec.pipeline import compare
from lhf_torchrec.pipeline.steps import full_table_bytes
from lhf_torchrec.training.trainer import TrainConfig


def test_baselines_run_in_the_comparison_at_equal_total_bytes(tiny_split, tiny_profiles):
    config = TrainConfig(**{**TRAIN, "max_steps": 10})
    records = compare.compare_methods(tiny_split, ["qr", "mch", "cce"], [4], [0], MODEL, config)
    assert [r.method for r in records] == ["qr", "mch", "cce"]
    full = full_table_bytes(tiny_split.tables, tiny_profiles, "rowwise_adagrad")
    for r in records:
        fitted = fit_baseline(r.method, tiny_split.tables, tiny_profiles, tiny_split.train, compression=4,
                              optimizer="rowwise_adagrad", batch_size=128)
        assert (r.total_bytes, r.table_bytes, r.mapping_bytes) == (
            fitted.total_bytes, fitted.table_bytes, fitted.mapping_bytes)
        # Compressed tables at a quarter of their bytes, the few small ones at full size: well under full.
        assert r.total_bytes < 0.5 * full
        assert r.steps == 10 and 0 < r.test["logloss"] < 1


def test_unknown_methods_name_the_baselines(tiny_split):
    with pytest.raises(ValueError, match="cce.*mch.*qr"):
        compare.compare_methods(tiny_split, ["nope"], [4], [0], MODEL, TrainConfig(**TRAIN))
