import numpy as np
import pytest
import torch
from data_helpers import random_ctr_data, reference_kjt
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.data import CTRData, feature_columns, shuffle_order, sparse_to_kjt
from lhf_torchrec.data.ctr_data import BatchOrder, batches_from_chunks
from lhf_torchrec.data.source import rechunk


def _same_batch(a, b) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def _concat_ranks(parts):
    """One Batch made of the per-rank batches of one step (rows in rank order)."""
    keys = parts[0].sparse_features.keys()
    per_key = [p.sparse_features.to_dict() for p in parts]
    values, lengths = [], []
    for k in keys:
        values += [d[k].values() for d in per_key]
        lengths += [d[k].lengths() for d in per_key]
    return (
        torch.cat([p.dense_features for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat(values),
        torch.cat(lengths),
    )


def test_validation_names_the_problem() -> None:
    ok = dict(
        dense=np.zeros((2, 1)),
        sparse=np.zeros((2, 2), np.int64),
        labels=np.zeros(2),
        dense_names=["d"],
        sparse_names=["a", "b"],
    )
    CTRData(**ok)
    with pytest.raises(ValueError, match="sparse has shape"):
        CTRData(**{**ok, "sparse_names": ["a"]})
    with pytest.raises(ValueError, match="found -2"):
        CTRData(**{**ok, "sparse": np.array([[0, -2], [1, 1]])})
    with pytest.raises(TypeError, match="sparse must be int64"):
        CTRData(**{**ok, "sparse": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="labels must lie in"):
        CTRData(**{**ok, "labels": np.array([0.0, 2.0])})
    with pytest.raises(ValueError, match="belongs to both"):
        CTRData(**ok, multi_valued={"x": [0, 1], "y": [1]})
    with pytest.raises(ValueError, match="out of range"):
        CTRData(**ok, multi_valued={"x": [0, 2]})
    with pytest.raises(ValueError, match="used twice"):
        CTRData(**ok, multi_valued={"b": [0]})


def test_feature_columns_orders_by_first_column() -> None:
    assert feature_columns(["a", "t0", "b", "t1"], {"tags": [3, 1]}) == [("a", [0]), ("tags", [1, 3]), ("b", [2])]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 12), multi=st.booleans())
def test_kjt_matches_slow_reference(seed: int, n: int, multi: bool) -> None:
    data = random_ctr_data(np.random.default_rng(seed), n, multi_valued=multi)
    kjt = data.to_batch().sparse_features
    values, lengths = reference_kjt(data)
    assert kjt.keys() == data.feature_names
    assert kjt.values().tolist() == values
    assert kjt.lengths().tolist() == lengths
    assert kjt.stride() == n
    assert kjt.values().dtype == torch.int64
    for name, jt in kjt.to_dict().items():
        assert jt.lengths().shape == (n,), name


def test_kjt_docstring_example() -> None:
    kjt = sparse_to_kjt(np.array([[3, -1], [5, 7]]), [("a", [0]), ("b", [1])])
    assert kjt.values().tolist() == [3, 5, 7]
    assert kjt.lengths().tolist() == [1, 1, 0, 1]
    assert kjt["b"].lengths().tolist() == [0, 1]


def test_batches_cover_rows_in_order_and_copy() -> None:
    data = random_ctr_data(np.random.default_rng(0), 23)
    batches = list(data.batches(5))
    assert [len(b.labels) for b in batches] == [5, 5, 5, 5, 3]
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    np.testing.assert_array_equal(dense, data.dense)
    batches[0].dense_features += 1  # must not write through to the data
    np.testing.assert_array_equal(dense, data.dense)
    assert len(list(data.batches(5, drop_last=True))) == 4


def test_shuffle_is_a_seeded_permutation() -> None:
    data = random_ctr_data(np.random.default_rng(1), 50)
    data.dense[:, 0] = np.arange(50)  # row ids travel in the first dense column
    order = lambda **kw: (
        torch.cat([b.dense_features[:, 0] for b in data.batches(7, shuffle=True, **kw)]).long().tolist()
    )
    first = order(seed=3, epoch=0)
    assert sorted(first) == list(range(50))
    assert first != list(range(50))
    assert first == order(seed=3, epoch=0)
    assert first == shuffle_order(50, 3, 0).tolist()
    assert first != order(seed=3, epoch=1)
    assert first != order(seed=4, epoch=0)


@pytest.mark.parametrize("n", [40, 37, 33, 31])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_split_the_global_batches_of_one_rank(n: int, world_size: int, shuffle: bool) -> None:
    data = random_ctr_data(np.random.default_rng(n), n)
    batch_size = 4
    single = list(data.batches(batch_size * world_size, shuffle=shuffle, seed=5))
    per_rank = [
        list(data.batches(batch_size, shuffle=shuffle, seed=5, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(p) for p in per_rank}) == 1, "every rank must run the same number of steps"
    remainder = n % (batch_size * world_size)
    if 0 < remainder < world_size:
        single = single[:-1]  # a last global batch with fewer rows than ranks is dropped
    assert len(per_rank[0]) == len(single)
    for step, whole in enumerate(single):
        parts = [p[step] for p in per_rank]
        assert all(len(p.labels) > 0 for p in parts)
        dense, labels, values, lengths = _concat_ranks(parts)
        assert torch.equal(dense, whole.dense_features)
        assert torch.equal(labels, whole.labels)
        ref = whole.sparse_features.to_dict()
        assert torch.equal(values, torch.cat([ref[k].values() for k in data.feature_names]))
        assert torch.equal(lengths, torch.cat([ref[k].lengths() for k in data.feature_names]))


def test_partial_last_batch_is_split_evenly() -> None:
    data = random_ctr_data(np.random.default_rng(2), 8 + 5)
    sizes = [[len(b.labels) for b in data.batches(4, rank=r, world_size=2)] for r in range(2)]
    assert sizes == [[4, 3], [4, 2]]
    sizes = [[len(b.labels) for b in data.batches(4, rank=r, world_size=2, drop_last=True)] for r in range(2)]
    assert sizes == [[4], [4]]


def test_bad_batch_arguments() -> None:
    data = random_ctr_data(np.random.default_rng(3), 5)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))
    with pytest.raises(ValueError, match="rank"):
        next(data.batches(2, rank=2, world_size=2))
    with pytest.raises(ValueError, match="seed"):
        next(data.batches(2, shuffle=True, seed=-1))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
