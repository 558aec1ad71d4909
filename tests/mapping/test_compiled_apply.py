"""``torch.compile`` of :meth:`IdMapping.forward`: one graph (fullgraph), dynamic batch size, the eager rows.

Every storage, double hashing and bucketed mappings are compiled together as one module: each compile
costs seconds of C++ build, so one graph covers them all.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lhf_torchrec.mapping import IdMapping
from lhf_torchrec.mapping.id_mapping import COMPILE_SETTINGS

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class _ApplyAll(nn.Module):
    def __init__(self, mappings):
        super().__init__()
        self.mappings = nn.ModuleList(mappings)

    def forward(self, ids: torch.Tensor):
        return [m(ids) for m in self.mappings]


def _mappings():
    rng = np.random.default_rng(0)
    sparse = np.unique(np.concatenate([rng.integers(INT64_MIN, INT64_MAX, 300, dtype=np.int64),
                                       [INT64_MIN, INT64_MIN + 1, -1, 0, INT64_MAX - 1, INT64_MAX]]))
    near = np.arange(40, dtype=np.int64) * 3 + 1000  # a small span: dense, or int32 relative keys
    top = np.array([INT64_MAX - 5, INT64_MAX - 2, INT64_MAX])  # dense at the top of int64
    bottom = np.array([INT64_MIN, INT64_MIN + 3])
    regions = torch.tensor([[1, 7], [0, 8], [2, 5], [0, 3]], dtype=torch.int32)

    def entries(keys, num_rows, storage, **kw):
        m = IdMapping.from_entries(keys, np.arange(keys.size) % (num_rows // 2), num_rows, hash_offset=num_rows // 2,
                                   seed=7, table_name=f"{storage}-{len(kw)}", **kw)
        return m.with_storage(storage)

    def bucketed(storage, probes):
        # One entry per bucket at its first row: entries' rows must lie in their id's bucket.
        ids = rng.integers(INT64_MIN, INT64_MAX, 400, dtype=np.int64)
        m = IdMapping(32, num_buckets=4, tensors={"bucket_hash_regions": regions}, probes=probes, seed=5)
        buckets = (m._keys_of(torch.from_numpy(ids)) // m._bucket_width).numpy()
        first = np.unique(buckets, return_index=True)[1]
        return IdMapping.from_entries(ids[first], buckets[first] * 8, 32, num_buckets=4, bucket_hash_regions=regions,
                                      probes=probes, seed=5, table_name=f"bucketed-{storage}").with_storage(storage)

    mappings = [
        IdMapping(50, hash_offset=10, seed=3, table_name="none"),
        IdMapping(50, hash_offset=10, probes=2, seed=3, table_name="none-probes-2"),
        entries(near, 100, "dense"),
        entries(near, 100, "dense", probes=2),
        entries(top, 100, "dense"),
        entries(bottom, 100, "dense"),
        entries(near, 100, "sorted"),  # int32 relative keys
        entries(sparse, 1 << 10, "sorted"),  # int64 keys
        entries(near, 100, "perfect_hash"),  # int32 relative keys, 2-byte rows
        entries(sparse, 1 << 20, "perfect_hash"),  # int64 keys, 3-byte rows
        entries(sparse, 1 << 24, "perfect_hash", probes=2),  # 4-byte rows, double hashing
        bucketed("perfect_hash", 1),
        bucketed("sorted", 1),
        bucketed("perfect_hash", 2),
        IdMapping(32, num_buckets=4, tensors={"bucket_hash_regions": regions}, seed=5, table_name="bucketed-none"),
    ]
    entry_ids = np.concatenate([sparse, near, top, bottom])
    return mappings, entry_ids


def _queries(entry_ids, size, seed):
    """Entry ids, their neighbours (int64 wraps around), extreme and random unseen ids, shuffled."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        neighbours = np.concatenate([entry_ids - 1, entry_ids + 1])
    pool = np.concatenate([entry_ids, neighbours, [INT64_MIN, INT64_MAX, 0, -1, 1 << 31, -(1 << 31) - 1],
                           rng.integers(INT64_MIN, INT64_MAX, size, dtype=np.int64)])
    return torch.from_numpy(rng.choice(pool, size))


def test_compiled_apply_is_one_graph_for_any_batch_size_with_the_eager_rows():
    mappings, entry_ids = _mappings()
    assert {m.storage for m in mappings} == {"none", "dense", "sorted", "perfect_hash"}
    module = _ApplyAll(mappings)
    compiled = torch.compile(module, **COMPILE_SETTINGS)  # fullgraph: a graph break is an error
    graphs = counters["stats"]["unique_graphs"]
    for size in (3000, 1777):
        ids = _queries(entry_ids, size, seed=size)
        for m, got, expected in zip(mappings, compiled(ids), module(ids)):
            assert got.dtype == expected.dtype and torch.equal(got, expected), m.table_name
        # The second size must run the same graph: recompiling per batch size is an error from here on.
        torch.compiler.set_stance("fail_on_recompile")
    torch.compiler.set_stance("default")
    assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled (not run eagerly), once
    # An empty batch compiles once more (dynamo specializes sizes 0 and 1), with the eager shapes.
    empty = torch.zeros(0, dtype=torch.int64)
    for m, got, expected in zip(mappings, compiled(empty), module(empty)):
        assert got.shape == expected.shape and got.dtype == expected.dtype, m.table_name


def test_compile_in_place_keeps_the_module_and_its_rows():
    rng = np.random.default_rng(3)
    keys = rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64)
    mapping = IdMapping.from_entries(keys, np.arange(500) % 40, 64, hash_offset=40, seed=11, table_name="t")
    ids = torch.from_numpy(np.concatenate([keys[:300], rng.integers(INT64_MIN, INT64_MAX, 300, dtype=np.int64)]))
    expected, state = mapping(ids), mapping.state_dict()
    graphs = counters["stats"]["unique_graphs"]
    mapping.compile()
    assert torch.equal(mapping(ids), expected)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    # Still an IdMapping with the same state_dict keys: sharders, swaps and checkpoints see no difference.
    assert type(mapping) is IdMapping and mapping.state_dict().keys() == state.keys()


@pytest.mark.parametrize("strict", [False, True])
def test_export_has_no_data_dependent_guard(strict):
    rng = np.random.default_rng(4)
    keys = rng.integers(INT64_MIN, INT64_MAX, 200, dtype=np.int64)
    mapping = IdMapping.from_entries(keys, np.arange(200) % 30, 64, hash_offset=30, table_name="t")
    ids = torch.from_numpy(np.concatenate([keys, rng.integers(INT64_MIN, INT64_MAX, 100, dtype=np.int64)]))
    exported = torch.export.export(mapping, (ids,), dynamic_shapes=({0: torch.export.Dim("n")},), strict=strict)
    assert torch.equal(exported.module()(ids[:123]), mapping(ids[:123]))


@pytest.fixture(autouse=True)
def _default_stance():
    yield
    torch.compiler.set_stance("default")
