"""apply_learned_hashing on TorchRec models: DLRM, DLRM_DCN, hand-made models, and its errors."""

from typing import Dict, List

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

import lhf_torchrec
from lhf_torchrec import IdMapping, apply_learned_hashing, fit_mapping
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection

DIM = 8
BATCH = 3


def tables(prefix: str = "t", sizes=(1000, 400, 50)) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"{prefix}{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f"{prefix}f{i}"])
        for i, n in enumerate(sizes)
    ]


def mappings(names=("t0", "t1")) -> Dict[str, IdMapping]:
    rows = {"t0": 32, "t1": 16, "u0": 8}
    return {n: fit_mapping(torch.arange(200) % 37, method="frequency", num_rows=rows[n], seed=3, table=n) for n in names}


def kjt_for(configs: List[EmbeddingBagConfig], seed: int = 0, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in configs for f in t.feature_names]
    lengths = torch.tensor([1, 2, 0] * len(keys))
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)  # valid in every full table
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def make_dlrm(cls, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables(), device=torch.device(device))
    extra = {"dcn_num_layers": 2, "dcn_low_rank_dim": 4} if cls is DLRM_DCN else {}
    return cls(embedding_bag_collection=ebc, dense_in_features=5, dense_arch_layer_sizes=[16, DIM],
               over_arch_layer_sizes=[8, 1], **extra)


@pytest.mark.parametrize("cls", [DLRM, DLRM_DCN])
def test_dlrm_models_are_swapped(cls):
    model = make_dlrm(cls)
    old = model.sparse_arch.embedding_bag_collection
    kept = old.embedding_bags["t2"]
    swapped = apply_learned_hashing(model, mappings())
    assert swapped is model
    new = model.sparse_arch.embedding_bag_collection
    assert type(new) is LearnedHashEmbeddingBagCollection
    assert [c.num_embeddings for c in new.embedding_bag_configs()] == [32, 16, 50]
    assert new.ebc.embedding_bags["t0"].weight.shape == (32, DIM)
    assert new.ebc.embedding_bags["t2"] is kept  # unmapped table: same module, same weights
    assert sorted(new.mappings) == ["t0", "t1"]
    # A raw id far outside the full table reaches a row: only the swapped model can take it.
    sparse = kjt_for(tables())
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=sparse.keys(), values=torch.cat([torch.tensor([10**9]), sparse.values()[1:]]), lengths=sparse.lengths()
    )
    logits = model(torch.randn(BATCH, 5), sparse)
    assert logits.shape == (BATCH, 1) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert new.ebc.embedding_bags["t0"].weight.grad.abs().sum() > 0


def test_meta_stays_meta_and_mappings_stay_real():
    model = make_dlrm(DLRM, device="meta")
    apply_learned_hashing(model, mappings())
    new = model.sparse_arch.embedding_bag_collection
    assert all(p.device.type == "meta" for p in new.ebc.parameters())
    assert all(b.device.type == "cpu" and b.numel() > 0 for b in new.remapper.buffers())
    assert new.ebc.embedding_bags["t0"].weight.shape == (32, DIM)


def test_explicit_device_moves_the_tables():
    model = make_dlrm(DLRM)
    apply_learned_hashing(model, mappings(), device="meta")
    assert all(p.device.type == "meta" for p in model.sparse_arch.embedding_bag_collection.ebc.parameters())


class TwoTowers(nn.Module):
    def __init__(self, weighted: bool = False) -> None:
        super().__init__()
        self.user = nn.ModuleDict({"ebc": EmbeddingBagCollection(tables("t"), is_weighted=weighted, device=torch.device("cpu"))})
        self.item = EmbeddingBagCollection(tables("u", sizes=(300, 20)), device=torch.device("cpu"))
        self.untouched = EmbeddingBagCollection(tables("v", sizes=(30,)), device=torch.device("cpu"))


