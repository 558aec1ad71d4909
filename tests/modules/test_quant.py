"""The quantized inference module against the float LearnedHashEmbeddingBagCollection."""

import copy
import io
from typing import Dict, List

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec import IdMapping, fit_mapping
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.mapping.hashing import hash_ids
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection
from lhf_torchrec.modules.quant import (
    OutOfRangeRedirect,
    folded_remap,
    quantize_learned_hash_ebc,
    script_for_serving,
)

BATCH = 16
INT8, FP16 = torch.qint8, torch.float16


def make_tables(with_unfoldable: bool = True) -> List[EmbeddingBagConfig]:
    tables = [
        EmbeddingBagConfig(name="dense_t", num_embeddings=500, embedding_dim=8, feature_names=["f_dense"]),
        EmbeddingBagConfig(name="sorted_t", num_embeddings=1000, embedding_dim=8, feature_names=["f_sorted"]),
        EmbeddingBagConfig(name="hash_t", num_embeddings=300, embedding_dim=4, feature_names=["f_hash"]),
        EmbeddingBagConfig(name="plain_t", num_embeddings=50, embedding_dim=4, feature_names=["f_plain"]),
    ]
    if with_unfoldable:
        tables += [
            EmbeddingBagConfig(name="double_t", num_embeddings=400, embedding_dim=8, feature_names=["f_double"]),
            # Two features on one table: its TBE (MEAN pooling, alone) cannot take a folded remap.
            EmbeddingBagConfig(
                name="shared_t", num_embeddings=200, embedding_dim=8, feature_names=["f_a", "f_b"], pooling=PoolingType.MEAN
            ),
        ]
    return tables


def make_mappings(with_unfoldable: bool = True) -> Dict[str, IdMapping]:
    rng = np.random.default_rng(0)
    history = rng.permutation(1000)[np.minimum(rng.zipf(1.3, 5000) - 1, 999)]
    mappings = {
        # 460 entries over a span of 460 ids: stored densely.
        "dense_t": IdMapping.from_entries(
            np.arange(20, 480), rng.integers(0, 30, 460), num_rows=50, hash_offset=30, seed=7,
            method="frequency", table_name="dense_t",
        ),
        "sorted_t": fit_mapping(history, method="frequency", num_rows=100, seed=1, table="sorted_t"),
        "hash_t": fit_mapping(None, method="hash", num_rows=30, seed=2, table="hash_t"),
    }
    if with_unfoldable:
        mappings["double_t"] = fit_mapping(history % 400, method="double_hash", num_rows=40, seed=3, table="double_t")
        mappings["shared_t"] = IdMapping.from_entries(
            np.arange(200), rng.integers(0, 15, 200), num_rows=20, hash_offset=15, seed=4,
            method="frequency", table_name="shared_t",
        )
    return mappings


def build(with_unfoldable: bool = True, is_weighted: bool = False) -> LearnedHashEmbeddingBagCollection:
    torch.manual_seed(0)
    module = LearnedHashEmbeddingBagCollection(
        make_tables(with_unfoldable), make_mappings(with_unfoldable), device=torch.device("cpu"), is_weighted=is_weighted
    )
    with torch.no_grad():  # weights of unit scale, so that a wrong row cannot pass for int8 error
        for param in module.ebc.parameters():
            param.normal_()
    return module.eval()


OUT_OF_RANGE = [-1, -5, -(1 << 62), 1 << 40, (1 << 62) + 3]


def make_kjt(module: LearnedHashEmbeddingBagCollection, seed: int = 0, weighted: bool = False) -> KeyedJaggedTensor:
    """Bags of 0..3 ids over each feature's id space, plus negative and out-of-range ids (``N``, ``N + 7``
    and the ``OUT_OF_RANGE`` values) in every mapped feature; the unmapped table only gets valid ids."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for t in module.full_embedding_bag_configs():
        for f in t.feature_names:
            lens = torch.randint(0, 4, (BATCH,), generator=g)
            lens[:3] = 3
            ids = torch.randint(0, t.num_embeddings, (int(lens.sum()),), generator=g)
            if t.name in module.mappings:
                ids[:7] = torch.tensor([t.num_embeddings, t.num_embeddings + 7] + OUT_OF_RANGE)
            keys.append(f)
            values.append(ids)
            lengths.append(lens)
    all_values = torch.cat(values)
    weights = torch.rand(all_values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=all_values, lengths=torch.cat(lengths), weights=weights)


def error_bound(module: LearnedHashEmbeddingBagCollection, kjt: KeyedJaggedTensor, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Elementwise bound of |quantized - float| for every pooled output.

    fp16: rounding to nearest is off by at most 2^-11 |x| (unit roundoff), 2^-25 for subnormals.
    int8 (FBGEMM row-wise): x ~ q * scale + bias with scale = (max - min) / 255 and bias = min of
    the row, both stored in fp16. Rounding q costs scale / 2; fp16 scale and bias add up to
    255 * 2^-11 * scale + 2^-11 |min|. Bound used: scale + 2^-10 max|row| (margin > 1.5x).
    Pooling sums (or averages) these with the bag's |weights|: the bound is the float module's
    output with the weights replaced by their bounds and the KJT's weights by their absolute values.
    """
    bound = copy.deepcopy(module)
    with torch.no_grad():
        for param in bound.ebc.parameters():
            if dtype == FP16:
                param.copy_(2.0**-11 * param.abs() + 2.0**-25)
            else:
                scale = (param.amax(dim=1) - param.amin(dim=1)) / 255
                param.copy_((scale + 2.0**-10 * param.abs().amax(dim=1)).unsqueeze(1).expand_as(param))
        w = kjt.weights_or_none()
        abs_kjt = KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=None if w is None else w.abs()
        )
        return bound(abs_kjt).to_dict()


