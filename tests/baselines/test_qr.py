import math

import numpy as np
import pytest
import torch
from baseline_helpers import train_and_validate
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec.modules.remapped_ebc import RemappedEmbeddingBagCollection
from lhf_torchrec.baselines import QRRemap, QRSplit, fit_qr, qr_split
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping


@pytest.mark.parametrize("budget_rows,id_space", [(40, 300), (41, 400), (1000, 5000), (36, 324), (10, 7)])
def test_dense_split_covers_every_id_with_the_largest_remainder_table(budget_rows, id_space):
    split = qr_split(budget_rows, id_space)
    assert split.num_rows <= budget_rows and not split.hashed
    assert split.quotient_rows * split.remainder_rows >= id_space
    # No larger remainder table fits with a quotient table that still covers the ids.
    m = split.remainder_rows + 1
    assert m + math.ceil(id_space / m) > budget_rows or m > id_space
    ids = torch.arange(id_space)
    pairs = (ids // split.remainder_rows) * budget_rows + ids % split.remainder_rows
    assert pairs.unique().numel() == id_space


def test_split_hashes_when_the_budget_cannot_cover_the_ids_or_ids_are_sparse():
    assert qr_split(40, 401) == QRSplit(20, 20, 0)
    assert qr_split(41, None) == QRSplit(20, 21, 0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        qr_split(1, 10)


def _tables():
    return [
        EmbeddingBagConfig(name="dense", embedding_dim=8, num_embeddings=300, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="sparse", embedding_dim=8, num_embeddings=1 << 40, feature_names=["c"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=5, feature_names=["d"]),
        EmbeddingBagConfig(name="vocab", embedding_dim=8, num_embeddings=1 << 40, feature_names=["e"]),
    ]


def _module(seed=0):
    vocabulary = IdMapping.from_entries(np.array([-7, 10**12]), np.array([0, 1]), num_rows=3, hash_offset=2)
    remap = QRRemap(_tables(), {"dense": qr_split(40, 300), "sparse": qr_split(30, None)}, {"vocab": vocabulary},
                    seed=seed)
    return RemappedEmbeddingBagCollection(remap)


def _kjt(rng):
    keys = ["a", "b", "c", "d", "e"]
    batch = 6
    lengths = rng.integers(0, 4, size=len(keys) * batch)
    lengths[:batch] = 1  # single-id bags too
    values = []
    for k, n in zip(np.repeat(keys, batch), lengths):
        if k in "ab":
            values += list(rng.integers(0, 300, n))
        elif k == "c":
            values += list(rng.integers(-(1 << 62), 1 << 62, n))
        elif k == "d":
            values += list(rng.integers(0, 5, n))
        else:
            values += list(rng.choice([-7, 10**12, 99], n))
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int64))


def test_pooled_output_equals_a_slow_per_id_reference():
    module = _module()
    remap = module.remapper
    weights = {name: bag.weight.detach() for name, bag in module.ebc.embedding_bags.items()}
    features = _kjt(np.random.default_rng(0))
    out = module(features).to_dict()
    for key in features.keys():
        jt = features[key]
        table = remap.feature_to_table[key]
        for b, ids in enumerate(jt.to_dense()):
            expected = torch.zeros(8)
            for x in ids.tolist():
                if table in remap.splits:
                    q, r = remap.rows(table, torch.tensor([x]))
                    expected += weights[f"{table}__q"][q[0]] * weights[f"{table}__r"][r[0]]
                else:
                    row = remap.full_ids(table, torch.tensor([x]))[0]
                    expected += weights[table][row]
            if remap.configs[table].pooling == PoolingType.MEAN and len(ids):
                expected /= len(ids)
            torch.testing.assert_close(out[key][b], expected, rtol=1e-5, atol=1e-6)


def test_products_train_both_tables():
    module = _module()
    features = _kjt(np.random.default_rng(1))
    module(features).values().sum().backward()
    for name in ("dense__q", "dense__r", "sparse__q", "sparse__r"):
        assert module.ebc.embedding_bags[name].weight.grad.abs().sum() > 0


def test_rows_are_deterministic_by_seed():
    ids = torch.randint(-(1 << 62), 1 << 62, (1000,))
    same = [_module(seed=3).remapper.rows("sparse", ids) for _ in range(2)]
    other = _module(seed=4).remapper.rows("sparse", ids)
    assert all(torch.equal(a, b) for a, b in zip(*same))
    assert not torch.equal(same[0][0], other[0])
    assert _module(seed=3).remapper.fingerprint() == _module(seed=3).remapper.fingerprint()
    assert _module(seed=3).remapper.fingerprint() != _module(seed=4).remapper.fingerprint()


@pytest.mark.parametrize("compression", [2, 8])
def test_budget_identity(tiny_split, tiny_profiles, compression):
    fitted = fit_qr(tiny_split.tables, tiny_profiles, compression=compression, optimizer="rowwise_adagrad")
    per_row = row_bytes(8, "rowwise_adagrad")
    assert fitted.budgets, "the tiny data has tables to compress"
    for name, budget in fitted.budgets.items():
        assert budget - 2 * per_row < fitted.per_table_bytes[name] <= budget
    assert fitted.total_bytes == sum(fitted.per_table_bytes.values())
    assert fitted.mapping_bytes == sum(v.nbytes for v in fitted.compression.remapper.vocabularies.values())


def test_training_through_the_trainer_learns(tiny_split, tiny_profiles):
    fitted = fit_qr(tiny_split.tables, tiny_profiles, compression=4, optimizer="rowwise_adagrad")
    _, before, result = train_and_validate(tiny_split, fitted.compression)
    after = result.validation[-1]
    assert after["logloss"] < before["logloss"] - 0.05
    assert after["auc"] > 0.6
