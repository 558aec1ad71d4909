"""Sharding benchmark: co-sharded vs replicated mappings on 1, 2 and 4 gloo ranks, side by side.

    python benchmarks/sharding.py                      # W = 1, 2, 4 (a few minutes on 2 cores)
    python benchmarks/sharding.py --quick --world-sizes 1 2 --no-write

Tables (Zipf ids, one with sparse 64-bit ids, 1e5..1e6 ids, 1e4..1e5 rows after 10x compression)
get ``frequency`` mappings bucketed in B = 4 buckets (no learned embeddings: the fit is short).
For each W one spawn of W gloo processes builds, from the same mappings:

(a) co-sharded: :class:`~lhf_torchrec.modules.cosharded.CoShardedLearnedHashEBC` sharded by
    ``CoShardedEBCSharder`` (each rank holds the mapping of its buckets' rows);
(b) replicated: :class:`~lhf_torchrec.modules.LearnedHashEmbeddingBagCollection` sharded by
    ``LearnedHashEBCSharder``, every table row-wise (each rank holds every mapping);

both with the plan of :func:`~lhf_torchrec.distributed.planner.estimate_rank_memory` (``cosharding``
True / False). Per rank it measures the mapping bytes the sharded module holds (the local tensors of
the co-sharded remaps, the replicated ``IdMapping`` buffers) against the planner's estimate for the
rank, and times a training step (forward, backward of ``sum(pooled)``, SGD fused into the backward),
(a) and (b) interleaved on the same batches, median over reps after warm-up. A rep's time is rank
0's time from a barrier before the step to a barrier after it: the slowest rank's step.

The tables go to stdout, the numbers to ``--json`` if given and, unless ``--no-write``, to the section
``## Sharding (benchmarks/sharding.py)`` of docs/performance.md.
"""

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from lhf_torchrec.files import atomic_write

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

SECTION = "Sharding (benchmarks/sharding.py)"
NUM_BUCKETS = 4
COMPRESSION = 10
TOLERANCE = 0.05
SPARSE_TABLE = "t_sparse64"


@dataclass(frozen=True)
class Config:
    """The workload: table sizes (raw ids; rows = ids / 10), dim, per-rank batch, fit history, reps."""

    table_ids: Dict[str, int]
    dim: int
    batch: int
    history: int
    warmup: int
    reps: int
    zipf: float = 1.1
    seed: int = 0


FULL = Config(table_ids={"t_zipf_1m": 1_000_000, "t_zipf_300k": 300_000, SPARSE_TABLE: 200_000,
                         "t_zipf_100k": 100_000}, dim=16, batch=2048, history=1_000_000, warmup=5, reps=30)
QUICK = Config(table_ids={"t_zipf_40k": 40_000, SPARSE_TABLE: 16_000}, dim=8, batch=256, history=50_000,
               warmup=1, reps=3)


# ---------------------------------------------------------------------------------------------- data
def table_configs(config: Config):
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=name, num_embeddings=ids, embedding_dim=config.dim, feature_names=[f"f_{name}"])
            for name, ids in config.table_ids.items()]


