"""The planner hooks on one process: mapping reservation, per-rank accounting, placement, errors, reports."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

from lhf_torchrec import fit_mapping
from lhf_torchrec.mapping.budget import OPTIMIZERS
from lhf_torchrec.distributed.planner import (
    GB,
    format_bytes,
    InsufficientMemoryError,
    LearnedHashPlanner,
    MappingStorageReservation,
    mapping_bytes,
    plan_report,
    synthetic_mappings,
)
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping import IdMapping, perfect_hash, row_bytes
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

MB = 1024**2

logging.getLogger("torchrec").setLevel(logging.ERROR)


def _tables(sizes, dim=16):
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(sizes)
    ]


def _topology(world_size, device="cuda", hbm=80 * GB, ddr=128 * GB):
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=world_size),
        HardwareConfig(hbm_cap_bytes=int(hbm), ddr_cap_bytes=int(ddr)),
        KernelConfig(compute_device=device),
    )


def _base(percentage=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage)


def _fitted_mappings(tables, ratio=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        t.name: fit_mapping(rng.zipf(1.3, 20_000) % t.num_embeddings, method="frequency",
                            num_rows=t.num_embeddings // ratio, table=t.name)
        for t in tables
    }


def _model(tables, mappings, optimizer="sgd"):
    model = LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("meta"))
    apply_optimizer_in_backward(OPTIMIZERS[optimizer].cls, model.ebc.parameters(), {"lr": 0.01})
    return model


def _fused(tables, sharding_types=None):
    return {t.name: ParameterConstraints(sharding_types=sharding_types, compute_kernels=["fused"]) for t in tables}


@pytest.mark.parametrize("device,tier", [("cuda", "hbm"), ("cpu", "ddr")])
def test_mappings_are_reserved_on_every_rank_which_the_heuristic_reservation_misses(device, tier):
    tables = _tables([200_000, 50_000, 8_000])
    mappings = _fitted_mappings(tables)
    model = _model(tables, mappings)
    # The mappings' buffers and what the learned-hash remap adds to apply them together.
    expected = sum(m.nbytes + runtime_bytes(m) for m in mappings.values())
    assert mapping_bytes(model) == expected == mapping_bytes(mappings) > 0
    topology = _topology(4, device)
    sharders = [LearnedHashEBCSharder()]

    # TorchRec's default reservation does not see buffers inside a shardable module: it reserves
    # the same with and without mappings.
    heuristic_with = _base().reserve(topology, 512, model, sharders)
    heuristic_without = _base().reserve(topology, 512, _model(tables, {}), sharders)
    assert [d.storage for d in heuristic_with.devices] == [d.storage for d in heuristic_without.devices]

    reservation = MappingStorageReservation(_base())
    reserved = reservation.reserve(topology, 512, model, sharders)
    assert reservation.mapping_bytes == expected
    for full, heuristic, ours in zip(topology.devices, heuristic_with.devices, reserved.devices):
        assert getattr(heuristic.storage, tier) - getattr(ours.storage, tier) == expected
        assert getattr(full.storage, tier) - getattr(heuristic.storage, tier) == reservation.base_reserved[full.rank]
        other = "ddr" if tier == "hbm" else "hbm"
        assert getattr(ours.storage, other) == getattr(heuristic.storage, other)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_rank_memory_splits_the_planners_storage_like_row_bytes(optimizer):
    """Tables + optimizer state summed over ranks equal rows x row_bytes (the budget's accounting),
    and the planner's remaining term (io) scales with the batch size."""
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=32, num_embeddings=300_000, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=120_000, feature_names=["fb"]),
        EmbeddingBagConfig(name="c", embedding_dim=64, num_embeddings=5_000, feature_names=["fc"]),
    ]
    sums = {}
    for batch_size in (256, 512):
        planner = LearnedHashPlanner(
            _topology(2), batch_size, base_reservation=_base(), constraints=_fused(tables, ["table_wise"]),
            stats=[NoopEmbeddingStats()], debug=False,
        )
        planner.plan(_model(tables, {}, optimizer), [LearnedHashEBCSharder()])
        ranks = planner.rank_memory()
        assert all(r.io >= 0 and r.optimizer >= 0 and r.mappings == 0 for r in ranks)
        sums[batch_size] = {k: sum(getattr(r, k) for r in ranks) for k in ("tables", "optimizer", "io")}
    assert sums[512]["tables"] == sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    assert sums[512]["tables"] + sums[512]["optimizer"] == sum(
        t.num_embeddings * row_bytes(t.embedding_dim, optimizer) for t in tables
    )
    assert sums[256]["tables"] == sums[512]["tables"] and sums[256]["optimizer"] == sums[512]["optimizer"]
    assert sums[512]["io"] == pytest.approx(2 * sums[256]["io"], rel=1e-6) and sums[256]["io"] > 0


