import pytest
from baseline_helpers import MODEL, TRAIN

from lhf_torchrec.mapping.tables import full_table_bytes
from lhf_torchrec.pipeline import compare
from lhf_torchrec.pipeline.methods import METHODS, FitInputs, fit_method
from lhf_torchrec.training.trainer import TrainConfig, steps_per_epoch


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
    with pytest.raises(ValueError, match="qr, warm: warm start and unseen ids need a method that maps ids to rows, not .qr."):
        compare.compare_methods(tiny_split, [spec], [4], [0], MODEL, TrainConfig(**TRAIN))


def test_every_run_records_its_passes_and_equal_passes_evens_the_gradient_passes(tiny_split):
    config = TrainConfig(**TRAIN)
    warm = compare.MethodSpec("frequency, warm start", "frequency", warm_start=True)
    methods = ["hash", "mch", "combination", warm]
    plain = compare.compare_methods(tiny_split, methods, [4], [0], MODEL, config)
    per_epoch = steps_per_epoch(len(tiny_split.train), TRAIN["batch_size"], 1)
    assert [(r.method, r.train_epochs, r.learn_epochs, r.id_passes, r.steps) for r in plain] == [
        ("hash", 1, 0, 0, per_epoch), ("mch", 1, 0, 1, per_epoch), ("combination", 1, 1, 0, per_epoch),
        ("frequency, warm start", 1, 1, 0, per_epoch)]
    assert [compare.epochs_seen(r) for r in plain] == ["1", "1 + 1 ids only", "1 + 1 learn", "1 + 1 learn"]

    # Equal passes, best epoch on validation: the methods without a learn step train 2 epochs and
    # test the better one; the others are the same runs as above.
    equal = compare.compare_methods(tiny_split, methods, [4], [0], MODEL, config, equal_passes=True,
                                    best_epoch=True)
    assert [(r.train_epochs, r.learn_epochs, r.steps, len(r.validation)) for r in equal] == [
        (2, 0, 2 * per_epoch, 2), (2, 0, 2 * per_epoch, 2), (1, 1, per_epoch, 1), (1, 1, per_epoch, 1)]
    assert [compare.epochs_seen(r) for r in equal] == ["2", "2 + 1 ids only", "1 + 1 learn", "1 + 1 learn"]
    best = min((1, 2), key=lambda epoch: equal[0].validation[epoch - 1]["logloss"])
    assert equal[0].epoch == best
    assert equal[2].test == plain[2].test and equal[3].test == plain[3].test

    # Nothing learns embeddings first: every method already makes the same passes.
    alone = compare.compare_methods(tiny_split, ["hash"], [4], [0], MODEL, config, equal_passes=True)
    assert (alone[0].train_epochs, alone[0].steps) == (1, per_epoch)