def _sparse_ids(num_ids: int, seed: int) -> np.ndarray:
    """The id space of the sparse table: ``num_ids`` distinct ids spread over the whole int64 range."""
    rng = np.random.default_rng(seed + 1)
    return np.unique(rng.integers(-(1 << 63), (1 << 63) - 1, num_ids + num_ids // 100, dtype=np.int64))[:num_ids]


def draw_ids(config: Config, table: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf(``config.zipf``) ids over a random permutation of the table's id space."""
    n = config.table_ids[table]
    u = rng.random(size)
    top = (n + 1.0) ** (1.0 - config.zipf)
    ranks = np.clip(np.floor((1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - config.zipf))).astype(np.int64) - 1, 0, n - 1)
    space = _sparse_ids(n, config.seed) if table == SPARSE_TABLE else np.arange(n, dtype=np.int64)
    return space[np.random.default_rng([config.seed, zlib.crc32(table.encode())]).permutation(n)][ranks]


def fit_all(config: Config):
    from lhf_torchrec import fit_mapping

    rng = np.random.default_rng(config.seed)
    return {
        name: fit_mapping(draw_ids(config, name, config.history, rng), method="frequency",
                          num_rows=ids // COMPRESSION, num_buckets=NUM_BUCKETS, seed=config.seed, table=name)
        for name, ids in tqdm(config.table_ids.items(), desc="fit", leave=False)
    }


def rank_batches(config: Config, rank: int, count: int):
    """``count`` local batches of ``config.batch`` samples, one id per table and sample."""
    from torchrec import KeyedJaggedTensor

    rng = np.random.default_rng(1000 + rank)
    keys = [f"f_{name}" for name in config.table_ids]
    lengths = torch.ones(len(keys) * config.batch, dtype=torch.int64)
    return [KeyedJaggedTensor.from_lengths_sync(
        keys=keys, lengths=lengths,
        values=torch.from_numpy(np.concatenate([draw_ids(config, n, config.batch, rng) for n in config.table_ids])))
        for _ in range(count)]


# ---------------------------------------------------------------------------------------------- one rank
def _local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tensor, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
    return tensor.numel() * tensor.element_size()


def _buffer_bytes(module: torch.nn.Module, names: Optional[Sequence[str]] = None) -> int:
    """Bytes of the distinct tensors among a module's buffers (local shards of sharded ones), or of
    the buffers called ``names`` only."""
    seen: Dict[int, int] = {}
    for name, buffer in module.named_buffers():
        if names is None or name.rsplit(".", 1)[-1] in names:
            seen[id(buffer)] = _local_bytes(buffer)
    return sum(seen.values())


# The co-sharded layout (what the planner counts, 12 K + 4 bytes per row). A CoShardedIdRemap also
# holds TorchRec's ManagedCollisionModule buffers (`_output_segments_tensor`: 1025 int64,
# `_current_iter_tensor`) and its hash coefficients: a constant per table and rank, measured apart.
LAYOUT_BUFFERS = ("_keys", "_slots", "_hash_regions")


def _row_wise_only(tables):
    from torchrec.distributed.planner import ParameterConstraints

    return {t.name: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]) for t in tables}


def _sharders():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from lhf_torchrec.distributed import CoShardedEBCSharder, LearnedHashEBCSharder

    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01}
    return CoShardedEBCSharder(fused_params=fused), LearnedHashEBCSharder(fused_params=fused)


def _split_plan(plan, cosharded_tables: Sequence[str]):
    """The plan of a ``LearnedHashEmbeddingBagCollection`` (key ``""``) as the plan of the
    ``CoShardedLearnedHashEBC`` of the same tables: its ``cosharded`` and ``replicated`` children."""
    from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingPlan

    whole = plan.plan[""]
    parts = {"cosharded": {t: ps for t, ps in whole.items() if t in cosharded_tables},
             "replicated": {t: ps for t, ps in whole.items() if t not in cosharded_tables}}
    return ShardingPlan({k: EmbeddingModuleShardingPlan(v) for k, v in parts.items() if v})


