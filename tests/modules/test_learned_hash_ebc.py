"""The unsharded LearnedHashEmbeddingBagCollection against references built by hand."""

import functools
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec import IdMapping, fit_mapping
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection

BATCH = 4


def make_tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_user", num_embeddings=1000, embedding_dim=8, feature_names=["user", "user_hist"], pooling=pooling),
        EmbeddingBagConfig(name="t_item", num_embeddings=500, embedding_dim=8, feature_names=["item"], pooling=pooling),
        EmbeddingBagConfig(name="t_sparse", num_embeddings=1 << 20, embedding_dim=4, feature_names=["sparse"], pooling=pooling),
        EmbeddingBagConfig(name="t_learned", num_embeddings=300, embedding_dim=8, feature_names=["learned"], pooling=pooling),
        EmbeddingBagConfig(name="t_plain", num_embeddings=100, embedding_dim=4, feature_names=["plain"], pooling=pooling),
        EmbeddingBagConfig(name="t_dbl", num_embeddings=800, embedding_dim=8, feature_names=["dbl"]),
    ]


SPARSE_BASE = 1 << 40  # ids of t_sparse are 64-bit and sparse: its handful of entries are stored as sorted keys


def make_mappings(with_double: bool = True) -> Dict[str, IdMapping]:
    rng = np.random.default_rng(0)
    mappings = {
        "t_user": fit_mapping(rng.zipf(1.4, 4000) % 1000, method="frequency", num_rows=64, seed=1, table="t_user"),
        "t_item": fit_mapping(None, method="hash", num_rows=32, seed=2, table="t_item"),
        "t_sparse": fit_mapping(
            SPARSE_BASE + 7919 * (rng.zipf(1.4, 2000) % 400), method="frequency", num_rows=16, seed=3, table="t_sparse"
        ),
        # A dense table of int8 rows would be cheaper for these 300 ids: stored as a perfect hash table so
        # that every storage is covered.
        "t_learned": fit_mapping(
            rng.zipf(1.3, 3000) % 300, method="combination", num_rows=24, seed=4, table="t_learned", min_count=5,
            embeddings=torch.from_numpy(rng.normal(size=(300, 4)).astype(np.float32)),
        ).with_storage("perfect_hash"),
    }
    if with_double:
        mappings["t_dbl"] = fit_mapping(rng.zipf(1.4, 4000) % 800, method="double_hash", num_rows=40, seed=5, table="t_dbl")
    return mappings


def test_the_mappings_cover_every_storage():
    mappings = make_mappings()
    storages = {name: (m.storage, m.probes) for name, m in mappings.items()}
    assert storages == {
        "t_user": ("dense", 1), "t_item": ("none", 1), "t_sparse": ("sorted", 1), "t_learned": ("perfect_hash", 1),
        "t_dbl": ("dense", 2),
    }
    assert mappings["t_learned"].layout["clustered"] > 0


