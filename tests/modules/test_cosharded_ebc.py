"""The co-sharded remap (a TorchRec managed-collision module) and its wrapper, unsharded, against
the IdMapping and the LearnedHashEmbeddingBagCollection they stand for."""

from typing import Dict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from lhf_torchrec import IdEmbeddings, IdMapping, IdProfile, fit_mapping
from lhf_torchrec.mapping.buckets import cosharded_bytes
from lhf_torchrec.mapping.methods import METHODS
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection
from lhf_torchrec.modules.cosharded import CoShardedIdRemap, CoShardedLearnedHashEBC

int64s = st.integers(-(1 << 63), (1 << 63) - 1)
EXTREMES = [-(1 << 63), (1 << 63) - 1, 0, -1, 1, 1 << 40]
ONE_ROW_PER_ID = sorted(name for name, m in METHODS.items() if m.probes == 1)


@pytest.fixture(scope="module")
def fitted() -> Dict[str, IdMapping]:
    """A mapping per one-row-per-id method: 8 buckets of 12 rows, ids over all 64 bits."""
    rng = np.random.default_rng(3)
    ids = np.unique(np.concatenate([rng.integers(-(1 << 62), 1 << 62, 1500), np.arange(-50, 400)]))
    counts = np.maximum(1, (30_000 / np.arange(1, ids.size + 1) ** 1.05).astype(np.int64))
    rng.shuffle(counts)
    profile = IdProfile(ids, counts, int(counts.sum()))
    embeddings = IdEmbeddings(ids, torch.randn(ids.size, 4, generator=torch.Generator().manual_seed(0)))
    return {method: fit_mapping(profile, method=method, num_rows=96, embeddings=embeddings, seed=7,
                                table=f"t_{method}", num_buckets=8, min_count=2)
            if method in ("learned", "combination") else
            fit_mapping(profile, method=method, num_rows=96, seed=7, table=f"t_{method}", num_buckets=8)
            for method in ONE_ROW_PER_ID}


def _remap(remap: CoShardedIdRemap, ids: torch.Tensor) -> torch.Tensor:
    return remap({"t": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})["t"].values()


@pytest.mark.parametrize("method", ONE_ROW_PER_ID)
@settings(max_examples=30, deadline=None)
@given(ids=st.lists(int64s, min_size=0, max_size=50), pick=st.lists(st.integers(0, 1900), max_size=50))
def test_remap_gives_the_mappings_rows_for_every_id(fitted, method, ids, pick):
    mapping = fitted[method]
    remap = CoShardedIdRemap.from_mapping(mapping)
    query = torch.tensor(ids + EXTREMES + list(range(-50, 0)) + pick, dtype=torch.int64)
    assert torch.equal(_remap(remap, query), mapping(query))
    assert mapping.num_entries > 0 or method == "hash"


@pytest.mark.parametrize("method", ONE_ROW_PER_ID)
def test_layout_is_the_contracts_and_gives_the_mapping_back(fitted, method):
    mapping = fitted[method]
    remap = CoShardedIdRemap.from_mapping(mapping)
    rows, slots = remap._keys.shape
    assert rows == 96 and remap._slots.shape == (96, slots) and remap._hash_regions.shape == (96,)
    assert remap._keys.dtype == torch.int64 and remap._slots.dtype == torch.int32
    assert bool((remap._keys.view(-1)[1:] >= remap._keys.view(-1)[:-1]).all())
    counts = mapping.bucket_entry_counts()
    nbytes = sum(b.numel() * b.element_size() for n, b in remap.named_buffers() if n in ("_keys", "_slots", "_hash_regions"))
    assert nbytes == cosharded_bytes(96, 8, int(counts.max()))
    regions = remap._hash_regions.view(8, 12)
    assert torch.equal(regions[:, :2], mapping.bucket_hash_regions) and not bool(regions[:, 2:].any())
    assert remap.to_mapping().fingerprint == mapping.fingerprint


