"""Co-sharded mappings in the planner: the choice rules, their bytes inside shard storage, cluster totals,
synthetic bucketed mappings and ``lhf plan --json``."""

import json
import logging
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lhf_torchrec import fit_mapping
from lhf_torchrec.distributed.planner import (
    CoshardedTable,
    InsufficientMemoryError,
    LearnedHashPlanner,
    cosharding_choices,
    estimate_rank_memory,
    plan_report,
    synthetic_mappings,
)
from lhf_torchrec.distributed.planner.cosharding import cosharded_constraints
from lhf_torchrec.distributed.planner.synthetic import fullest_bucket_entries
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping import IdMapping, row_bytes
from lhf_torchrec.mapping.budget import OPTIMIZERS
from lhf_torchrec.mapping.buckets import cosharded_bytes
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.mapping.id_mapping import bucketed_storage_cost
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection

logging.getLogger("torchrec").setLevel(logging.ERROR)
MB = 1024**2


def _topology(world_size, hbm=1024 * MB):
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=world_size),
        HardwareConfig(hbm_cap_bytes=int(hbm), ddr_cap_bytes=128 * 1024 * MB),
        KernelConfig(compute_device="cuda"),
    )


def _base():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return HeuristicalStorageReservation(percentage=0.0)


def _case(names=("a", "b", "c")):
    """Three tables: two with mappings bucketed in 8 buckets, one unbucketed."""
    rng = np.random.default_rng(0)
    tables = [
        EmbeddingBagConfig(name=name, embedding_dim=16, num_embeddings=ids, feature_names=[f"f_{name}"])
        for name, ids in (("a", 500_000), ("b", 200_000), ("c", 100_000))
    ]
    mappings = {
        "a": fit_mapping(rng.zipf(1.2, 40_000) % 500_000, method="frequency", num_rows=4_096, num_buckets=8, table="a"),
        "b": fit_mapping(rng.zipf(1.2, 40_000) % 200_000, method="frequency", num_rows=1_024, num_buckets=8, table="b"),
        "c": fit_mapping(rng.zipf(1.2, 40_000) % 100_000, method="frequency", num_rows=1_000, table="c"),
    }
    tables = [t for t in tables if t.name in names]
    mappings = {n: m for n, m in mappings.items() if n in names}
    model = LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("meta"))
    apply_optimizer_in_backward(OPTIMIZERS["sgd"].cls, model.ebc.parameters(), {"lr": 0.01})
    return tables, mappings, model


def _plan(model, world_size, cosharded, hbm=1024 * MB, constraints=None, mapping_bytes=None):
    planner = LearnedHashPlanner(_topology(world_size, hbm), 64, base_reservation=_base(), cosharded=cosharded,
                                 constraints=constraints, mapping_bytes=mapping_bytes, stats=[NoopEmbeddingStats()],
                                 debug=False)
    planner.plan(model, [LearnedHashEBCSharder()])
    return planner