def make_kjt(tables: List[EmbeddingBagConfig], seed: int = 0, weighted: bool = False, empty_feature: Optional[str] = None) -> KeyedJaggedTensor:
    """A batch with empty bags, hot ids, unseen, negative and out-of-range ids (valid ids only for t_plain)."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for t in tables:
        for f in t.feature_names:
            lens = torch.tensor([0, 3, 1, 4]) if f != empty_feature else torch.zeros(BATCH, dtype=torch.int64)
            n = int(lens.sum())
            if t.name == "t_plain":
                ids = torch.randint(0, t.num_embeddings, (n,), generator=g)
            elif t.name == "t_sparse":
                ids = SPARSE_BASE + 7919 * torch.randint(0, 500, (n,), generator=g)
            else:
                ids = torch.randint(0, 60, (n,), generator=g)  # mostly profiled, hot ids
            if n >= 4 and t.name != "t_plain":
                ids[-3:] = torch.tensor([-5, 10 * t.num_embeddings + 3, (1 << 40) + 17])  # negative, out of range, unseen
            keys.append(f)
            values.append(ids)
            lengths.append(lens)
    all_values = torch.cat(values)
    weights = torch.rand(all_values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=all_values, lengths=torch.cat(lengths), weights=weights)


def build(tables, mappings, is_weighted=False, seed=0) -> LearnedHashEmbeddingBagCollection:
    torch.manual_seed(seed)
    return LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("cpu"), is_weighted=is_weighted)


def loop_reference(module: LearnedHashEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Pooled embeddings computed id by id in Python, from the mappings and the module's weights."""
    feature_table = {f: t for t in module.full_embedding_bag_configs() for f in t.feature_names}
    out = {}
    for key, jt in kjt.to_dict().items():
        config = feature_table[key]
        weight = module.ebc.embedding_bags[config.name].weight.detach()
        mapping = module.mappings.get(config.name)
        bags = []
        for b, ids in enumerate(jt.to_dense()):
            bag_weights = jt.to_dense_weights()[b] if jt.weights_or_none() is not None and module.is_weighted() else None
            total, count = torch.zeros(weight.shape[1]), 0
            for i, raw in enumerate(ids.tolist()):
                rows = [raw] if mapping is None else mapping(torch.tensor([raw])).reshape(-1).tolist()
                for row in rows:
                    if row < 0:
                        continue  # second probe of an id that has an entry
                    w = 1.0 if bag_weights is None else float(bag_weights[i])
                    total += w * weight[row]
                    count += 1
            bags.append(total / count if config.pooling == PoolingType.MEAN and count else total)
        out[key] = torch.stack(bags)
    return out


def remap_then_plain_ebc(module: LearnedHashEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """The manual reference: remap the ids, then a plain EBC of the compressed tables with the same weights."""
    feature_table = {f: t.name for t in module.full_embedding_bag_configs() for f in t.feature_names}
    compressed = [
        EmbeddingBagConfig(
            name=t.name, embedding_dim=t.embedding_dim, feature_names=list(t.feature_names), pooling=t.pooling,
            num_embeddings=module.mappings[t.name].num_rows if t.name in module.mappings else t.num_embeddings,
        )
        for t in module.full_embedding_bag_configs()
    ]
    plain = EmbeddingBagCollection(compressed, is_weighted=module.is_weighted(), device=torch.device("cpu"))
    plain.load_state_dict(module.ebc.state_dict())
    values = []
    for key, jt in kjt.to_dict().items():
        mapping = module.mappings.get(feature_table[key])
        values.append(jt.values() if mapping is None else mapping(jt.values()))
    remapped = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths(), weights=kjt.weights_or_none()
    )
    return plain(remapped).to_dict()


def assert_close_dict(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6, msg=f"feature {key}")


# ---------------------------------------------------------------------------------------------- behaviour
def test_same_keys_and_shapes_as_the_full_size_ebc():
    tables = make_tables()
    module = build(tables, make_mappings())
    full = EmbeddingBagCollection(tables, device=torch.device("cpu"))
    kjt = make_kjt(tables)
    expected, got = full(_valid_ids(kjt, tables)), module(kjt)
    assert got.keys() == expected.keys() == ["user", "user_hist", "item", "sparse", "learned", "plain", "dbl"]
    assert got.length_per_key() == expected.length_per_key()
    assert got.values().shape == expected.values().shape == (BATCH, 8 + 8 + 8 + 4 + 8 + 4 + 8)
    assert got.values().dtype == expected.values().dtype
    assert [c.num_embeddings for c in module.embedding_bag_configs()] == [64, 32, 16, 24, 100, 40]
    assert [c.num_embeddings for c in module.full_embedding_bag_configs()] == [t.num_embeddings for t in tables]


