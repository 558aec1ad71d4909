import numpy as np
import pytest
import torch

from lhf_torchrec.mapping import (
    CombinedLearnedHashing,
    FrequencyHashing,
    IdEmbeddings,
    IdProfile,
    LearnedClustering,
    fit_mapping,
    make_estimator,
)
from lhf_torchrec.mapping import methods
from lhf_torchrec.mapping.methods import ranked_ids, ranked_positions

METHODS_NEEDING_EMBEDDINGS = {"learned", "combination"}


def _fit(method, profile, embeddings, num_rows=200, seed=0, **kw):
    emb = embeddings if method in METHODS_NEEDING_EMBEDDINGS else None
    return fit_mapping(profile, method=method, num_rows=num_rows, embeddings=emb, seed=seed, **kw)


@pytest.mark.parametrize("method", ["hash", "frequency", "double_hash", "learned", "combination"])
def test_deterministic_by_seed_and_in_range(method, planted):
    profile, embeddings, _ = planted
    query = torch.cat([torch.from_numpy(profile.ids), torch.tensor([-7, 10**12, 2001, 5000])])
    a = _fit(method, profile, embeddings, seed=11)
    b = _fit(method, profile, embeddings, seed=11)
    assert torch.equal(a(query), b(query)) and a.fingerprint == b.fingerprint
    c = _fit(method, profile, embeddings, seed=12)
    assert not torch.equal(a(query), c(query))
    rows = a(query)
    assert int(rows.min()) >= (-1 if method == "double_hash" else 0) and int(rows.max()) < 200


@pytest.mark.parametrize("method", ["frequency", "double_hash", "combination"])
def test_hot_ids_own_their_rows(method, planted):
    profile, embeddings, _ = planted
    mapping = _fit(method, profile, embeddings)
    hot = mapping.layout["hot"]
    assert hot > 0
    hot_ids = ranked_ids(profile)[:hot]
    hot_rows = mapping(torch.from_numpy(hot_ids))
    hot_rows = hot_rows if hot_rows.ndim == 1 else hot_rows[:, 0]
    assert sorted(hot_rows.tolist()) == list(range(hot))  # one row each, the first H rows
    others = torch.cat([torch.from_numpy(ranked_ids(profile)[hot:]), torch.arange(10_000, 20_000)])
    other_rows = mapping(others)
    other_rows = other_rows[other_rows >= 0]
    assert int(other_rows.min()) >= hot  # nothing else lands on a hot row


@pytest.mark.parametrize("estimator_cls", [LearnedClustering, CombinedLearnedHashing])
def test_learned_collisions_stay_within_clusters(estimator_cls, planted):
    profile, embeddings, group_of = planted
    est = estimator_cls(200, seed=0).fit(profile, embeddings)
    rows = est.mapping_(torch.from_numpy(est.cluster_ids_)).numpy()
    labels = est.cluster_labels_
    # Two clustered ids share a row exactly when k-means put them in one cluster.
    first_row_of_label = {}
    for label, row in zip(labels.tolist(), rows.tolist()):
        assert first_row_of_label.setdefault(label, row) == row
    assert len(set(rows.tolist())) == len(first_row_of_label)
    # And clusters follow the planted groups: almost every row holds ids of one group only.
    purity = []
    for row in np.unique(rows):
        groups = group_of[est.cluster_ids_[rows == row]]
        purity.append(np.bincount(groups).max() / groups.size)
    assert np.mean(purity) > 0.95, np.mean(purity)


def test_combination_split_and_regions(planted):
    profile, embeddings, _ = planted
    est = CombinedLearnedHashing(200, hot_fraction=0.25, hashed_fraction=0.1, min_count=3).fit(profile, embeddings)
    split = est.split_
    assert (split.num_hot, split.num_hashed) == (50, 20) or split.num_hashed > 20
    assert split.num_hot + split.num_clustered + split.num_hashed == 200
    rare = profile.ids[profile.counts < 3]
    rare_rows = est.mapping_(torch.from_numpy(rare))
    assert int(rare_rows.min()) >= split.hash_offset  # rare ids are hashed, not clustered on noise
    unseen = est.mapping_(torch.arange(10_000, 11_000))
    assert int(unseen.min()) >= split.hash_offset
    assert est.mapping_.num_entries == split.num_entries == split.num_hot + est.cluster_ids_.size


def test_frequency_can_keep_every_profiled_id(planted):
    profile, _, _ = planted
    mapping = fit_mapping(profile, method="frequency", num_rows=profile.num_ids + 1, hot_fraction=1.0)
    rows = mapping(torch.from_numpy(profile.ids))
    assert torch.unique(rows).numel() == profile.num_ids  # the full-table baseline: no collisions


def test_embeddings_as_a_full_table_weight():
    ids = np.repeat(np.arange(100), 3)
    weight = torch.randn(100, 4)
    a = fit_mapping(ids, method="learned", num_rows=10, embeddings=weight)
    b = fit_mapping(ids, method="learned", num_rows=10, embeddings=IdEmbeddings(np.arange(100), weight))
    q = torch.arange(100)
    assert torch.equal(a(q), b(q))


# ---------------------------------------------------------------- bad input
def test_empty_data():
    with pytest.raises(ValueError, match="table 'C5': no ids to fit on"):
        fit_mapping(np.array([], dtype=np.int64), method="frequency", num_rows=10, table="C5")


def test_non_integer_ids():
    with pytest.raises(TypeError, match="table 'C6'.*float"):
        fit_mapping(np.array([1.0, 2.0]), method="frequency", num_rows=10, table="C6")


