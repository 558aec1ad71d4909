import numpy as np
import pytest
import torch
from baseline_helpers import train_and_validate
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from lhf_torchrec.modules.remapped_ebc import RemappedEmbeddingBagCollection
from lhf_torchrec.baselines import FrozenMCH, MCHRemap, fit_mch, profile_mch
from lhf_torchrec.baselines.mch import FROZEN_BYTES_PER_SLOT
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.profile import IdProfile

TABLE = "t_cat_2"


@pytest.fixture(scope="module")
def profiled(tiny_split):
    """TorchRec's MCH of one table after a pass over the training data (LFU, 200 slots)."""
    return profile_mch(tiny_split.train, tiny_split.tables, {TABLE: 200}, batch_size=128)[TABLE]


def _probe_ids(profile):
    rng = np.random.default_rng(0)
    unseen = rng.integers(-(1 << 62), 1 << 62, 2000)
    return torch.from_numpy(np.concatenate([profile.ids, unseen, [0, -1, (1 << 63) - 2]]))


def test_frozen_remap_equals_torchrec_remap(profiled, tiny_profiles):
    ids = _probe_ids(tiny_profiles[TABLE])
    expected = profiled.remap({TABLE: JaggedTensor(values=ids, lengths=torch.ones_like(ids))})[TABLE].values()
    frozen = FrozenMCH.of(profiled)
    assert torch.equal(frozen(ids), expected)
    # The profile gave slots to ids (not only the miss row), and the slots go to frequent ids.
    counts = torch.from_numpy(tiny_profiles[TABLE].counts)
    owns_slot = frozen(torch.from_numpy(tiny_profiles[TABLE].ids)) != 199
    assert owns_slot.sum() == 199
    assert counts[owns_slot].sum() > 0.6 * counts.sum()


def test_pooled_output_equals_torchrec_mc_ebc_in_eval_mode(tiny_split, tiny_profiles):
    fitted = fit_mch(tiny_split.tables, tiny_profiles, tiny_split.train, compression=4, optimizer="rowwise_adagrad",
                     batch_size=128)
    ours = RemappedEmbeddingBagCollection(fitted.compression.remapper)
    compressed = fitted.compression.remapper.compressed_tables
    # TorchRec's MC-EBC over the same tables: same profiling, then eval mode (no more profiling).
    modules = profile_mch(tiny_split.train, tiny_split.tables, {t: fitted.compression.remapper.mch[t].zch_size for t in compressed},
                          batch_size=128)
    configs = [c for c in ours.embedding_bag_configs() if c.name in compressed]
    theirs = ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection(tables=configs),
                                                    ManagedCollisionCollection(modules, configs))
    theirs.eval()
    for name in compressed:
        theirs._embedding_module.embedding_bags[name].weight.data.copy_(ours.ebc.embedding_bags[name].weight.data)
    batch = next(iter(tiny_split.test.batches(256)))
    features = batch.sparse_features
    expected = theirs(features)[0].to_dict()
    got = ours(features).to_dict()
    for name in compressed:
        for feature in fitted.compression.remapper.configs[name].feature_names:
            assert torch.equal(got[feature], expected[feature])


def test_budget_identity_and_state_bytes(tiny_split, tiny_profiles):
    per_slot = row_bytes(8, "rowwise_adagrad") + FROZEN_BYTES_PER_SLOT
    for compression in (2, 8):
        fitted = fit_mch(tiny_split.tables, tiny_profiles, tiny_split.train, compression=compression,
                         optimizer="rowwise_adagrad", batch_size=128)
        for name, budget in fitted.budgets.items():
            assert budget - per_slot < fitted.per_table_bytes[name] <= budget
            assert fitted.compression.remapper.state_bytes(name) == FROZEN_BYTES_PER_SLOT * fitted.compression.remapper.mch[name].zch_size
        assert fitted.total_bytes == sum(fitted.per_table_bytes.values())


def test_profiling_is_deterministic_and_the_policy_matters(tiny_split, tiny_profiles):
    def fit(**kwargs):
        return fit_mch(tiny_split.tables, tiny_profiles, tiny_split.train, compression=4, batch_size=128, **kwargs)

    assert fit().compression.remapper.fingerprint() == fit().compression.remapper.fingerprint()
    assert fit().compression.remapper.fingerprint() != fit(eviction_policy="lru").compression.remapper.fingerprint()
    with pytest.raises(ValueError, match="unknown eviction policy"):
        fit(eviction_policy="fifo")


def test_a_budget_below_two_slots_is_an_error():
    table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=200, feature_names=["f"])
    profile = IdProfile.from_ids(np.arange(200))
    with pytest.raises(ValueError, match="holds 1 MCH slots"):
        fit_mch([table], {"t": profile}, None, compression=100, optimizer="rowwise_adagrad")


def test_training_through_the_trainer_learns(tiny_split, tiny_profiles):
    fitted = fit_mch(tiny_split.tables, tiny_profiles, tiny_split.train, compression=4, optimizer="rowwise_adagrad",
                     batch_size=128)
    _, before, result = train_and_validate(tiny_split, fitted.compression)
    after = result.validation[-1]
    assert after["logloss"] < before["logloss"] - 0.05
    assert after["auc"] > 0.6


def test_remap_keeps_the_batch_layout():
    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=1000, feature_names=["f", "g"])
    frozen = FrozenMCH(torch.tensor([5, 9, (1 << 63) - 1]), torch.tensor([1, 0, 2]))
    remap = MCHRemap([table], {"t": frozen})
    features = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([9, 5, 7, 5]),
                                 lengths=torch.tensor([2, 0, 1, 1]))
    inner, _ = remap.preprocess(features)
    assert inner.keys() == ["f", "g"]
    assert inner.values().tolist() == [0, 1, 2, 1]
    assert inner.lengths().tolist() == [2, 0, 1, 1]