def _valid_ids(kjt: KeyedJaggedTensor, tables: List[EmbeddingBagConfig]) -> KeyedJaggedTensor:
    """The same batch with every id folded into its full table (a full-size EBC cannot take raw ids out of range)."""
    sizes = {f: t.num_embeddings for t in tables for f in t.feature_names}
    values = [jt.values().remainder(sizes[k]) for k, jt in kjt.to_dict().items()]
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths())


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_equals_remap_then_plain_ebc(pooling):
    # Double hashing needs SUM pooling: the MEAN case leaves its table out.
    tables = [t for t in make_tables(pooling) if t.pooling == pooling]
    module = build(tables, make_mappings(with_double=pooling == PoolingType.SUM))
    kjt = make_kjt(tables, seed=3)
    out = module(kjt).to_dict()
    assert_close_dict(out, loop_reference(module, kjt))
    if pooling == PoolingType.MEAN:
        assert_close_dict(out, remap_then_plain_ebc(module, kjt))
    # The batch hits hashed rows, entry rows, and pools several ids per bag.
    assert all(out[k][0].abs().sum() == 0 for k in out)  # bag 0 is empty in every feature
    assert all(out[k][3].abs().sum() > 0 for k in out)


def test_features_sharing_a_table_use_the_same_rows():
    tables = make_tables()
    module = build(tables, make_mappings())
    ids = torch.tensor([1, 2, 999_999, -3])
    keys = ["user", "user_hist", "item", "sparse", "learned", "plain", "dbl"]
    lengths = torch.zeros(len(keys) * BATCH, dtype=torch.int64)
    lengths[0:BATCH] = torch.tensor([1, 1, 1, 1])
    lengths[BATCH:2 * BATCH] = torch.tensor([1, 1, 1, 1])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat([ids, ids]), lengths=lengths)
    out = module(kjt).to_dict()
    torch.testing.assert_close(out["user"], out["user_hist"])
    weight = module.ebc.embedding_bags["t_user"].weight.detach()
    torch.testing.assert_close(out["user"], weight[module.mappings["t_user"](ids)])


def test_weighted_features_keep_their_weights():
    tables = [t for t in make_tables() if t.pooling == PoolingType.SUM]
    module = build(tables, make_mappings(), is_weighted=True)
    assert module.is_weighted() and module.ebc.is_weighted()
    kjt = make_kjt(tables, seed=5, weighted=True)
    remapped = module.remapper(kjt)
    for key in ["user", "item", "sparse", "learned", "plain"]:
        torch.testing.assert_close(remapped[key].weights(), kjt[key].weights())
    # A double-hashed id becomes two values, each with the id's weight.
    dbl_rows = module.mappings["t_dbl"](kjt["dbl"].values())
    expected_dbl = torch.repeat_interleave(kjt["dbl"].weights(), (dbl_rows >= 0).sum(dim=1))
    torch.testing.assert_close(remapped["dbl"].weights(), expected_dbl)
    out = module(kjt).to_dict()
    assert_close_dict(out, loop_reference(module, kjt))
    unweighted = build(tables, make_mappings(), is_weighted=False)
    assert not torch.allclose(out["user"], unweighted(kjt).to_dict()["user"])


def test_a_feature_without_ids_in_the_batch():
    tables = make_tables()
    module = build(tables, make_mappings())
    for empty in ["user", "dbl", "plain"]:
        kjt = make_kjt(tables, seed=7, empty_feature=empty)
        out = module(kjt).to_dict()
        assert torch.equal(out[empty], torch.zeros(BATCH, out[empty].shape[1]))
        assert_close_dict(out, loop_reference(module, kjt))


def test_a_batch_without_any_id():
    tables = make_tables()
    module = build(tables, make_mappings())
    keys = [f for t in tables for f in t.feature_names]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(len(keys) * BATCH, dtype=torch.int64)
    )
    out = module(kjt)
    assert torch.equal(out.values(), torch.zeros(BATCH, sum(out.length_per_key())))


def test_tables_without_a_mapping_pass_through():
    tables = make_tables()
    module = build(tables, make_mappings())
    plain_config = [t for t in tables if t.name == "t_plain"]
    plain = EmbeddingBagCollection(plain_config, device=torch.device("cpu"))
    plain.embedding_bags["t_plain"].weight.data.copy_(module.ebc.embedding_bags["t_plain"].weight.detach())
    kjt = make_kjt(tables, seed=11)
    torch.testing.assert_close(module(kjt)["plain"], plain(KeyedJaggedTensor.from_jt_dict({"plain": kjt["plain"]}))["plain"])
    assert torch.equal(module.remapper(kjt)["plain"].values(), kjt["plain"].values())
    assert "t_plain" not in module.mappings