def _worker(rank: int, world_size: int, port: int, mapping_file: str, config: Config, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    import datetime

    from torchrec.distributed.model_parallel import DistributedModelParallel

    from lhf_torchrec.distributed.planner import estimate_rank_memory
    from lhf_torchrec.mapping import load_mappings
    from lhf_torchrec.modules import CoShardedLearnedHashEBC, LearnedHashEmbeddingBagCollection

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        tables = table_configs(config)
        mappings = load_mappings(mapping_file)
        planning_model = LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("meta"))
        estimates = {
            "cosharded": estimate_rank_memory(planning_model, world_size, cosharding=True, batch_size=config.batch),
            "replicated": estimate_rank_memory(planning_model, world_size, cosharding=False, batch_size=config.batch,
                                               constraints=_row_wise_only(tables)),
        }
        for kind, memory in estimates.items():
            if not memory.fits:
                raise RuntimeError(f"{kind}: the planner found no plan: {memory.error}")
            other = {t: k for t, k in memory.sharding_types.items() if k != "row_wise"}
            if other:  # both models are to be row-wise, so that only where the mapping lives differs
                raise RuntimeError(f"{kind}: the planner did not shard every table row-wise: {other}")
        cosharder, replicated_sharder = _sharders()
        torch.manual_seed(0)
        cosharded_module = CoShardedLearnedHashEBC(tables, mappings, device=torch.device("meta"))
        models = {
            "cosharded": DistributedModelParallel(
                cosharded_module, device=torch.device("cpu"), sharders=[cosharder, replicated_sharder],
                plan=_split_plan(estimates["cosharded"].plan, cosharded_module.cosharded_tables)),
            "replicated": DistributedModelParallel(
                LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("meta")),
                device=torch.device("cpu"), sharders=[replicated_sharder], plan=estimates["replicated"].plan),
        }
        del mappings, planning_model, cosharded_module

        sparse = models["cosharded"].module
        cosharded_remaps = sparse.cosharded._managed_collision_collection._managed_collision_modules
        record = {
            "rank": rank,
            "world_size": world_size,
            "cosharded_tables": sorted(cosharded_remaps),
            "sharding_types": {kind: dict(memory.sharding_types) for kind, memory in estimates.items()},
            "allocated": {
                "cosharded": {
                    "cosharded": sum(_buffer_bytes(remap, LAYOUT_BUFFERS) for remap in cosharded_remaps.values()),
                    "engine": sum(_buffer_bytes(remap) - _buffer_bytes(remap, LAYOUT_BUFFERS)
                                  for remap in cosharded_remaps.values()),
                    # tables that did not co-shard: only their IdMapping buffers
                    "replicated": _buffer_bytes(sparse.replicated.remapper) if sparse.replicated is not None else 0,
                },
                "replicated": {"cosharded": 0, "engine": 0, "replicated": _buffer_bytes(models["replicated"].module.remapper)},
            },
            "estimate": {kind: {"cosharded": memory.ranks[rank].cosharded_mappings,
                                "replicated": memory.ranks[rank].mappings} for kind, memory in estimates.items()},
            "rows": {name: int(remap._keys.shape[0]) for name, remap in cosharded_remaps.items()},
        }
        record["step_seconds"] = _time_steps(models, rank_batches(config, rank, 4), config)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def _time_steps(models: Dict, batches: List, config: Config) -> Dict[str, List[float]]:
    """Seconds per training step of each model, interleaved in a rotating order, barrier to barrier."""
    names = list(models)

    def step(name: str, kjt) -> None:
        pooled = models[name](kjt)
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
        pooled.values().sum().backward()  # the fused SGD update runs inside the backward

    for i in range(config.warmup):
        for name in names:
            step(name, batches[i % len(batches)])
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(config.reps):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            dist.barrier()
            start = time.perf_counter()
            step(name, batches[rep % len(batches)])
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world_size: int, mapping_file: str, config: Config) -> List[Dict]:
    """Spawns ``world_size`` gloo ranks; returns each rank's record."""
    with tempfile.TemporaryDirectory(prefix="lhf-sharding-") as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), mapping_file, config, out_dir), nprocs=world_size, join=True)
        records = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                records.append(json.load(f))
    return records


def summarize(results: Dict[int, List[Dict]]) -> Dict:
    """Per (W, rank, model) rows: allocated and estimated mapping bytes, ratios; per W: step times."""
    w0 = min(results)
    base = {kind: results[w0][0]["allocated"][kind] for kind in ("cosharded", "replicated")}
    memory_rows, timing_rows = [], []
    for world_size, records in sorted(results.items()):
        for record in records:
            for kind in ("cosharded", "replicated"):
                allocated = record["allocated"][kind]
                estimate = record["estimate"][kind]
                counted = allocated["cosharded"] + allocated["replicated"]
                total_est = estimate["cosharded"] + estimate["replicated"]
                layout_base = base[kind]["cosharded"]
                memory_rows.append({
                    "W": world_size, "rank": record["rank"], "mappings": kind,
                    "co-sharded layout B": allocated["cosharded"], "MC engine B": allocated["engine"],
                    "replicated B": allocated["replicated"], "estimate B": total_est,
                    "estimate / layout + replicated": total_est / counted,
                    "estimate / all tensors": total_est / (counted + allocated["engine"]),
                    "layout(W) / layout(1)": allocated["cosharded"] / layout_base if layout_base else "-",
                    "all(W) / all(1)": (counted + allocated["engine"]) / sum(base[kind].values()),
                    "1/W": w0 / world_size if kind == "cosharded" else "-",
                })
        times = records[0]["step_seconds"]
        paired = [a / b for a, b in zip(times["cosharded"], times["replicated"])]
        timing_rows.append({
            "W": world_size,
            "co-sharded step ms": 1e3 * statistics.median(times["cosharded"]),
            "replicated step ms": 1e3 * statistics.median(times["replicated"]),
            "co-sharded / replicated": statistics.median(paired),
            "reps": len(paired),
        })
    return {"memory": memory_rows, "timing": timing_rows}


