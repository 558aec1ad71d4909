"""The learn step: rows for the ids seen >= min_count times, a small hashed region for the rest."""

import json
import math

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping import IdEmbeddings, IdProfile, fit_mapping
from lhf_torchrec.mapping.tables import LEARN_HASH_SHARE, learn_mappings
from lhf_torchrec.pipeline.compare import MethodSpec, learn_floors
from lhf_torchrec.pipeline.steps import fit_mappings, learn_model, profile_tables, warm_start_rows
from lhf_torchrec.training.trainer import TrainConfig


def _table(name: str, num_embeddings: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=num_embeddings, feature_names=[name])


def _zipf_profile(num_ids: int, sparse: bool) -> IdProfile:
    counts = np.maximum(1, (2000 / np.arange(1, num_ids + 1))).astype(np.int64)
    ids = np.arange(num_ids, dtype=np.int64) * (7919 << 20 if sparse else 1)
    return IdProfile(ids, counts, int(counts.sum()))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("min_count", [1, 10, 30])
def test_learn_model_rows_follow_the_floor(sparse, min_count):
    profile = _zipf_profile(5000, sparse)
    mappings = learn_mappings({"t": profile}, [_table("t", 1 << 40 if sparse else 5000)], min_count)
    kept_ids = profile.ids[profile.counts >= min_count]
    kept, rare = kept_ids.size, profile.num_ids - kept_ids.size
    if not sparse and min_count == 1:
        assert "t" not in mappings  # every id kept: the dense table itself is smaller than kept + hashed rows
        return
    assert 0 < kept < 5000 or min_count == 1
    mapping = mappings["t"]
    hashed = max(1, min(math.ceil(LEARN_HASH_SHARE * kept), rare))
    assert mapping.num_rows == kept + hashed
    # Each kept id owns a row of [0, kept); every other id (rarer, or never seen) shares [kept, kept + hashed).
    kept_rows = mapping(torch.from_numpy(kept_ids))
    assert sorted(kept_rows.tolist()) == list(range(kept))
    others = np.concatenate([profile.ids[profile.counts < min_count], [-5, 1 << 50, 12_345_678_901]])
    other_rows = mapping(torch.from_numpy(others))
    assert bool(((other_rows >= kept) & (other_rows < kept + hashed)).all())


def test_a_small_dense_table_keeps_its_rows_and_a_table_without_well_observed_ids_is_hashed():
    few = IdProfile(np.arange(4), np.array([50, 40, 30, 20]), 140)
    rare = IdProfile(np.arange(100) * 1_000_003, np.ones(100, np.int64), 100)
    mappings = learn_mappings({"few": few, "rare": rare}, [_table("few", 4), _table("rare", 1 << 40)], 10)
    assert "few" not in mappings  # 4 kept ids + 1 hashed row would be larger than the table
    assert mappings["rare"].num_rows == 1 and mappings["rare"].num_entries == 0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("min_count", [1, 10, 30])
def test_learn_mappings_from_the_well_observed_ids_and_the_whole_summary_equal_the_whole_profiles(sparse, min_count):
    """What a distributed learn step gathers (the ids at or above the floor, the whole profile's summary)."""
    profile = _zipf_profile(5000, sparse)
    keep = profile.counts >= min_count
    kept = IdProfile(profile.ids[keep], profile.counts[keep], profile.total)
    tables = [_table("t", 1 << 40 if sparse else 5000), _table("d", 64)]
    small = IdProfile(np.arange(40, dtype=np.int64), np.full(40, 12, np.int64), 480)
    whole = learn_mappings({"t": profile, "d": small}, tables, min_count)
    gathered = learn_mappings({"t": kept, "d": small}, tables, min_count,
                              summaries={"t": profile.summary(), "d": small.summary()})
    assert whole.keys() == gathered.keys()
    assert {n: m.fingerprint for n, m in whole.items()} == {n: m.fingerprint for n, m in gathered.items()}