def test_a_module_without_mappings_is_a_plain_ebc():
    tables = make_tables()
    module = build(tables, {})
    kjt = _valid_ids(make_kjt(tables, seed=2), tables)
    plain = EmbeddingBagCollection(tables, device=torch.device("cpu"))
    plain.load_state_dict(module.ebc.state_dict())
    assert module.remapper(kjt) is kjt
    assert_close_dict(module(kjt).to_dict(), plain(kjt).to_dict())


def test_double_hashing_sums_two_rows_for_an_id_without_entry():
    tables = make_tables()
    mappings = make_mappings()
    module = build(tables, mappings)
    mapping = mappings["t_dbl"]
    assert mapping.probes == 2
    hot, unseen = 1, 123_456_789  # id 1 is the most frequent: it has an entry (one row)
    rows = mapping(torch.tensor([hot, unseen]))
    assert rows[0, 1] == -1 and rows[1, 0] != rows[1, 1] and (rows[1] >= mapping.hash_offset).all()
    keys = [f for t in tables for f in t.feature_names]
    lengths = torch.zeros(len(keys) * BATCH, dtype=torch.int64)
    dbl = keys.index("dbl")
    lengths[dbl * BATCH:(dbl + 1) * BATCH] = torch.tensor([1, 1, 2, 0])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.tensor([hot, unseen, hot, unseen]), lengths=lengths)
    remapped = module.remapper(kjt)
    assert remapped["dbl"].lengths().tolist() == [1, 2, 3, 0]
    weight = module.ebc.embedding_bags["t_dbl"].weight.detach()
    out = module(kjt)["dbl"]
    torch.testing.assert_close(out[0], weight[rows[0, 0]])
    torch.testing.assert_close(out[1], weight[rows[1, 0]] + weight[rows[1, 1]])
    torch.testing.assert_close(out[2], weight[rows[0, 0]] + weight[rows[1, 0]] + weight[rows[1, 1]])
    assert torch.equal(out[3], torch.zeros(8))


def test_int32_ids_and_lengths():
    tables = make_tables()
    module = build(tables, make_mappings())
    kjt = make_kjt(tables, seed=13)
    kjt32 = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=_valid_ids(kjt, [*tables]).values().to(torch.int32), lengths=kjt.lengths().to(torch.int32)
    )
    kjt64 = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=kjt32.values().long(), lengths=kjt.lengths())
    assert_close_dict(module(kjt32).to_dict(), module(kjt64).to_dict())


def test_gradients_reach_the_compressed_rows_only():
    tables = make_tables()
    module = build(tables, make_mappings())
    kjt = make_kjt(tables, seed=17)
    module(kjt).values().sum().backward()
    grad = module.ebc.embedding_bags["t_item"].weight.grad
    used = module.mappings["t_item"](kjt["item"].values()).unique()
    touched = grad.abs().sum(dim=1).nonzero().squeeze(1)
    assert torch.equal(touched, used)
    assert all(b.grad is None for b in module.remapper.buffers())


# ------------------------------------------------------------------------------------------------- errors
def test_unknown_kjt_keys_are_named():
    tables = make_tables()
    module = build(tables, make_mappings())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user", "bogus"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(KeyError, match=r"features \['bogus'\] are not in this module"):
        module(kjt)


def test_float_ids_are_rejected():
    tables = make_tables()
    module = build(tables, make_mappings())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user"], values=torch.tensor([1.0, 2.5]), lengths=torch.tensor([2]))
    with pytest.raises(TypeError, match=r"integer ids, got dtype torch.float32 \(features \['user'\]\)"):
        module(kjt)


def test_a_mapping_for_an_unknown_table_is_named():
    with pytest.raises(ValueError, match=r"mappings given for tables \['t_nope'\]"):
        build(make_tables(), {"t_nope": fit_mapping(None, method="hash", num_rows=8)})