def test_the_estimator_puts_cosharded_bytes_into_shard_storage():
    _, mappings, model = _case()
    choices = cosharding_choices(mappings, world_size=4)
    cosharded = {n: c.cosharded for n, c in choices.items() if c.cosharded}
    assert sorted(cosharded) == ["a", "b"]
    for name in ("a", "b"):
        layout = cosharded[name]
        assert layout == CoshardedTable(name, mappings[name].num_rows, 8, int(mappings[name].bucket_entry_counts().max()))
        assert layout.nbytes == cosharded_bytes(layout.num_rows, 8, layout.max_bucket_entries) > 0

    planner = _plan(model, 4, cosharded)
    options = {o.name: o for o in planner.get_selected_options()}
    assert options["a"].sharding_type == options["b"].sharding_type == "row_wise"
    ranks = planner.rank_memory()
    # The ranks' co-sharded bytes add up to the tables' whole co-sharded mappings; each rank holds
    # its rows' share; only the unbucketed mapping is replicated.
    assert sum(r.cosharded_mappings for r in ranks) == cosharded["a"].nbytes + cosharded["b"].nbytes
    for r in ranks:
        assert r.cosharded_mappings == (cosharded["a"].nbytes + cosharded["b"].nbytes) // 4
        assert r.mappings == mappings["c"].nbytes + runtime_bytes(mappings["c"])
    # Same plan without co-sharding (row-wise forced by constraints): shard storage differs by exactly
    # the co-sharded bytes, and every other term is unchanged.
    row_wise = {n: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]) for n in ("a", "b")}
    plain = _plan(model, 4, {}, constraints=row_wise)
    plain_options = {o.name: o for o in plain.get_selected_options()}
    for name in ("a", "b"):
        for with_map, without in zip(options[name].shards, plain_options[name].shards):
            assert with_map.storage.hbm - without.storage.hbm == with_map.size[0] * cosharded[name].bytes_per_row
    for r, p in zip(ranks, plain.rank_memory()):
        assert (r.tables, r.optimizer, r.io) == (p.tables, p.optimizer, p.io)
        assert p.cosharded_mappings == 0 and p.mappings == sum(m.nbytes + runtime_bytes(m) for m in mappings.values())


def test_cosharded_bytes_count_against_capacity():
    _, mappings, model = _case(("a", "b"))
    cosharded = {n: c.cosharded for n, c in cosharding_choices(mappings, 2).items() if c.cosharded}
    per_rank = sum(t.nbytes for t in cosharded.values()) // 2
    row_wise = {n: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]) for n in cosharded}
    # Both tables are split evenly over the two ranks either way: a capacity that holds the tables
    # but not their co-sharded mappings fits without any mapping bytes and fails with them.
    blind = _plan(model, 2, {}, constraints=row_wise, mapping_bytes=0)
    tight = max(r.total for r in blind.rank_memory()) + per_rank // 2
    _plan(model, 2, {}, hbm=tight, constraints=row_wise, mapping_bytes=0)
    with pytest.raises(InsufficientMemoryError) as info:
        _plan(model, 2, cosharded, hbm=tight)
    assert info.value.ranks and all(r.cosharded_mappings == per_rank for r in info.value.ranks)