def assert_within_bound(module, qmodule, kjt, dtype) -> None:
    with torch.no_grad():
        ref = module(kjt).to_dict()
    out = qmodule(kjt).to_dict()
    bound = error_bound(module, kjt, dtype)
    assert set(out) == set(ref)
    for key in ref:
        assert out[key].dtype == torch.float32 and out[key].shape == ref[key].shape
        err = (out[key] - ref[key]).abs()
        # A wrong row would be off by O(1): the bound must be far below that to mean anything.
        assert bound[key].max() < 0.1, key
        assert torch.all(err <= bound[key] * 1.01 + 1e-6), f"{key}: max excess {(err - bound[key]).max():.3g}"


@pytest.mark.parametrize("dtype", [INT8, FP16], ids=["int8", "fp16"])
@pytest.mark.parametrize("fold_remap", ["dense", "all", "none"])
def test_outputs_within_quantization_error(dtype, fold_remap):
    module = build()
    qmodule = quantize_learned_hash_ebc(module, dtype=dtype, fold_remap=fold_remap)
    assert_within_bound(module, qmodule, make_kjt(module), dtype)


def test_weighted_bags_within_quantization_error():
    module = build(with_unfoldable=False, is_weighted=True)  # MEAN pooling (shared_t) takes no weights
    qmodule = quantize_learned_hash_ebc(module, dtype=INT8, fold_remap="all")
    assert qmodule.folded_tables == ["dense_t", "hash_t", "sorted_t"]
    assert_within_bound(module, qmodule, make_kjt(module, seed=3, weighted=True), INT8)


def test_which_tables_are_folded():
    module = build()
    mappings = module.mappings
    assert mappings["dense_t"].storage == "dense" and mappings["sorted_t"].storage == "perfect_hash"  # sparse
    assert mappings["shared_t"].storage == "dense" and mappings["hash_t"].storage == "none"

    dense = quantize_learned_hash_ebc(module, fold_remap="dense")
    assert dense.folded_tables == ["dense_t"]  # shared_t is dense too, but its TBE has a 2-feature table
    assert sorted(dense.remapper.mappings) == ["double_t", "hash_t", "shared_t", "sorted_t"]
    everything = quantize_learned_hash_ebc(module, fold_remap="all")
    assert everything.folded_tables == ["dense_t", "hash_t", "sorted_t"]
    assert sorted(everything.remapper.mappings) == ["double_t", "shared_t"]
    nothing = quantize_learned_hash_ebc(module, fold_remap="none")
    assert nothing.folded_tables == [] and nothing.redirect is None

    # Memory: a folded table costs 4 bytes per raw id plus its hash block; in front, the mapping's bytes
    # (and what the fused remap adds to apply it with the others).
    full = {t.name: t.num_embeddings for t in module.full_embedding_bag_configs()}
    nbytes = everything.remap_nbytes()
    for name in everything.folded_tables:
        assert nbytes[name] == 4 * (full[name] + mappings[name].hash_rows)
    assert nbytes["double_t"] == mappings["double_t"].nbytes
    assert nothing.remap_nbytes() == {name: m.nbytes + runtime_bytes(m) for name, m in mappings.items()}


def test_folded_array_is_the_mapping_over_the_raw_id_space():
    module = build()
    qmodule = quantize_learned_hash_ebc(module, fold_remap="all")
    (tbe,) = [m for m in qmodule.ebc._emb_modules if "dense_t" in [s[0] for s in m.embedding_specs]]
    names = [s[0] for s in tbe.embedding_specs]
    offsets = tbe.index_remappings_array_offsets.tolist()
    full = {t.name: t.num_embeddings for t in module.full_embedding_bag_configs()}
    for name in ["dense_t", "hash_t", "sorted_t"]:
        mapping, num_ids, i = module.mappings[name], full[name], names.index(name)
        segment = tbe.index_remappings_array[offsets[i]:offsets[i + 1]]
        expected_rows = mapping(torch.arange(num_ids))
        assert torch.equal(segment[:num_ids].long(), expected_rows)
        assert torch.equal(segment[num_ids:].long(), mapping.hash_offset + torch.arange(mapping.hash_rows))
        assert torch.equal(folded_remap(mapping, num_ids), segment)
    # plain_t has no mapping and double_t is not folded: no array, the kernel passes their ids through.
    for name in ["plain_t", "double_t"]:
        i = names.index(name)
        assert offsets[i] == offsets[i + 1]