def test_a_mapping_with_more_rows_than_the_table():
    with pytest.raises(ValueError, match=r"table 't_plain': the mapping has 200 rows but the table only 100"):
        build(make_tables(), {"t_plain": fit_mapping(None, method="hash", num_rows=200)})


def test_double_hashing_needs_sum_pooling():
    tables = make_tables(PoolingType.MEAN)
    tables[-1].pooling = PoolingType.MEAN
    with pytest.raises(ValueError, match=r"table 't_dbl': method 'double_hash' sums two rows.*uses MEAN"):
        build(tables, make_mappings())


def test_mappings_never_go_to_meta():
    module = LearnedHashEmbeddingBagCollection(make_tables(), make_mappings(), device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in module.ebc.parameters())
    assert all(b.device.type == "cpu" for b in module.remapper.buffers())


def test_a_missing_kjt_key_names_feature_and_table():
    module = build(make_tables(), make_mappings())
    keys = [f for t in make_tables() for f in t.feature_names if f != "item"]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.ones(len(keys), dtype=torch.int64),
                                              lengths=torch.ones(len(keys), dtype=torch.int64))
    with pytest.raises(KeyError, match=r"lacks features item \(table t_item\); it has user, user_hist, sparse"):
        module(kjt)


@pytest.mark.parametrize("bad", [-1, 100])
def test_ids_outside_a_table_without_mapping_name_feature_and_table(bad):
    module = build(make_tables(), make_mappings())
    keys = [f for t in make_tables() for f in t.feature_names]
    values = torch.tensor([bad if k == "plain" else 1 for k in keys])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=torch.ones(len(keys), dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"feature 'plain': id {bad} is outside table 't_plain' \[0, 100\)"):
        module(kjt)


@pytest.mark.parametrize("weighted", [False, True])
def test_remapping_some_tables_later_equals_remapping_all_at_once(weighted):
    # The sharded module sends table-wise tables' ids raw and remaps them on the owner: the two
    # steps must give preprocess's KJT, also where double hashing grows the bags (t_dbl).
    tables = make_tables()
    remapper = LearnedHashEmbeddingBagCollection(tables, make_mappings()).remapper
    kjt = make_kjt(tables, seed=4, weighted=weighted)
    later = {"t_user", "t_dbl"}
    expected, _ = remapper.preprocess(kjt)
    first, _ = remapper.preprocess(kjt, raw=later)
    assert torch.equal(first["dbl"].values(), kjt["dbl"].values()) and torch.equal(first["user"].values(), kjt["user"].values())
    assert not torch.equal(first["item"].values(), kjt["item"].values())
    second = remapper.remap_features(first, later)
    assert second.keys() == expected.keys() and second.stride() == expected.stride()
    for part in ("values", "lengths") + (("weights",) if weighted else ()):
        assert torch.equal(getattr(second, part)(), getattr(expected, part)()), part
    assert second.length_per_key() == expected.length_per_key()
    assert sum(expected.lengths()) > sum(kjt.lengths())  # the double-hashed bags did grow


def test_a_remapper_without_some_tables_drops_only_their_state_and_leaves_the_original_whole():
    tables = make_tables()
    remapper = LearnedHashEmbeddingBagCollection(tables, make_mappings()).remapper
    before = {name: buffer for name, buffer in remapper.named_buffers()}
    assert remapper.stateful_tables() == sorted(make_mappings())
    kept = remapper.without_tables({"t_user", "t_dbl"})
    assert sorted(kept.mappings) == ["t_item", "t_learned", "t_sparse"] and kept.stateful_tables() == sorted(kept.mappings)
    assert {name: buffer for name, buffer in remapper.named_buffers()} == before  # the original keeps everything
    for name, buffer in kept.named_buffers():
        assert buffer is before[name]  # shared, not copied
    assert not any(".t_user." in k or ".t_dbl." in k for k in kept.state_dict())
    kjt = make_kjt(tables, seed=5)
    assert torch.equal(kept.preprocess(kjt, raw={"t_user", "t_dbl"})[0].values(),
                       remapper.preprocess(kjt, raw={"t_user", "t_dbl"})[0].values())