def test_every_ebc_holding_a_mapped_table_is_swapped_and_keeps_is_weighted():
    model = TwoTowers(weighted=True)
    untouched = model.untouched
    apply_learned_hashing(model, mappings(("t0", "u0")))
    assert type(model.user["ebc"]) is LearnedHashEmbeddingBagCollection and model.user["ebc"].is_weighted()
    assert type(model.item) is LearnedHashEmbeddingBagCollection and not model.item.is_weighted()
    assert model.untouched is untouched
    kjt = kjt_for(tables("t"), weighted=True)
    ones = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=torch.ones_like(kjt.weights())
    )
    assert not torch.allclose(model.user["ebc"](kjt)["tf0"], model.user["ebc"](ones)["tf0"])


def test_a_root_ebc_is_returned_swapped():
    ebc = EmbeddingBagCollection(tables(), device=torch.device("cpu"))
    new = apply_learned_hashing(ebc, mappings())
    assert type(new) is LearnedHashEmbeddingBagCollection
    assert new(kjt_for(tables())).values().shape == (BATCH, 3 * DIM)


def test_exported_at_package_level():
    assert lhf_torchrec.apply_learned_hashing is apply_learned_hashing


def test_a_mapping_naming_no_table_is_an_error():
    model = make_dlrm(DLRM)
    with pytest.raises(ValueError, match=r"mappings given for tables \['zz'\], which no EmbeddingBagCollection"):
        apply_learned_hashing(model, {**mappings(), "zz": fit_mapping(None, method="hash", num_rows=4)})
    assert type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection  # nothing changed


class CountingEBC(EmbeddingBagCollection):
    pass


def test_a_subclass_of_ebc_holding_a_mapped_table_is_an_error():
    model = nn.Sequential()
    model.add_module("tower", nn.ModuleDict({"emb": CountingEBC(tables(), device=torch.device("cpu"))}))
    with pytest.raises(TypeError, match=r"module 'tower\.emb' is a .*test_swap\.CountingEBC, a subclass of EmbeddingBagCollection"):
        apply_learned_hashing(model, mappings())


def test_a_subclass_without_mapped_tables_is_left_alone():
    model = TwoTowers()
    model.untouched = CountingEBC(tables("v", sizes=(30,)), device=torch.device("cpu"))
    apply_learned_hashing(model, mappings(("t0",)))
    assert type(model.untouched) is CountingEBC


def test_a_model_without_ebc_is_an_error():
    with pytest.raises(ValueError, match=r"Sequential has no EmbeddingBagCollection"):
        apply_learned_hashing(nn.Sequential(nn.Linear(2, 2)), mappings())


def test_no_mappings_is_an_error():
    with pytest.raises(ValueError, match=r"no mappings given"):
        apply_learned_hashing(make_dlrm(DLRM), {})


def test_swapping_twice_is_an_error():
    model = make_dlrm(DLRM)
    apply_learned_hashing(model, mappings())
    with pytest.raises(ValueError, match=r"tables \['t0', 't1'\] of module 'sparse_arch.embedding_bag_collection' are already compressed"):
        apply_learned_hashing(model, mappings())


def test_a_table_name_two_ebcs_share_is_ambiguous():
    model = nn.ModuleDict({"a": EmbeddingBagCollection(tables(), device=torch.device("cpu")),
                           "b": EmbeddingBagCollection(tables(), device=torch.device("cpu"))})
    with pytest.raises(ValueError, match=r"'t0': \['a', 'b'\]"):
        apply_learned_hashing(model, mappings(("t0",)))


def test_a_bad_mapping_is_reported_with_its_table_and_nothing_is_swapped():
    model = TwoTowers()
    user_ebc = model.user["ebc"]
    bad = {"t0": mappings(("t0",))["t0"], "u1": fit_mapping(None, method="hash", num_rows=64)}
    with pytest.raises(ValueError, match=r"table 'u1': the mapping has 64 rows but the table only 20"):
        apply_learned_hashing(model, bad)
    assert model.user["ebc"] is user_ebc and type(model.item) is EmbeddingBagCollection