def _dense_mapping(name, num_ids, num_rows):
    """A mapping with an int32 row per raw id: 4 bytes x num_ids, large next to a small table."""
    return IdMapping(num_rows, storage="dense", tensors={"table": torch.zeros(num_ids, dtype=torch.int32)},
                     num_entries=num_ids, method="frequency", table_name=name)


def _placement_case():
    # a: 38.4 MB of weights, b: 12.8 MB; the mappings 28.8 MB on every rank, capacity 64 MB per rank.
    # Table-wise, a's rank would need 38.4 + 28.8 > 64 MB; row-wise, 25.6 + 28.8 MB fit.
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=6_000_000, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=1_200_000, feature_names=["fb"]),
    ]
    mappings = {"a": _dense_mapping("a", 6_000_000, 600_000), "b": _dense_mapping("b", 1_200_000, 200_000)}
    return tables, mappings, _fused(tables, ["table_wise", "row_wise"])


def test_mapping_memory_changes_placement():
    tables, mappings, constraints = _placement_case()
    model, sharders, topology = _model(tables, mappings), [LearnedHashEBCSharder()], _topology(2, hbm=64 * MB)
    nbytes = mapping_bytes(mappings)
    assert nbytes == 28_800_000 + sum(runtime_bytes(m) for m in mappings.values())  # + per-table parameters

    # Without the mappings in the reservation, the planner keeps both tables whole ...
    blind = EmbeddingShardingPlanner(topology, batch_size=8, storage_reservation=_base(), constraints=constraints,
                                     stats=[NoopEmbeddingStats()], debug=False)
    blind.plan(model, sharders)
    blind_types = {o.name: o.sharding_type for o in blind.get_selected_options()}
    assert blind_types == {"a": "table_wise", "b": "table_wise"}
    per_rank = [0, 0]
    for option in blind.get_selected_options():
        for shard in option.shards:
            per_rank[shard.rank] += shard.storage.hbm
    # ... and the rank that holds 'a' would run out of memory once the replicated mappings land on it.
    assert max(per_rank) + nbytes > 64 * MB

    planner = LearnedHashPlanner(topology, 8, base_reservation=_base(), constraints=constraints,
                                 stats=[NoopEmbeddingStats()], debug=False)
    planner.plan(model, sharders)
    assert {o.name: o.sharding_type for o in planner.get_selected_options()}["a"] == "row_wise"
    ranks = planner.rank_memory()
    assert all(r.mappings == nbytes and r.total <= r.capacity == 64 * MB for r in ranks), ranks


def test_a_tight_capacity_fails_naming_ranks_and_shortfall():
    tables, mappings, constraints = _placement_case()
    model, sharders = _model(tables, mappings), [LearnedHashEBCSharder()]
    capacity = 48 * MB
    planner = LearnedHashPlanner(_topology(2, hbm=capacity), 8, base_reservation=_base(), constraints=constraints,
                                 stats=[NoopEmbeddingStats()], debug=False)
    with pytest.raises(InsufficientMemoryError) as info:
        planner.plan(model, sharders)
    error = info.value
    message = str(error)
    assert "does not fit in 48.0 MB of HBM per rank on 2 ranks" in message
    assert error.required_capacity > capacity and error.short_ranks
    assert f"short by {format_bytes(error.required_capacity - capacity)} per rank" in message
    for rank in error.short_ranks:
        assert rank.total - rank.capacity == rank.shortfall > 0
        assert f"rank {rank.rank} needs {format_bytes(rank.total)} (short by {format_bytes(rank.shortfall)})" in message
    assert error.ranks[0].mappings == mapping_bytes(mappings)
    # The capacity the error names is one the planner really finds a plan for.
    roomy = LearnedHashPlanner(_topology(2, hbm=error.required_capacity), 8, base_reservation=_base(),
                               constraints=constraints, stats=[NoopEmbeddingStats()], debug=False)
    roomy.plan(model, sharders)
    assert all(r.total <= error.required_capacity for r in roomy.rank_memory())


def test_mappings_alone_over_capacity_fail_with_the_reservation_numbers():
    tables, mappings, constraints = _placement_case()
    reservation = MappingStorageReservation(_base())
    with pytest.raises(InsufficientMemoryError) as info:
        reservation.reserve(_topology(2, hbm=16 * MB), 8, _model(tables, mappings), [LearnedHashEBCSharder()])
    assert "the replicated mappings (27.5 MB per rank)" in str(info.value)
    assert [r.rank for r in info.value.short_ranks] == [0, 1]
    assert all(r.shortfall == r.mappings + r.reserved - 16 * MB for r in info.value.ranks)