@pytest.mark.parametrize("dtype", [INT8, FP16], ids=["int8", "fp16"])
def test_folded_and_in_front_give_identical_outputs(dtype):
    """Same quantized weights, two remap paths: bitwise equal outputs mean equal rows for every id,
    the out-of-range ones (which the kernel alone would send to raw id 0) included."""
    module = build()
    kjt = make_kjt(module, seed=1)
    folded = quantize_learned_hash_ebc(module, dtype=dtype, fold_remap="all")(kjt).to_dict()
    in_front = quantize_learned_hash_ebc(module, dtype=dtype, fold_remap="none")(kjt).to_dict()
    for key in in_front:
        assert torch.equal(folded[key], in_front[key]), key


def test_out_of_range_redirect_targets_the_hash_block():
    mapping = make_mappings()["dense_t"]
    redirect = OutOfRangeRedirect(["f_x", "f_dense"], {"f_dense": (500, mapping)})
    dense_ids = torch.tensor([0, 499, 500, -1, 1 << 40, 7] + OUT_OF_RANGE)
    other_ids = torch.tensor([-3, 10**15])  # a feature that is not folded: untouched
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_dense", "f_x"], values=torch.cat([dense_ids, other_ids]),
        lengths=torch.tensor([dense_ids.numel(), 0, 1, 1]),
    )
    out = redirect(kjt)
    assert out.keys() == ["f_dense", "f_x"] and torch.equal(out.lengths(), kjt.lengths())
    got = out.values()[: dense_ids.numel()]
    outside = (dense_ids < 0) | (dense_ids >= 500)
    assert torch.equal(got[~outside], dense_ids[~outside])
    assert torch.equal(got[outside], 500 + hash_ids(dense_ids[outside], mapping.hash_rows, mapping.seed))
    assert torch.equal(out.values()[dense_ids.numel():], other_ids)
    # Through the folded array the redirected index lands on the row the mapping gives the raw id.
    array = folded_remap(mapping, 500).long()
    assert torch.equal(array[got], mapping(dense_ids))


def test_scripted_module_matches_eager_after_save_and_load():
    module = build(with_unfoldable=False)
    qmodule = quantize_learned_hash_ebc(module, dtype=INT8, fold_remap="all")
    assert qmodule.remapper is None
    scripted = script_for_serving(qmodule)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for seed in (0, 1):
        kjt = make_kjt(module, seed=seed)
        eager = qmodule(kjt)
        served = loaded(kjt)
        assert served.keys() == eager.keys()
        assert torch.equal(served.values(), eager.values())


def test_folded_module_exports_with_a_dynamic_number_of_ids():
    module = build(with_unfoldable=False)
    qmodule = quantize_learned_hash_ebc(module, dtype=INT8, fold_remap="all")
    kjt = make_kjt(module)
    shapes = torch.export.ShapesCollection()
    shapes[kjt.values()] = {0: torch.export.Dim.DYNAMIC}
    program = torch.export.export(qmodule, (kjt,), dynamic_shapes=shapes.dynamic_shapes(qmodule, (kjt,)), strict=False)
    other = make_kjt(module, seed=5)
    assert other.values().numel() != kjt.values().numel()
    assert torch.equal(program.module()(other).values(), qmodule(other).values())


def test_script_for_serving_refuses_a_remap_in_front():
    qmodule = quantize_learned_hash_ebc(build(), fold_remap="dense")
    with pytest.raises(ValueError, match="remapped in front"):
        script_for_serving(qmodule)


def test_float_module_is_left_unchanged():
    module = build()
    kjt = make_kjt(module)
    with torch.no_grad():
        before = module(kjt).values()
    quantize_learned_hash_ebc(module, dtype=FP16, fold_remap="all")
    assert not hasattr(module.ebc, "qconfig")
    with torch.no_grad():
        assert torch.equal(module(kjt).values(), before)


def test_invalid_arguments():
    module = build(with_unfoldable=False)
    with pytest.raises(ValueError, match="dtype"):
        quantize_learned_hash_ebc(module, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fold_remap"):
        quantize_learned_hash_ebc(module, fold_remap=True)
    with pytest.raises(TypeError, match="LearnedHashEmbeddingBagCollection"):
        quantize_learned_hash_ebc(module.ebc)


def test_a_bucketed_mapping_stays_in_front():
    """Its hash regions are per bucket, which one folded hash block cannot express: never folded."""
    mappings = make_mappings(with_unfoldable=False)
    mappings["sorted_t"] = fit_mapping(torch.arange(100).repeat(3), method="frequency", num_rows=100, seed=1,
                                       table="sorted_t", num_buckets=4)
    torch.manual_seed(0)
    module = LearnedHashEmbeddingBagCollection(make_tables(False), mappings, device=torch.device("cpu")).eval()
    with torch.no_grad():
        for param in module.ebc.parameters():
            param.normal_()
    qmodule = quantize_learned_hash_ebc(module, dtype=FP16, fold_remap="all")
    assert qmodule.folded_tables == ["dense_t", "hash_t"]
    assert sorted(qmodule.remapper.mappings) == ["sorted_t"]
    assert_within_bound(module, qmodule, make_kjt(module), FP16)