def checks(summary: Dict) -> List[str]:
    """The claims of the issue, each with its verdict on these numbers."""
    co = [r for r in summary["memory"] if r["mappings"] == "cosharded"]

    def verdict(claim: str, deviations: List[float]) -> str:
        worst = max(deviations)
        return f"{claim} within {TOLERANCE:.0%}: {'yes' if worst <= TOLERANCE else 'NO'} (worst deviation {worst:.2%})"

    return [
        verdict("co-sharded layout bytes per rank fall as 1/W", [abs(r["layout(W) / layout(1)"] / r["1/W"] - 1) for r in co]),
        verdict("all co-sharded tensors per rank (layout + MC engine buffers) fall as 1/W",
                [abs(r["all(W) / all(1)"] / r["1/W"] - 1) for r in co]),
        verdict("planner estimate vs allocated layout + replicated mapping bytes, every rank and model",
                [abs(r["estimate / layout + replicated"] - 1) for r in summary["memory"]]),
        verdict("planner estimate vs all mapping tensors allocated (MC engine buffers included), every rank and model",
                [abs(r["estimate / all tensors"] - 1) for r in summary["memory"]]),
    ]


MEMORY_COLUMNS = ("W", "rank", "mappings", "co-sharded layout B", "MC engine B", "replicated B", "estimate B",
                  "estimate / layout + replicated", "estimate / all tensors", "layout(W) / layout(1)",
                  "all(W) / all(1)", "1/W")