@pytest.mark.parametrize("num_rows", [0, -1])
def test_too_few_rows(num_rows):
    with pytest.raises(ValueError, match=f"table 'C7': num_rows must be an integer >= 1.*got {num_rows}"):
        fit_mapping(np.arange(10), method="frequency", num_rows=num_rows, table="C7")


def test_nan_embeddings_name_the_id():
    weight = torch.randn(10, 4)
    weight[6, 2] = float("nan")
    with pytest.raises(ValueError, match="table 'C8': the embedding of id 6 is NaN"):
        fit_mapping(np.arange(10), method="learned", num_rows=5, embeddings=weight, table="C8", min_count=1)
    # A NaN embedding of an id that is not clustered is no error (the store is checked whole first).
    fit_mapping(np.arange(6), method="learned", num_rows=5, embeddings=weight, table="C8", min_count=1)


@pytest.mark.parametrize("method,storage", [("frequency", "sorted"), ("combination", "dense")])
def test_entry_share_counts_the_accesses_of_ids_with_an_entry(method, storage, planted):
    profile, embeddings, _ = planted
    if storage == "sorted":  # the same counts on ids spread far apart: too sparse for a dense table
        profile = IdProfile(profile.ids * 7919 + 5, profile.counts, profile.total)
    learned = {"embeddings": embeddings, "min_count": 1} if method == "combination" else {}  # every id an entry
    mapping = fit_mapping(profile, method=method, num_rows=60, hot_fraction=0.3, **learned)
    assert mapping.storage == storage  # sorted: the entries found by key among the profiled ids
    has = mapping.has_entry(torch.from_numpy(profile.ids)).numpy()
    assert mapping.entry_share == round(int(profile.counts[has].sum()) / profile.total, 6)


def test_learned_needs_embeddings():
    with pytest.raises(ValueError, match="table 'C9': method 'combination' needs learned embeddings"):
        fit_mapping(np.arange(10), method="combination", num_rows=5, table="C9")


def test_unknown_method_and_hyperparameter():
    with pytest.raises(ValueError, match="unknown mapping method 'lsh'"):
        fit_mapping(np.arange(10), method="lsh", num_rows=5)
    with pytest.raises(TypeError, match="method 'frequency'.*min_count"):
        make_estimator("frequency", 5, min_count=3)


def test_fractions_are_validated():
    with pytest.raises(ValueError, match="table 't': hot_fraction \\+ hashed_fraction must be <= 1"):
        CombinedLearnedHashing(10, hot_fraction=0.8, hashed_fraction=0.5).split(IdProfile.from_ids(np.arange(5)), "t")
    with pytest.raises(ValueError, match="hot_fraction must be in \\[0, 1\\]"):
        FrequencyHashing(10, hot_fraction=1.5).split(IdProfile.from_ids(np.arange(5)))


def test_combination_with_no_room_for_clusters(planted):
    profile, embeddings, _ = planted
    for rows in (1, 2, 3):
        mapping = fit_mapping(profile, method="combination", num_rows=rows, embeddings=embeddings, min_count=1)
        assert sum(mapping.layout.values()) == rows
        assert int(mapping(torch.from_numpy(profile.ids)).max()) < rows


def test_balanced_hot_count():
    from lhf_torchrec.mapping.methods import balanced_hot_count

    assert balanced_hot_count(np.full(1000, 5), 100) == 0  # uniform traffic: no id beats a shared row
    assert balanced_hot_count(np.array([10_000] + [1] * 999), 100) == 1
    counts = np.sort(np.random.default_rng(0).zipf(1.2, 5000))[::-1]
    hot = balanced_hot_count(counts, 500)
    for h in range(hot):  # every hot id carries at least what a shared row would
        assert counts[h] >= (counts.sum() - counts[:h].sum()) / (500 - h)
    assert counts[hot] < (counts.sum() - counts[:hot].sum()) / (500 - hot)


def test_auto_split_follows_the_profile(planted):
    profile, embeddings, _ = planted
    est = CombinedLearnedHashing(300, hot_fraction="auto", hashed_fraction="auto", min_count=3).fit(profile, embeddings)
    split = est.split_
    assert split.num_hot + split.num_clustered + split.num_hashed == 300
    assert 0 < split.num_hot < 300 and split.num_hashed >= 1
    freq = FrequencyHashing(300, hot_fraction="auto").split(profile)
    assert freq.num_hot == split.num_hot
    with pytest.raises(ValueError, match="hot_fraction must be in \\[0, 1\\] or 'auto', got 'most'"):
        FrequencyHashing(300, hot_fraction="most").split(profile)


@pytest.mark.parametrize("top", [6, 10**12])  # small counts: by histogram; huge ones: by selection
def test_ranked_positions_prefix_is_the_prefix_of_the_full_ranking(monkeypatch, top):
    monkeypatch.setattr(methods, "_CHUNK", 64)  # ties found over several chunks
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, size=2_000)  # many ties: the selection must keep the smaller ids
    counts[::7] = rng.integers(1, top, size=counts[::7].size)
    profile = IdProfile(np.sort(rng.choice(10**9, 2_000, replace=False)), counts, int(counts.sum()))
    full = np.lexsort((profile.ids, -profile.counts))
    for stop in (0, 1, 17, 400, 1_999, 2_000, 5_000):
        assert np.array_equal(ranked_positions(profile, stop), full[:stop])
    assert np.array_equal(ranked_ids(profile), profile.ids[full])