def test_learn_mappings_rejects_a_bad_floor():
    with pytest.raises(ValueError, match="min_count must be an integer >= 1, got 0"):
        learn_mappings({"t": _zipf_profile(10, False)}, [_table("t", 10)], 0)


@pytest.mark.parametrize("min_count", [3, 10])
def test_embeddings_cover_exactly_the_ids_at_or_above_the_floor(tiny_split, min_count):
    profiles = profile_tables(tiny_split.train, tiny_split.tables)
    embeddings = learn_model(tiny_split.train, tiny_split.tables, profiles, dim=4, min_count=min_count,
                             train_config=TrainConfig(batch_size=256, progress=False)).embeddings
    assert set(embeddings) == {t.name for t in tiny_split.tables}
    for name, profile in profiles.items():
        kept = profile.ids[profile.counts >= min_count]
        assert np.array_equal(embeddings[name].ids, kept)
        assert embeddings[name].vectors.shape == (kept.size, 4) and bool(torch.isfinite(embeddings[name].vectors).all())
    # The embeddings are enough for combination at the floor: every id it clusters has one.
    fitted = fit_mappings(tiny_split.tables, profiles, "combination", compression=4, embeddings=embeddings,
                          min_count=min_count)
    assert any(m.layout.get("clustered", 0) > 0 for m in fitted.compression.mappings.values())


def test_learn_floors_take_the_lowest_min_count_of_the_fits_and_one_for_warm_start():
    specs = [MethodSpec("full", "full"), MethodSpec("frequency", "frequency"),
             MethodSpec("combination", "combination"), MethodSpec("c30", "combination", {"min_count": 30})]
    assert learn_floors(specs, model_dim=16, learn_dim=8) == {8: 10}
    assert learn_floors(specs[3:], model_dim=16, learn_dim=8) == {8: 30}
    assert learn_floors(specs + [MethodSpec("c5", "learned", {"min_count": 5})], 16, 8) == {8: 5}
    assert learn_floors(specs[:2], 16, 8) == {}  # nothing needs embeddings: no learn step
    warm = MethodSpec("frequency, warm", "frequency", warm_start=True)
    assert learn_floors(specs + [warm], 16, 8) == {8: 10, 16: 1}


def test_warm_start_leaves_rows_reached_only_by_ids_without_embeddings_at_their_random_init():
    profile = IdProfile(np.array([1, 2, 3, 9]), np.array([30, 12, 1, 2]), 45)
    mapping = fit_mapping(profile, method="frequency", num_rows=20, hot_fraction=0.1)  # ids 1 and 2 are hot
    kept = IdEmbeddings(np.array([1, 2]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # the floor-10 embeddings
    rows = warm_start_rows(mapping, profile, kept, seed=4)
    assert torch.equal(rows[:2], kept.vectors)
    everything = IdEmbeddings(profile.ids, torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [2.0, 2.0]]))
    random_init = torch.empty(20, 2).uniform_(-20 ** -0.5, 20 ** -0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rows[2:], random_init[2:])  # ids 3 and 9 have no embedding: their rows stay random
    assert not torch.equal(warm_start_rows(mapping, profile, everything, seed=4)[2:], rows[2:])


def test_train_with_combination_fitted_on_the_floor_embeddings(tmp_path):
    from lhf_torchrec.cli import main

    results = str(tmp_path / "train.json")
    assert main(["train", "--rows", "6000", "--scale", "0.0005", "--data-seed", "3", "--embedding-dim", "8",
                 "--dense-arch-layer-sizes", "16", "--over-arch-layer-sizes", "16,1", "--batch-size", "128",
                 "--no-progress", "--method", "combination", "--compression", "4", "--results", results]) == 0
    trained = json.load(open(results))
    assert trained["steps"] == 4800 // 128 and 0 < trained["test"]["logloss"] < 1