def test_rebuild_keeps_whole_buckets_and_refuses_a_cut():
    mapping = fit_mapping(np.arange(2000) % 700, method="frequency", num_rows=64, num_buckets=4, table="tc")
    remap = CoShardedIdRemap.from_mapping(mapping)
    half = remap.rebuild_with_output_id_range((32, 64), [0, 32, 64])
    assert (half.first_bucket, half.end_bucket, half.output_size(), half.buckets()) == (2, 4, 32, 4)
    assert torch.equal(half._keys, remap._keys[32:]) and torch.equal(half._hash_regions, remap._hash_regions[32:])
    ids = torch.arange(-300, 1000)
    h = half.preprocess({"t": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})["t"].values()
    mine = h // (half.input_size() // 4) >= 2
    rows = half.remap({"t": JaggedTensor(values=h[mine], lengths=torch.tensor([int(mine.sum())]))})["t"].values()
    assert torch.equal(rows, mapping(ids[mine])) and bool((rows >= 32).all())
    with pytest.raises(ValueError, match=r"table 'tc': the shard of rows \[24, 64\) cuts a bucket of 16 rows"):
        remap.rebuild_with_output_id_range((24, 64), [0, 24, 64])
    assert remap.evict() is None and remap.profile({"x": 1}) == {"x": 1}


def test_mappings_that_cannot_co_shard_are_refused_with_the_reason():
    double = fit_mapping(np.arange(500) % 90, method="double_hash", num_rows=32, num_buckets=4, table="td")
    with pytest.raises(ValueError, match="table 'td'.*2 probes per id.*cannot grow bags"):
        CoShardedIdRemap.from_mapping(double)
    plain = fit_mapping(np.arange(500) % 90, method="frequency", num_rows=32, table="tp")
    with pytest.raises(ValueError, match="table 'tp'.*not bucketed"):
        CoShardedIdRemap.from_mapping(plain)
    tables = [EmbeddingBagConfig(name="tp", num_embeddings=100, embedding_dim=4, feature_names=["p"])]
    with pytest.raises(ValueError, match="table 'tp' cannot co-shard.*not bucketed"):
        CoShardedLearnedHashEBC(tables, {"tp": plain}, cosharded_tables=["tp"])


def test_a_loaded_state_that_is_not_this_layout_is_refused():
    """validate_state runs after load_state_dict: keys out of order or in another bucket's block fail."""
    remap = CoShardedIdRemap.from_mapping(fit_mapping(np.arange(900) % 300, method="frequency", num_rows=48,
                                                      num_buckets=4, table="tb"))
    state = {k: v.clone() for k, v in remap.state_dict().items()}
    state["_keys"] = state["_keys"].roll(12, dims=0)  # bucket 3's block moved to the front
    with pytest.raises(ValueError, match=r"table 'tb': the loaded co-sharded mapping does not hold sorted keys"):
        remap.load_state_dict(state)


