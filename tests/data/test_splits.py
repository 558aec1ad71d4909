import numpy as np
import pytest
from data_helpers import random_ctr_data
from hypothesis import given
from hypothesis import strategies as st

from lhf_torchrec.data import CriteoTSV, CSVSource, CSVSpec, CTRSource, split_bounds, time_split


@given(n=st.integers(0, 10_000), weights=st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_split_bounds_cover_in_order(n: int, weights: list[int]) -> None:
    fractions = [w / sum(weights) for w in weights]
    bounds = split_bounds(n, fractions)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous and disjoint
    assert all(lo <= hi for lo, hi in bounds)
    for (lo, hi), f in zip(bounds, fractions):
        assert abs((hi - lo) - f * n) <= 1


def test_split_bounds_examples_and_errors() -> None:
    assert split_bounds(10) == [(0, 8), (8, 9), (9, 10)]
    assert split_bounds(1001, (0.5, 0.5)) == [(0, 500), (500, 1001)]
    for bad in [(0.5, 0.6), (1.2, -0.2), ()]:
        with pytest.raises(ValueError, match="fractions"):
            split_bounds(10, bad)


def test_time_split_of_in_memory_data_is_ordered_and_deterministic() -> None:
    data = random_ctr_data(np.random.default_rng(0), 1000)
    data.dense[:, 0] = np.arange(1000)  # stands for time
    train, val, test = time_split(data, (0.7, 0.2, 0.1))
    assert (len(train), len(val), len(test)) == (700, 200, 100)
    assert train.dense[:, 0].max() < val.dense[:, 0].min() and val.dense[:, 0].max() < test.dense[:, 0].min()
    np.testing.assert_array_equal(np.concatenate([p.dense for p in (train, val, test)]), data.dense)
    again = time_split(data, (0.7, 0.2, 0.1))
    assert all(np.array_equal(a.sparse, b.sparse) for a, b in zip(again, (train, val, test)))


def test_sources_share_one_interface(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("y,u\n1,3\n")
    (tmp_path / "empty.tsv").write_text("")
    sources = [
        random_ctr_data(np.random.default_rng(1), 3),
        CSVSource(tmp_path / "a.csv", CSVSpec(label="y", categorical=["u"])),
        CriteoTSV(tmp_path / "empty.tsv"),
    ]
    for source in sources:
        assert isinstance(source, CTRSource)
    empty = sources[2].load()
    assert len(empty) == 0 and empty.dense.shape == (0, 13) and list(sources[2].batches(4)) == []
    assert [len(part) for part in time_split(sources[1], (0.5, 0.5))] == [0, 1]