TIMING_COLUMNS = ("W", "co-sharded step ms", "replicated step ms", "co-sharded / replicated", "reps")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--quick", action="store_true", help="tiny tables and few reps (the smoke test)")
    p.add_argument("--json", help="also write the per-rank records and the summary here")
    p.add_argument("--doc", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                 "performance.md"))
    p.add_argument("--no-write", action="store_true", help="print only, leave the doc alone")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    for w in args.world_sizes:
        if w < 1 or NUM_BUCKETS % w:
            raise SystemExit(f"--world-sizes: {w} ranks cannot co-shard {NUM_BUCKETS} buckets (use divisors of "
                             f"{NUM_BUCKETS})")
    config = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # as each rank: the machine description then says what the ranks ran with
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    started = time.perf_counter()
    from lhf_torchrec.mapping import save_mappings

    mappings = fit_all(config)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lhf-sharding-") as tmp:
        mapping_file = os.path.join(tmp, "mappings.safetensors")
        save_mappings(mapping_file, mappings)
        for world_size in tqdm(sorted(args.world_sizes), desc="world sizes", unit="W"):
            results[world_size] = run_world(world_size, mapping_file, config)
    summary = summarize(results)
    verdicts = checks(summary)
    elapsed = time.perf_counter() - started
    memory_table = markdown_table(summary["memory"], MEMORY_COLUMNS)
    first = {r["mappings"]: r for r in summary["memory"] if r["W"] == min(results) and r["rank"] == 0}
    layout_1, replicated_1 = first["cosharded"]["co-sharded layout B"], first["replicated"]["replicated B"]
    rows = sum(m.num_rows for m in mappings.values())
    entries = sum(m.num_entries for m in mappings.values())
    crossover = (f"On {min(results)} rank(s) the co-sharded layout takes {layout_1 / replicated_1:.2f}x the replicated "
                 f"mapping: it pays {layout_1 / rows:.0f} B for each of the {rows:,} rows (the rows of the buckets' "
                 f"hash regions included), the replicated mapping {replicated_1 / entries:.0f} B for each of its "
                 f"{entries:,} entries; per rank it is the smaller from W > {min(results) * layout_1 / replicated_1:.1f} "
                 "ranks on, and keeps falling as 1/W where the replicated copy stays whole.")
    timing_table = markdown_table(summary["timing"], TIMING_COLUMNS)
    command = " ".join(["python benchmarks/sharding.py", *(sys.argv[1:] if argv is None else argv)])
    shapes = ", ".join(f"`{name}` {ids:,} ids -> {mappings[name].num_rows:,} rows "
                       f"({mappings[name].num_entries:,} entries, fullest bucket "
                       f"{int(mappings[name].bucket_entry_counts().max()):,})" for name, ids in config.table_ids.items())
    body = f"""Command: `{command}` ({elapsed:.0f} s in all). Machine: {machine_description()}. The machine is shared with
other jobs, and W gloo ranks run as W processes on its cores (1 torch thread each): the step times
are those of a loaded CPU box, not of W machines.

Workload: {len(config.table_ids)} tables, dim {config.dim}: {shapes}. Zipf({config.zipf}) ids over a random permutation of
each id space; `{SPARSE_TABLE}`'s ids are spread over the whole int64 range. `frequency` mappings
fitted on {config.history:,} accesses per table, {COMPRESSION}x compression, B = {NUM_BUCKETS} buckets. Each W: (a) co-sharded,
`CoShardedLearnedHashEBC` + `CoShardedEBCSharder`; (b) replicated, `LearnedHashEmbeddingBagCollection` +
`LearnedHashEBCSharder`, every table row-wise; each sharded with the plan of
`estimate_rank_memory(..., cosharding=True / False)`.

### Mapping bytes per rank: allocated vs the planner's estimate

Allocated: the tensors the sharded modules hold on the rank. Co-sharded layout: the local `_keys`,
`_slots`, `_hash_regions` of the rank's buckets (12 K + 4 bytes per row, what the planner counts);
MC engine: the other buffers of each `CoShardedIdRemap` (TorchRec's `ManagedCollisionModule`
`_output_segments_tensor` of 1025 int64 and `_current_iter_tensor`, and the hash's 4 coefficients:
8,240 B per co-sharded table on every rank, whatever its size); replicated: the `IdMapping` buffers.
Estimate: `RankMemory.cosharded_mappings + RankMemory.mappings` of the rank. `layout(W) / layout(1)`
and `all(W) / all(1)`: the rank's bytes over rank 0's at W = {min(results)}, against `1/W` ({min(results)} / W).
The planner counts the layout, not the MC engine buffers: they are a constant per co-sharded table
and rank, so their share of a rank's co-sharded bytes grows with W (and with the number of small
tables), and so does the gap in `estimate / all tensors`.

{memory_table}

{crossover}

### Training step (forward, backward of `sum(pooled)`, SGD fused into the backward), batch {config.batch} per rank

{timing_table}

Median over {config.reps} interleaved reps after {config.warmup} warm-ups; a rep is rank 0's time from a barrier before
the step to one after it (the slowest rank's step); the ratio is the median of per-rep ratios.

### Checks

""" + "\n".join(f"- {v}" for v in verdicts) + """
- CUDA timings were not taken: this session had no GPU. The issue asks for a CUDA timing of the local
  remap where a GPU is available; it is still to be done.
"""
    print(memory_table, timing_table, *verdicts, sep="\n\n")
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps({"config": asdict(config), "results": {str(k): v for k, v in results.items()},
                                **summary, "checks": verdicts}, indent=1).encode())
    if not args.no_write:
        write_doc_section(os.path.abspath(args.doc), SECTION, body)
        print(f"wrote the section to {os.path.abspath(args.doc)}")
    return summary


if __name__ == "__main__":
    main()