def mapping_by_mapping(remapper, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Each feature's values through its own table's IdMapping (the reference of the fused remap)."""
    out = {}
    for key, jt in kjt.to_dict().items():
        mapping = remapper.mappings[remapper.feature_to_table[key]] if remapper.feature_to_table[key] in remapper.mappings else None
        out[key] = jt.values() if mapping is None else mapping.remap_jagged(jt.values(), jt.lengths())[0]
    return out


@functools.lru_cache(maxsize=1)
def _fitted_remapper():
    tables = make_tables()  # fitted once: the examples vary the batch, not the mappings
    return tables, LearnedHashEmbeddingBagCollection(tables, make_mappings()).remapper


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=7 * BATCH, max_size=7 * BATCH), seed=st.integers(0, 1000),
       weighted=st.booleans())
def test_the_fused_remap_equals_mapping_by_mapping(lengths, seed, weighted):
    # Every storage (dense, none, perfect hash, a sparse sorted table left to its own path, double
    # hashing), features sharing a table, a table without mapping, bags of any size including empty.
    tables, remapper = _fitted_remapper()
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in tables for f in t.feature_names]
    lens = torch.tensor(lengths).view(len(keys), BATCH)
    values = []
    for key, feature_lengths in zip(keys, lens):
        n = int(feature_lengths.sum())
        pool = torch.tensor([-5, 0, 1, 59, 1 << 40, SPARSE_BASE, SPARSE_BASE + 7919, (1 << 63) - 1, -(1 << 63)])
        ids = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, 300, (n,), generator=g),
                          pool[torch.randint(0, pool.numel(), (n,), generator=g)])
        values.append(ids if key != "plain" else torch.randint(0, 100, (n,), generator=g))
    all_values = torch.cat(values)
    weights = torch.rand(all_values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=all_values, lengths=lens.reshape(-1), weights=weights)
    out = remapper(kjt)
    expected = mapping_by_mapping(remapper, kjt)
    assert sorted(remapper.fused_mappings().code) == ["t_item", "t_learned", "t_user"]
    for key, jt in out.to_dict().items():
        assert torch.equal(jt.values(), expected[key]), key
        if weighted and key != "dbl":
            assert torch.equal(jt.weights(), kjt[key].weights()), key


def test_the_fused_remap_follows_moves_and_state_dict_loads():
    tables = make_tables()
    module = build(tables, make_mappings())
    kjt = make_kjt(tables, seed=6)
    expected = module.remapper(kjt).values()
    fused = module.remapper.fused_mappings()
    slot_keys = module.mappings["t_learned"].slot_keys
    assert slot_keys.untyped_storage().data_ptr() == fused._hash_tables[0][0]["slot_keys"].untyped_storage().data_ptr()
    # A move replaces every buffer (as .to(device) does): the next remap packs the new ones.
    module._apply(lambda t: t.clone())
    assert module.remapper._fused is None
    assert torch.equal(module.remapper(kjt).values(), expected)
    assert module.remapper.fused_mappings() is not fused
    # A checkpoint of the module loads into a twin built from fresh copies of the mappings.
    twin = build(tables, make_mappings(), seed=1)
    twin.remapper(kjt)
    twin.load_state_dict(module.state_dict())
    assert torch.equal(twin.remapper(kjt).values(), expected)
    assert set(module.state_dict()) == set(build(tables, make_mappings()).state_dict())


def test_state_bytes_count_what_the_fused_remap_adds():
    remapper = LearnedHashEmbeddingBagCollection(make_tables(), make_mappings()).remapper
    for table, mapping in remapper.mappings.items():
        assert remapper.state_bytes(table) == mapping.nbytes + runtime_bytes(mapping)
    assert runtime_bytes(remapper.mappings["t_user"]) > 0 and runtime_bytes(remapper.mappings["t_dbl"]) == 0
    assert remapper.state_bytes("t_plain") == 0