def test_streaming_batches_equal_in_memory_batches(chunk_rows: int, shuffle: bool) -> None:
    data = random_ctr_data(np.random.default_rng(4), 61)
    for rank in range(2):
        streamed = list(
            batches_from_chunks(
                data.chunks(chunk_rows),
                6,
                BatchOrder(rank=rank, world_size=2, shuffle=shuffle and chunk_rows > 61, seed=2),
            )
        )
        in_memory = list(data.batches(6, rank=rank, world_size=2, shuffle=shuffle and chunk_rows > 61, seed=2))
        assert len(streamed) == len(in_memory)
        for a, b in zip(streamed, in_memory):
            _same_batch(a, b)


def test_streaming_shuffle_permutes_within_chunks() -> None:
    data = random_ctr_data(np.random.default_rng(5), 40)
    data.dense[:, 0] = np.arange(40)
    rows = torch.cat(
        [b.dense_features[:, 0] for b in batches_from_chunks(data.chunks(10), 3, BatchOrder(shuffle=True, seed=1))]
    ).long()
    assert sorted(rows.tolist()) == list(range(40))
    assert rows.tolist() != list(range(40))
    for k in range(4):  # each window of 10 rows stays in place
        assert sorted(rows[10 * k : 10 * k + 10].tolist()) == list(range(10 * k, 10 * k + 10))


def test_rechunk_and_concat() -> None:
    data = random_ctr_data(np.random.default_rng(6), 25)
    chunks = list(rechunk(data.chunks(3), 10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    whole = CTRData.concat(chunks)
    np.testing.assert_array_equal(whole.sparse, data.sparse)
    np.testing.assert_array_equal(whole.dense, data.dense)
    assert whole.multi_valued == data.multi_valued
    other = random_ctr_data(np.random.default_rng(6), 5, multi_valued=False)
    with pytest.raises(ValueError, match="different columns"):
        CTRData.concat([data, other])


def test_take_slice_and_num_embeddings() -> None:
    data = random_ctr_data(np.random.default_rng(7), 30)
    np.testing.assert_array_equal(data.slice(5, 9).sparse, data.sparse[5:9])
    np.testing.assert_array_equal(data.take(np.array([3, 1])).labels, data.labels[[3, 1]])
    expected = [data.sparse[:, 0].max() + 1, data.sparse[:, [1, 3, 4]].max() + 1, data.sparse[:, 2].max() + 1]
    assert data.num_embeddings_per_feature() == expected
    assert data.feature_names == ["a", "tags", "b"]
    empty = CTRData(np.zeros((2, 0)), np.full((2, 1), -1), np.zeros(2), [], ["x"])
    assert empty.num_embeddings_per_feature() == [0]
