import numpy as np
import torch
from baseline_helpers import train_and_validate
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from lhf_torchrec.baselines import (
    CCECompression,
    CCERemap,
    fit_cce,
)
from lhf_torchrec.baselines.cce import CCEPointers, default_columns, live_remap
from lhf_torchrec.modules.remapped_ebc import RemappedEmbeddingBagCollection
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.hashing import hash_with_coefficients
from lhf_torchrec.mapping.id_mapping import IdMapping

ROWS = 10


def _module(seed=0):
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=1 << 40, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=5, feature_names=["c"]),
        EmbeddingBagConfig(name="vocab", embedding_dim=8, num_embeddings=1 << 40, feature_names=["d"]),
    ]
    entries = np.arange(0, 400, 2) * 1_000_003  # even ids have pointers, odd ones are hashed
    vocabulary = IdMapping.from_entries(np.array([-7, 10**12]), np.array([0, 1]), num_rows=3, hash_offset=2)
    remap = CCERemap(tables, {"big": CCEPointers(entries, columns=2, rows=ROWS, seed=seed)}, {"vocab": vocabulary},
                     seed=seed)
    return RemappedEmbeddingBagCollection(remap)


def _kjt(rng, batch=6):
    keys = ["a", "b", "c", "d"]
    lengths = rng.integers(0, 4, size=len(keys) * batch)
    values = []
    for k, n in zip(np.repeat(keys, batch), lengths):
        if k in "ab":
            values += list(rng.integers(0, 400, n) * 1_000_003)
        elif k == "c":
            values += list(rng.integers(0, 5, n))
        else:
            values += list(rng.choice([-7, 10**12, 99], n))
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int64))


def _slow_embedding(remap, weights, x):
    """concat over columns of M_i[h_i(x)] + M'_i[h'_i(x)], computed id by id."""
    p = remap.pointers["big"]
    entries = dict(zip(p.entry_ids.tolist(), p.pointers.tolist()))
    out = []
    for i in range(p.columns):
        ids = torch.tensor([x])
        first = entries[x][i] if x in entries else int(hash_with_coefficients(ids, p.first_hash[i])[0])
        second = ROWS + int(hash_with_coefficients(ids, p.second_hash[i])[0])
        w = weights[f"big__cce{i}"]
        out.append(w[first] + w[second])
    return torch.cat(out)


def _weights(module):
    return {name: bag.weight.detach().clone() for name, bag in module.ebc.embedding_bags.items()}


def _check_against_slow_reference(module, features):
    remap = module.remapper
    weights = _weights(module)
    out = module(features).to_dict()
    for key in features.keys():
        table = remap.feature_to_table[key]
        for b, ids in enumerate(features[key].to_dense()):
            expected = torch.zeros(8)
            for x in ids.tolist():
                expected += (_slow_embedding(remap, weights, x) if table == "big"
                             else weights[table][remap.full_ids(table, torch.tensor([x]))[0]])
            torch.testing.assert_close(out[key][b], expected, rtol=1e-5, atol=1e-6)


def test_pooled_output_equals_a_slow_reference_before_and_after_clustering():
    module = _module()
    features = _kjt(np.random.default_rng(0))
    _check_against_slow_reference(module, features)
    state = module.remapper.cluster_round(_weights(module))
    module.remapper.load_round(state)
    for name, weight in state["weights"].items():
        module.ebc.embedding_bags[name].weight.data.copy_(weight)
    _check_against_slow_reference(module, features)


def test_the_sketch_starts_as_hashed_compositional_embeddings():
    p = _module().remapper.pointers["big"]
    ids = torch.arange(0, 400) * 1_000_003  # entries and non-entries alike
    first, second = p(ids)
    for i in range(p.columns):
        assert torch.equal(first[:, i], hash_with_coefficients(ids, p.first_hash[i]))
        assert ((second[:, i] >= ROWS) & (second[:, i] < 2 * ROWS)).all()