@pytest.mark.parametrize("weighted", [False, True])
def test_wrapper_equals_the_learned_hash_ebc(weighted):
    rng = np.random.default_rng(1)
    tables = [
        EmbeddingBagConfig(name="t_two", num_embeddings=4000, embedding_dim=8, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="t_dbl", num_embeddings=900, embedding_dim=8, feature_names=["d"]),
        EmbeddingBagConfig(name="t_one", num_embeddings=3000, embedding_dim=4, feature_names=["c"]),
        EmbeddingBagConfig(name="t_plain", num_embeddings=50, embedding_dim=4, feature_names=["p"]),
    ]
    mappings = {
        "t_two": fit_mapping(rng.zipf(1.3, 5000) % 4000, method="frequency", num_rows=64, num_buckets=4, table="t_two"),
        "t_dbl": fit_mapping(rng.zipf(1.3, 5000) % 900, method="double_hash", num_rows=32, num_buckets=4, table="t_dbl"),
        "t_one": fit_mapping(None, method="hash", num_rows=48, num_buckets=8, table="t_one"),
    }
    torch.manual_seed(0)
    module = CoShardedLearnedHashEBC(tables, mappings, is_weighted=weighted)
    # Weighted features keep replicated remaps (the sharded MC engine pools them differently).
    assert module.cosharded_tables == ([] if weighted else ["t_two", "t_one"])
    assert sorted(module.replicated.mappings) == (sorted(mappings) if weighted else ["t_dbl"])
    if weighted:
        with pytest.raises(ValueError, match="table 't_one' cannot co-shard.*weighted"):
            CoShardedLearnedHashEBC(tables, mappings, cosharded_tables=["t_one"], is_weighted=True)
    reference = module.to_learned_hash_ebc()
    assert isinstance(reference, LearnedHashEmbeddingBagCollection)
    assert {n: m.fingerprint for n, m in reference.mappings.items()} == {n: m.fingerprint for n, m in mappings.items()}
    keys = ["p", "c", "d", "b", "a"]  # not the module's order: the output still has the tables' order
    lengths = torch.tensor([1, 0, 2, 3, 2, 1, 0, 4, 1, 1, 2, 2, 3, 0, 1])
    values = torch.cat([torch.tensor([3, 49, 7]), torch.tensor([-5, 1 << 50, 17, 2, 2, 0]),
                        torch.from_numpy(rng.zipf(1.3, 5) % 900), torch.tensor([1, 2, 3, -9, 1]),
                        torch.tensor([4000, 7, 7, 1 << 62])])
    weights = torch.rand(values.numel()) if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)
    out, expected = module(kjt), reference(kjt)
    assert out.keys() == ["a", "b", "d", "c", "p"]
    for key in out.keys():
        assert torch.allclose(out[key], expected[key]), key
        assert out[key].abs().sum() > 0 or key == "p"
    with pytest.raises(KeyError, match=r"missing \['p'\]"):
        module(KeyedJaggedTensor.from_lengths_sync(keys=keys[1:], values=values[3:], lengths=lengths[3:]))
    assert out["a"].shape == (3, 8) and out["c"].shape == (3, 4)


def test_swap_puts_co_shardable_tables_in_the_mc_collection_and_keeps_unmapped_weights():
    from torch import nn
    from torchrec import EmbeddingBagCollection

    from lhf_torchrec.modules import apply_cosharded_learned_hashing, apply_learned_hashing

    tables = [EmbeddingBagConfig(name="t_a", num_embeddings=1000, embedding_dim=4, feature_names=["a"]),
              EmbeddingBagConfig(name="t_b", num_embeddings=800, embedding_dim=4, feature_names=["b"]),
              EmbeddingBagConfig(name="t_c", num_embeddings=30, embedding_dim=4, feature_names=["c"])]
    mappings = {"t_a": fit_mapping(np.arange(3000) % 999, method="frequency", num_rows=32, num_buckets=4, table="t_a"),
                "t_b": fit_mapping(np.arange(3000) % 799, method="frequency", num_rows=32, num_buckets=4, table="t_b")}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.sparse = EmbeddingBagCollection(tables=tables)

    plain = Model()
    kept = plain.sparse.embedding_bags["t_c"].weight.detach().clone()
    model = apply_cosharded_learned_hashing(Model(), mappings, cosharded_tables=["t_a"])
    assert isinstance(model.sparse, CoShardedLearnedHashEBC) and model.sparse.cosharded_tables == ["t_a"]
    assert sorted(model.sparse.replicated.mappings) == ["t_b"]
    assert torch.equal(model.sparse.replicated.ebc.embedding_bags["t_c"].weight, kept)
    reference = apply_learned_hashing(plain, mappings)
    with torch.no_grad():
        for name, bag in reference.sparse.ebc.embedding_bags.items():
            bag.weight.copy_(model.sparse.to_learned_hash_ebc().ebc.embedding_bags[name].weight)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=torch.tensor([5, -3, 1 << 40, 7, 29, 1]),
                                              lengths=torch.tensor([2, 1, 1, 1, 1, 0]))
    out, expected = model.sparse(kjt), reference.sparse(kjt)
    for key in ("a", "b", "c"):
        assert torch.allclose(out[key], expected[key]), key
    with pytest.raises(ValueError, match="cannot co-shard.*t_b.*not bucketed"):
        apply_cosharded_learned_hashing(Model(), {"t_b": fit_mapping(np.arange(9) % 7, method="frequency", num_rows=8,
                                                                     table="t_b")}, cosharded_tables=["t_b"])