def _bucketed(num_rows, num_buckets, probes=1):
    regions = torch.tensor([[0, num_rows // num_buckets]] * num_buckets, dtype=torch.int32)
    return IdMapping(num_rows, probes=probes, num_buckets=num_buckets, tensors={"bucket_hash_regions": regions})


def test_choice_rules_name_the_reason():
    mappings = {
        "ok": _bucketed(64, 8),
        "double": _bucketed(64, 8, probes=2),
        "thin": _bucketed(8, 8),
        "flat": IdMapping(64),
        "fixed": _bucketed(64, 8),
    }
    constraints = {"fixed": ParameterConstraints(sharding_types=["table_wise"])}
    choices = cosharding_choices(mappings, 4, constraints)
    assert choices["ok"].cosharded == CoshardedTable("ok", 64, 8, 0) and choices["ok"].reason == "8 buckets, 2 per rank"
    assert {n: c.reason for n, c in choices.items() if c.cosharded is None} == {
        "double": "2 probes per id: method 'hash' gives a hashed id two rows, and TorchRec's managed-collision "
                  "remap maps one id to one row (it cannot grow bags)",
        "thin": "8 rows < 2 x 8 buckets",
        "flat": "not bucketed: fit it with num_buckets",
        "fixed": "constraints exclude row_wise (allowed: table_wise)",
    }
    assert cosharding_choices({"ok": mappings["ok"]}, 3)["ok"].reason == "3 ranks do not divide 8 buckets"
    assert cosharding_choices({"ok": mappings["ok"]}, 8)["ok"].reason == "8 buckets, 1 per rank"
    assert cosharding_choices({"flat": IdMapping(10)}, 4, num_buckets=8)["flat"].reason == (
        "not bucketed: 10 rows < 2 x 8 buckets")
    kernels = {"ok": ParameterConstraints(compute_kernels=["dense"])}
    assert cosharding_choices(mappings, 4, kernels)["ok"].reason == "constraints exclude the fused kernel (allowed: dense)"
    with pytest.raises(ValueError, match="table 'ok': its mapping is co-sharded.*only \\['table_wise'\\]"):
        cosharded_constraints({"ok": ParameterConstraints(sharding_types=["table_wise"])}, {"ok": choices["ok"].cosharded})


def test_synthetic_bucketed_mappings_follow_the_fit_budget_and_the_fullest_bucket_assumption():
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=ids, feature_names=[n])
              for n, ids in (("big", 1_000_000), ("small", 20_000))]
    mappings = synthetic_mappings(tables, 10, optimizer="sgd", num_buckets=64)
    big, small = mappings["big"], mappings["small"]
    entries, per_row = 100_000, row_bytes(16, "sgd")
    assert big.num_buckets == 64 and big.num_rows % 64 == 0 and big.num_entries == entries
    # Entries in the storage a bucketed fit chooses (int64 bucket-hash keys, 3-byte rows for more than
    # 2^15 rows: a perfect hash table, cheaper than sorted keys), (offset, rows) per bucket.
    assert big.num_rows > 1 << 15 and big.slot_rows_high.dtype == torch.int8
    assert big.nbytes == bucketed_storage_cost(entries, big.num_rows)[1] + 8 * 64 and big.storage == "perfect_hash"
    assert big.nbytes < 12 * entries + 8 * 64
    assert big.num_rows * per_row + big.nbytes <= 1_000_000 * per_row / 10 < (big.num_rows + 64) * per_row + big.nbytes
    counts = big.bucket_entry_counts()
    assert int(counts.sum()) == entries and int(counts.max()) == fullest_bucket_entries(entries, 64)
    mean = entries / 64
    assert math.isclose(fullest_bucket_entries(entries, 64), math.ceil(mean + 4 * math.sqrt(mean * 63 / 64)))
    # 20000 ids at 10x leave ~1500 rows: 64 buckets fit, but fewer than 2 rows per bucket at 1024
    # buckets: unbucketed then, as lhf fit does.
    assert small.num_buckets == 64 and small.num_rows % 64 == 0
    assert synthetic_mappings(tables[1:], 10, num_buckets=1024)["small"].num_buckets is None


def test_plan_report_counts_every_replica_and_says_why_a_table_is_replicated():
    tables = [EmbeddingBagConfig(name=n, embedding_dim=32, num_embeddings=ids, feature_names=[n])
              for n, ids in (("t0", 2_000_000), ("t1", 400_000), ("t2", 20_000), ("t3", 3_000))]
    report = plan_report(tables, world_size=4, compression=8, num_buckets=2048, hbm_gb=0.5, batch_size=128,
                         reserve_fraction=0.0)
    after = report.after
    assert [n for n, c in report.choices.items() if c.cosharded] == ["t0", "t1"]
    assert report.choices["t2"].reason.startswith("not bucketed: ") and "< 2 x 2048 buckets" in report.choices["t2"].reason
    assert "t3" not in report.choices  # full size, no mapping
    replicated = report.choices["t2"]
    mappings = synthetic_mappings(tables, 8, optimizer="rowwise_adagrad", num_buckets=2048)
    cosharded = sum(report.choices[n].cosharded.nbytes for n in ("t0", "t1"))
    assert sum(r.cosharded_mappings for r in after.ranks) == cosharded
    assert all(r.mappings == mappings["t2"].nbytes + runtime_bytes(mappings["t2"]) for r in after.ranks)
    weights = sum(r.tables + r.optimizer for r in after.ranks)
    assert after.cluster_bytes == weights + cosharded + 4 * (mappings["t2"].nbytes + runtime_bytes(mappings["t2"]))
    assert after.max_rank_mapping_bytes == max(r.mappings + r.cosharded_mappings for r in after.ranks)
    assert after.max_rank_mapping_bytes == cosharded // 4 + mappings["t2"].nbytes + runtime_bytes(mappings["t2"])
    assert report.compression == report.before.cluster_bytes / after.cluster_bytes
    text = report.format()
    assert f"replicated: t2 ({replicated.reason})" in text
    assert "co-sharded, row_wise (2048 buckets, 512 per rank): 2 tables (t0, t1)" in text
    assert "1/4 of the co-sharded mappings" in text

    off = plan_report(tables, world_size=3, compression=8, num_buckets=2048, hbm_gb=0.5, batch_size=128,
                      reserve_fraction=0.0)
    assert all(c.cosharded is None for c in off.choices.values())
    assert off.choices["t0"].reason == "3 ranks do not divide 2048 buckets"
    assert "replicated: t0 (3 ranks do not divide 2048 buckets)" in off.format()
    with pytest.raises(ValueError, match="num_buckets is for synthetic mappings"):
        plan_report(tables, world_size=2, mappings=mappings, num_buckets=4)


def test_estimate_rank_memory_for_a_model():
    _, mappings, model = _case()
    memory = estimate_rank_memory(model, 2)
    layouts = {n: CoshardedTable.of(n, mappings[n]) for n in ("a", "b")}
    assert [r.cosharded_mappings for r in memory.ranks] == [sum(t.nbytes for t in layouts.values()) // 2] * 2
    assert all(r.mappings == mappings["c"].nbytes + runtime_bytes(mappings["c"]) and r.reserved == 0 for r in memory.ranks)
    assert {memory.sharding_types[n] for n in ("a", "b")} == {"row_wise"} and memory.plan is not None
    replicated = estimate_rank_memory(model, 2, cosharding=False)
    assert all(r.cosharded_mappings == 0 and r.mappings == sum(m.nbytes + runtime_bytes(m) for m in mappings.values())
               for r in replicated.ranks)


def test_lhf_plan_json_is_one_object_with_cluster_totals(tmp_path):
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps({"t0": 2_000_000, "t1": 400_000, "t2": 20_000}))
    result = subprocess.run(
        [sys.executable, "-m", "lhf_torchrec.cli", "plan", "--tables", str(tables), "--world-size", "4",
         "--compression", "8", "--num-buckets", "2048", "--embedding-dim", "32", "--hbm-gb", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    for side in ("before", "after"):
        plan = report[side]
        for key in ("cluster_bytes", "max_rank_bytes", "max_rank_mapping_bytes"):
            assert isinstance(plan[key], int) and plan[key] >= 0, (side, key)
        ranks = plan["ranks"]
        assert len(ranks) == 4
        assert plan["cluster_bytes"] == sum(r["tables"] + r["optimizer"] + r["mappings"] + r["cosharded_mappings"]
                                            for r in ranks)
        assert plan["max_rank_bytes"] == max(r["tables"] + r["optimizer"] + r["io"] + r["mappings"]
                                             + r["cosharded_mappings"] + r["reserved"] for r in ranks)
    after = report["after"]
    assert report["before"]["max_rank_mapping_bytes"] == 0
    assert after["replicated_mapping_bytes"] == 4 * after["ranks"][0]["mappings"] > 0  # every replica counted
    assert after["cosharded_mapping_bytes"] == sum(t["cosharded_mapping_bytes"] or 0 for t in report["tables"].values())
    assert report["compression"] == pytest.approx(report["before"]["cluster_bytes"] / after["cluster_bytes"])
    assert report["tables"]["t0"]["mapping"] == "cosharded" and report["tables"]["t0"]["num_buckets"] == 2048
    assert report["tables"]["t2"]["mapping"] == "replicated" and "< 2 x 2048 buckets" in report["tables"]["t2"]["reason"]
    assert after["sharding_types"]["t0"] == "row_wise"
