import numpy as np
import pytest
from data_helpers import auc
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES

from lhf_torchrec.data import (
    CRITEO_KAGGLE_CARDINALITIES,
    SyntheticCriteo,
    SyntheticCriteoConfig,
    criteo_dense_transform,
    make_synthetic_criteo,
)

SMALL = SyntheticCriteoConfig(scale=1e-4, seed=1)


def test_deterministic_by_seed() -> None:
    a = make_synthetic_criteo(3000, SMALL, progress=False)
    b = make_synthetic_criteo(3000, SMALL, progress=False)
    c = make_synthetic_criteo(3000, SyntheticCriteoConfig(scale=1e-4, seed=2), progress=False)
    for x, y in [(a.data.sparse, b.data.sparse), (a.data.dense, b.data.dense), (a.data.labels, b.data.labels)]:
        np.testing.assert_array_equal(x, y)
    for f in range(26):
        np.testing.assert_array_equal(a.truth.groups[f], b.truth.groups[f])
    assert not np.array_equal(a.data.sparse, c.data.sparse)


def test_a_prefix_of_a_larger_draw_is_a_smaller_draw() -> None:
    small = make_synthetic_criteo(70_000, SMALL, progress=False)
    large = make_synthetic_criteo(140_000, SMALL, progress=False)
    np.testing.assert_array_equal(large.data.sparse[:70_000], small.data.sparse)
    np.testing.assert_array_equal(large.data.labels[:70_000], small.data.labels)
    np.testing.assert_array_equal(large.truth.logits[:70_000], small.truth.logits)


def test_shapes_names_and_ranges(synthetic: SyntheticCriteo) -> None:
    data, truth = synthetic.data, synthetic.truth
    assert data.dense_names == list(DEFAULT_INT_NAMES) and data.sparse_names == list(DEFAULT_CAT_NAMES)
    assert data.dense.shape == (100_000, 13) and data.dense.dtype == np.float32
    assert data.sparse.shape == (100_000, 26) and data.sparse.dtype == np.int64
    assert set(np.unique(data.labels)) == {0.0, 1.0}
    assert truth.cardinalities == [max(3, round(1e-3 * c)) for c in CRITEO_KAGGLE_CARDINALITIES]
    assert (data.sparse.max(axis=0) < truth.cardinalities).all()
    assert ((data.sparse == -1).mean(axis=0) < 0.2).all() and (data.sparse == -1).any()
    for f, n in enumerate(truth.cardinalities):
        assert truth.groups[f].shape == (n,) and truth.groups[f].max() < truth.num_groups[f]
        assert truth.latent[f].shape == (n, 8) and truth.id_effects[f].shape == (n,)
        assert truth.popularity[f].sum() == pytest.approx(1.0)
        assert truth.num_groups[f] == max(1, min(n, round(n**0.5)))


def test_raw_counts_are_criteo_like_integers(synthetic: SyntheticCriteo) -> None:
    raw = synthetic.raw_dense
    finite = raw[~np.isnan(raw)]
    assert (finite == np.round(finite)).all()
    assert np.nanmin(raw[:, 1]) == -2 and np.nanmin(np.delete(raw, 1, axis=1)) == 0
    assert np.isnan(raw).any()
    np.testing.assert_array_equal(criteo_dense_transform(raw), synthetic.data.dense)


def test_click_rate_and_bayes_auc(synthetic: SyntheticCriteo) -> None:
    assert synthetic.data.labels.mean() == pytest.approx(0.25, abs=0.015)
    assert 0.75 < auc(synthetic.truth.logits, synthetic.data.labels) < 0.85


def test_zipf_long_tail(synthetic: SyntheticCriteo) -> None:
    truth = synthetic.truth
    big = int(np.argmax(truth.cardinalities))  # cat_2
    ids = synthetic.data.sparse[:, big]
    counts = np.bincount(ids[ids >= 0], minlength=truth.cardinalities[big])
    seen = counts[counts > 0]
    # Measured: 40% of the ids that occur occur once; the top 1% of ids take 70% of the accesses.
    assert 0.3 < (seen == 1).mean() < 0.5
    assert 0.6 < np.sort(counts)[::-1][: len(counts) // 100].sum() / counts.sum() < 0.8
    # The empirical frequencies follow the stated popularity.
    top = np.argsort(truth.popularity[big])[::-1][:20]
    expected = truth.popularity[big][top] * counts.sum()
    assert np.abs(counts[top] - expected).max() < 5 * np.sqrt(expected.max())


def test_popularity_does_not_reveal_groups(synthetic: SyntheticCriteo) -> None:
    truth = synthetic.truth
    big = int(np.argmax(truth.cardinalities))
    g, p = truth.groups[big], truth.popularity[big]
    popularity_rank = np.argsort(np.argsort(p))
    for k in range(5):  # for several groups, membership is uncorrelated with popularity rank
        assert abs(np.corrcoef(popularity_rank, g == k)[0, 1]) < 0.05
    hot = np.argsort(p)[::-1][:1000]
    assert len(np.unique(g[hot])) > 0.9 * truth.num_groups[big]


def _group_f_statistic(groups: np.ndarray, ids: np.ndarray, labels: np.ndarray, num_ids: int) -> float:
    """One-way ANOVA F of per-id click rates (ids seen >= 3 times, each weighted equally) by group.

    About 1 when groups do not matter. Weighting ids equally keeps a few hot ids from dominating.
    """
    n = np.bincount(ids, minlength=num_ids)
    rate = np.bincount(ids, weights=labels, minlength=num_ids)[n >= 3] / n[n >= 3]
    g = groups[n >= 3]
    size = np.bincount(g)
    used = size > 0
    mean = np.bincount(g, weights=rate) / np.maximum(size, 1)
    between = (size[used] * (mean[used] - rate.mean()) ** 2).sum() / (used.sum() - 1)
    within = ((rate - mean[g]) ** 2).sum() / (len(rate) - used.sum())
    return between / within


def test_groups_drive_clicks(synthetic: SyntheticCriteo) -> None:
    data, truth = synthetic.data, synthetic.truth
    rng = np.random.default_rng(0)
    big = [f for f in range(26) if truth.cardinalities[f] >= 2000]
    f = max(big, key=lambda f: truth.id_effects[f].var())  # the most influential large feature
    ids = data.sparse[:, f]
    present = ids >= 0
    args = (ids[present], data.labels[present], truth.cardinalities[f])
    planted = _group_f_statistic(truth.groups[f], *args)
    shuffled = [_group_f_statistic(rng.permutation(truth.groups[f]), *args) for _ in range(5)]
    assert planted > 2.0
    assert max(shuffled) < 1.5
    # Ids of one group are alike but not equal: the group explains ~group_share of the latent variance.
    latent, g = truth.latent[f], truth.groups[f]
    means = np.stack(
        [latent[g == k].mean(axis=0) if (g == k).any() else np.zeros(8) for k in range(truth.num_groups[f])]
    )
    explained = 1 - ((latent - means[g]) ** 2).sum() / ((latent - latent.mean(axis=0)) ** 2).sum()
    assert 0.6 < explained < 0.8


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="base_rate"):
        SyntheticCriteoConfig(base_rate=1.5)
    with pytest.raises(ValueError, match="scale"):
        SyntheticCriteoConfig(scale=0)
    with pytest.raises(ValueError, match="num_rows"):
        make_synthetic_criteo(-1)
    assert len(make_synthetic_criteo(0, SMALL, progress=False).data) == 0