def test_a_round_clusters_the_current_embeddings_of_the_entry_ids():
    module = _module()
    remap = module.remapper
    p = remap.pointers["big"]
    before = _weights(module)
    old = {x: _slow_embedding(remap, before, x) for x in p.entry_ids.tolist()}
    old_second_hash = p.second_hash.clone()
    state = remap.cluster_round(before)
    again = remap.cluster_round(before)
    assert all(torch.equal(state["pointers"][t], again["pointers"][t]) for t in state["pointers"])
    remap.load_round(state)
    for name, weight in state["weights"].items():
        module.ebc.embedding_bags[name].weight.data.copy_(weight)
        assert (weight[ROWS:] == 0).all()  # M'_i restarts from zero
    assert int(remap.rounds_done) == 1 and not torch.equal(p.second_hash, old_second_hash)
    after = _weights(module)
    ids = p.entry_ids.tolist()
    for i in range(p.columns):
        labels = p.pointers[:, i]
        assert labels.unique().numel() == ROWS
        columns = torch.stack([old[x][4 * i: 4 * i + 4] for x in ids])
        for label in range(ROWS):
            members = labels == label
            # The new column embedding of an entry id is the center of its cluster.
            center = columns[members].mean(0)
            for j in members.nonzero().squeeze(1).tolist():
                torch.testing.assert_close(_slow_embedding(remap, after, ids[j])[4 * i: 4 * i + 4], center)


def test_budget_identity_and_pointer_share(tiny_split, tiny_profiles):
    for compression, share in ((2, 0.25), (4, 0.5), (8, 0.0)):
        fitted = fit_cce(tiny_split.tables, tiny_profiles, compression=compression, optimizer="rowwise_adagrad",
                         pointer_share=share)
        c = default_columns(8)
        per_rows = 2 * c * row_bytes(8 // c, "rowwise_adagrad")
        for name, budget in fitted.budgets.items():
            assert budget - per_rows < fitted.per_table_bytes[name] <= budget
            assert fitted.compression.remapper.state_bytes(name) <= share * budget
            entries = fitted.compression.remapper.pointers[name].keys.numel()
            assert (entries > 0) == (share > 0)
        assert fitted.total_bytes == sum(fitted.per_table_bytes.values())


def test_fit_is_deterministic_by_seed(tiny_split, tiny_profiles):
    def fit(seed):
        return fit_cce(tiny_split.tables, tiny_profiles, compression=4, seed=seed).compression.remapper.fingerprint()

    assert fit(0) == fit(0)
    assert fit(0) != fit(1)


def test_schedule():
    compression = CCECompression(_module().remapper, rounds=3)
    assert compression.callback_steps(37) == [9, 18, 28]
    assert CCECompression(_module().remapper, rounds=0).callback_steps(37) == []


def _check_round_rewrote_the_sharded_tables(trainer) -> None:
    remap = live_remap(trainer.model)
    weights = trainer.table_weights()
    momentum = {k: v for s in trainer.model.fused_optimizer.state_dict()["state"].values() for k, v in s.items()}
    for table, p in remap.pointers.items():
        for i in range(p.columns):
            name = remap.column_name(table, i)
            assert (weights[name][p.rows:] == 0).all()  # M'_i restarts from zero
            assert (momentum[f"{name}.momentum1"].local_shards()[0].tensor == 0).all()
            assert weights[name][p.pointers[:, i].long()].abs().sum() > 0  # the centers the entries point to
    assert any((v.local_shards()[0].tensor != 0).any() for k, v in momentum.items() if "__cce" not in k)


def test_training_with_clustering_rounds_learns(tiny_split, tiny_profiles):
    fitted = fit_cce(tiny_split.tables, tiny_profiles, compression=4, optimizer="rowwise_adagrad")
    compression = fitted.compression
    cluster = compression.on_callback

    rounds_at = []

    def cluster_and_check(trainer):
        cluster(trainer)
        _check_round_rewrote_the_sharded_tables(trainer)
        rounds_at.append(trainer.step)

    compression.on_callback = cluster_and_check
    trainer, before, result = train_and_validate(tiny_split, compression)
    assert rounds_at == [9, 18, 28]
    assert int(live_remap(trainer.model).rounds_done) == 3
    after = result.validation[-1]
    assert after["logloss"] < before["logloss"] - 0.05
    assert after["auc"] > 0.6
