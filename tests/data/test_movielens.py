from pathlib import Path

import numpy as np
import pytest

from lhf_torchrec.data import CTRData, fetch_movielens_100k, load_movielens_100k, time_split
from lhf_torchrec.data.files import resolve_cache_dir
from lhf_torchrec.data.movielens import DownloadError


def test_cache_dir_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LHF_CACHE_DIR", raising=False)
    assert resolve_cache_dir() == Path.home() / ".cache" / "lhf_torchrec"
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.fixture(scope="module")
def movielens() -> CTRData:
    """Downloads the recbole wheel once into the user cache ($LHF_CACHE_DIR or ~/.cache)."""
    try:
        return load_movielens_100k()
    except DownloadError as e:
        pytest.skip(f"MovieLens-100k not reachable: {e}")


def test_movielens_as_ctr(movielens: CTRData) -> None:
    data = movielens
    assert len(data) == 100_000
    assert data.feature_names == [
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
        "release_year",
        "genres",
    ]
    assert data.dense_names == ["age_z", "release_year_z"]
    assert data.labels.mean() == pytest.approx(0.55375)  # 34174 fours and 21201 fives
    sizes = dict(zip(data.feature_names, data.num_embeddings_per_feature()))
    assert sizes["user_id"] == 944 and sizes["item_id"] == 1683
    assert sizes["age"] == 7 and sizes["gender"] == 2 and sizes["occupation"] == 21 and sizes["genres"] == 19
    assert abs(data.dense.mean(axis=0)).max() < 0.5
    kjt = next(data.batches(1000)).sparse_features
    genre_lengths = kjt["genres"].lengths()
    assert genre_lengths.min() >= 1 and genre_lengths.max() <= 6
    assert (kjt["user_id"].lengths() == 1).all()


def test_movielens_split_is_deterministic_and_disjoint(movielens: CTRData) -> None:
    train, val, test = time_split(movielens, (0.8, 0.1, 0.1))
    assert (len(train), len(val), len(test)) == (80_000, 10_000, 10_000)
    pairs = lambda d: set(map(tuple, d.sparse[:, :2].tolist()))
    assert not pairs(train) & pairs(test)  # a user rates an item once
    # Later periods bring users that were never seen before (time order, not a shuffle).
    assert len(set(test.sparse[:, 0].tolist()) - set(train.sparse[:, 0].tolist())) > 10
    # Rows follow the timestamps of the raw ratings.
    raw = np.loadtxt(fetch_movielens_100k() / "ml-100k.inter", skiprows=1, dtype=np.int64)
    by_time = raw[np.lexsort((raw[:, 1], raw[:, 0], raw[:, 3]))]
    np.testing.assert_array_equal(movielens.sparse[:, :2], by_time[:, :2])
    np.testing.assert_array_equal(movielens.labels, by_time[:, 2] >= 4)
    again = load_movielens_100k()
    np.testing.assert_array_equal(again.sparse, movielens.sparse)