def test_synthetic_mappings_cost_what_the_assumption_says():
    tables = _tables([1_000_000, 50_000, 9_999])
    mappings = synthetic_mappings(tables, 10, optimizer="sgd", entry_fraction=0.1)
    assert set(mappings) == {"t0", "t1"}  # tables under 10000 ids stay full size
    big = mappings["t0"]
    # int32 keys; ~99,000 rows: 3-byte rows, ~7.8 bytes per entry against sorted keys' 8
    assert big.storage == "perfect_hash" and big.nbytes == perfect_hash.table_bytes(100_000, 4, big.num_rows)
    assert big.nbytes < 8 * 100_000
    assert big.num_rows == (1_000_000 * 64 // 10 - big.nbytes) // 64
    ratio = 1_000_000 * 64 / (big.num_rows * 64 + big.nbytes)
    assert 10 <= ratio < 10.001
    adam = synthetic_mappings(tables[:1], 10, optimizer="adam")["t0"]
    assert adam.num_rows == (1_000_000 * row_bytes(16, "adam") // 10 - big.nbytes) // row_bytes(16, "adam")
    dense = synthetic_mappings(tables[:1], 10, entry_fraction=0.9)["t0"]
    assert dense.storage == "dense" and dense.nbytes == 4 * 1_000_000
    with pytest.raises(ValueError, match="table 't0'.*mapping alone needs"):
        synthetic_mappings(tables[:1], 100, entry_fraction=0.5)


def test_plan_report_before_and_after():
    tables = _tables([2_000_000, 400_000, 60_000, 3_000], dim=32)
    report = plan_report(tables, world_size=4, compression=8, hbm_gb=0.5, optimizer="rowwise_adagrad",
                         batch_size=128, reserve_fraction=0.0, cosharding=False)
    before, after = report.before, report.after
    assert before.fits and after.fits
    assert sum(r.tables for r in before.ranks) == sum(t.num_embeddings * 128 for t in tables)
    compressed = {t.name: t.num_embeddings for t in after.tables}
    assert compressed["t3"] == 3_000 and compressed["t0"] < 2_000_000 // 8
    assert sum(r.tables for r in after.ranks) == sum(n * 128 for n in compressed.values()) == after.table_bytes
    one_copy = mapping_bytes(synthetic_mappings(tables, 8, optimizer="rowwise_adagrad"))
    assert all(r.mappings == one_copy > 0 and r.cosharded_mappings == 0 for r in after.ranks)
    assert {c.reason for c in report.choices.values()} == {"co-sharding off"}
    assert sum(r.total for r in after.ranks) < sum(r.total for r in before.ranks)
    # Cluster-wide: every rank's copy of the replicated mappings counts.
    per_row = row_bytes(32, "rowwise_adagrad")
    assert before.cluster_bytes == sum(t.num_embeddings * per_row for t in tables)
    assert after.cluster_bytes == sum(n * per_row for n in compressed.values()) + 4 * one_copy
    assert report.compression == before.cluster_bytes / after.cluster_bytes
    single_copy_ratio = before.cluster_bytes / (after.cluster_bytes - 3 * one_copy)
    # One copy of the mappings costs ~1.5% of the compressed tables (with what the fused remap adds).
    assert 7.85 < single_copy_ratio <= 8.0 and report.compression < single_copy_ratio
    text = report.format()
    assert all(f"rank {r}" in text for r in range(4)) and "median" not in text
    summary = report.format(max_rank_rows=2)
    assert "median" in summary and "most loaded:" in summary

    given = {name: m for name, m in synthetic_mappings(tables, 8).items() if name == "t0"}
    real = plan_report(tables, world_size=2, mappings=given, hbm_gb=1, batch_size=128)
    assert real.after.ranks[0].mappings == given["t0"].nbytes + runtime_bytes(given["t0"]) and "given, 1 tables" in real.mapping_source
    assert real.choices["t0"].cosharded is None and real.choices["t0"].reason.startswith("not bucketed")


def test_plan_report_when_only_the_compressed_model_fits():
    tables = _tables([6_000_000, 1_000_000], dim=32)  # 0.89 GB of weights
    report = plan_report(tables, world_size=2, compression=10, hbm_gb=0.25, batch_size=64, reserve_fraction=0.0)
    assert not report.before.fits and report.fits
    assert isinstance(report.before.error, InsufficientMemoryError)
    assert report.before.error.required_capacity > 0.25 * GB
    text = report.format()
    assert "before (full tables): DOES NOT FIT" in text and "after (learned hash): fits" in text
    assert math.isclose(report.before.table_bytes, 7_000_000 * 128)
