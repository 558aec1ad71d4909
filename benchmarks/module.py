"""Module benchmark: what the learned-hash remap costs in training, in the remap alone, and in serving.

Workload (Criteo-like, CPU): 26 categorical features, one id per feature and sample, batch 4096,
embedding dim 16. Feature ``f`` has ``N_f = max(100, round(scale * C_f))`` ids, ``C_f`` being
Criteo Kaggle's cardinality (scale 0.1: 3.4M ids, 216 MB of fp32 full-size tables). Ids follow a
Zipf law (``P(rank r) ~ (r + 1)^-1.1``) over a random permutation of the id space, so popular ids
are spread over ``[0, N_f)`` as Criteo's hashed ids are. Mappings are fitted on a separate history
of ``--history`` draws per feature; every table is compressed 10x (``ceil(N_f / 10)`` rows).

1. Training step: forward, backward of ``sum(pooled)``, SGD update fused into the backward by
   FBGEMM's TBE (how TorchRec trains with its fused kernel). Interleaved, same batches:
   (a) learned-hash EBC with ``combination`` mappings (random stand-in learned embeddings: which ids
   share a cluster does not change the lookup cost) and with ``frequency`` mappings; (b) the same
   module with ``hash`` mappings and the same compressed sizes: same code path, only the mapping
   lookup differs; (c) the full-size EBC. (a) and (b) are ``LearnedHashEmbeddingBagCollection`` with
   the inner EBC replaced by TorchRec's ``FusedEmbeddingBagCollection`` (the unsharded twin of DMP's
   fused kernel).
2. Remap alone, eval: our ``IdRemapper`` vs TorchRec's managed-collision remap
   (``ManagedCollisionCollection`` of ``MCHManagedCollisionModule`` s) with the same number of rows
   per table, its slots holding the ``M - 1`` most frequent ids of the same history (the state an
   LFU eviction converges to); TorchRec sends every other id to one shared row.
3. Where the remap time goes, on the largest table alone: the frequency mapping as fitted (perfect
   hash table), its entry lookup alone, the same function in sorted keys + searchsorted and stored
   densely, the hash.
4. Serving, eval forward: the float module vs its int8/fp16 quantized twins
   (:func:`lhf_torchrec.modules.quant.quantize_learned_hash_ebc`), remap in front or folded into the
   kernel, eager and TorchScript.

Run: ``python benchmarks/module.py`` (about a minute on 1 thread). The tables go to stdout and,
unless ``--no-write``, replace the section ``## Module (benchmarks/module.py)`` of
``docs/performance.md`` (the rest of that file is left as it is).
"""

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.modules.mc_modules import LFU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule
from tqdm import tqdm

from lhf_torchrec.data import CRITEO_KAGGLE_CARDINALITIES
from lhf_torchrec.mapping import IdMapping, IdProfile, fit_mapping
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection
from lhf_torchrec.modules.quant import quantize_learned_hash_ebc, script_for_serving

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, write_doc_section  # noqa: E402

# At 10x a table of 100 ids keeps 10 rows: room for hot, cluster and hash rows. (A 1-row table
# also makes `combination` fail: no cluster row for its well-observed ids.)
MIN_CARDINALITY = 100
SECTION = "Module (benchmarks/module.py)"
TARGET_RATIO = 1.05
LEARNED_METHODS = ("combination", "frequency")

Step = Callable[[KeyedJaggedTensor], object]


@dataclass
class Workload:
    tables: List[EmbeddingBagConfig]
    batches: List[KeyedJaggedTensor]
    profiles: Dict[str, IdProfile]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=0.1, help="cardinality scale w.r.t. Criteo Kaggle")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--compression", type=int, default=10, help="rows of a compressed table = ceil(N / compression)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of id popularity")
    p.add_argument("--history", type=int, default=2_000_000, help="accesses per feature to fit mappings on")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--num-batches", type=int, default=8, help="distinct batches, cycled through")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see the docs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "performance.md"))
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/performance.md alone")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
def cardinalities(scale: float) -> List[int]:
    return [max(MIN_CARDINALITY, int(round(scale * c))) for c in CRITEO_KAGGLE_CARDINALITIES]


def zipf_ranks(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Ranks in [0, n) with P(r) ~ (r + 1)^-exponent (inverse CDF of the continuous power law)."""
    u = rng.random(size)
    top = (n + 1.0) ** (1.0 - exponent)
    ranks = np.floor((1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))).astype(np.int64) - 1
    return np.clip(ranks, 0, n - 1)


def make_workload(args: argparse.Namespace) -> Workload:
    rng = np.random.default_rng(args.seed)
    tables = [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=args.dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cardinalities(args.scale))
    ]
    profiles: Dict[str, IdProfile] = {}
    per_feature_ids = []
    for t in tqdm(tables, desc="data", leave=False):
        id_of_rank = rng.permutation(t.num_embeddings)
        profiles[t.name] = IdProfile.from_ids(id_of_rank[zipf_ranks(rng, t.num_embeddings, args.history, args.zipf)])
        per_feature_ids.append(id_of_rank[zipf_ranks(rng, t.num_embeddings, args.batch * args.num_batches, args.zipf)])
    keys = [t.feature_names[0] for t in tables]
    lengths = torch.ones(len(tables) * args.batch, dtype=torch.int64)
    batches = []
    for b in range(args.num_batches):
        values = np.concatenate([ids[b * args.batch:(b + 1) * args.batch] for ids in per_feature_ids])
        batches.append(KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values), lengths=lengths))
    return Workload(tables, batches, profiles)


def fit_all(workload: Workload, method: str, compression: int, seed: int) -> Dict[str, IdMapping]:
    out = {}
    for t in tqdm(workload.tables, desc=f"fit {method}", leave=False):
        embeddings = None
        if method == "combination":
            embeddings = torch.randn(t.num_embeddings, 4, generator=torch.Generator().manual_seed(seed))
        data = None if method == "hash" else workload.profiles[t.name]
        rows = -(-t.num_embeddings // compression)
        out[t.name] = fit_mapping(data, method, num_rows=rows, embeddings=embeddings, seed=seed, table=t.name)
    return out


# ---------------------------------------------------------------------------------------------- modules
def fused_learned_hash_ebc(tables, mappings, lr: float = 0.01) -> LearnedHashEmbeddingBagCollection:
    module = LearnedHashEmbeddingBagCollection(tables, mappings, device=torch.device("cpu"))
    # TorchRec trains EBCs with FBGEMM's fused TBE (what DMP builds); unsharded, that is this module.
    module.ebc = FusedEmbeddingBagCollection(module.embedding_bag_configs(), torch.optim.SGD, {"lr": lr})
    return module


def mch_collection(tables, mappings: Dict[str, IdMapping], profiles: Dict[str, IdProfile]) -> ManagedCollisionCollection:
    """TorchRec's MCH remap with our row counts; slots hold the M - 1 most frequent ids (row M - 1
    takes every other id, TorchRec's miss row)."""
    modules, configs = {}, []
    for t in tables:
        rows = mappings[t.name].num_rows
        mch = MCHManagedCollisionModule(
            zch_size=rows, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(), eviction_interval=1,
            input_hash_size=t.num_embeddings, name=t.name,
        )
        top = np.sort(profiles[t.name].top(rows - 1))
        with torch.no_grad():
            mch._mch_sorted_raw_ids[: top.size] = torch.from_numpy(top)
            mch._mch_remapped_ids_mapping[: top.size] = torch.randperm(top.size)
        modules[t.name] = mch
        configs.append(EmbeddingBagConfig(
            name=t.name, embedding_dim=t.embedding_dim, num_embeddings=rows, feature_names=list(t.feature_names)
        ))
    return ManagedCollisionCollection(modules, configs).eval()


def densely_stored(mapping: IdMapping, num_ids: int) -> IdMapping:
    """The same function as ``mapping``, stored as an int32 row per id of ``[0, num_ids)``."""
    return IdMapping(
        mapping.num_rows, hash_offset=mapping.hash_offset, hash_rows=mapping.hash_rows, seed=mapping.seed,
        storage="dense", tensors={"table": mapping(torch.arange(num_ids)).to(torch.int32)},
        num_entries=mapping.num_entries, method=mapping.method, table_name=mapping.table_name,
    )


def train_step(module: torch.nn.Module) -> Step:
    def step(kjt: KeyedJaggedTensor) -> None:
        module(kjt).values().sum().backward()  # the fused SGD update runs inside the backward
    return step


def eval_call(module: Callable) -> Step:
    def call(kjt: KeyedJaggedTensor) -> None:
        with torch.no_grad():
            module(kjt)
    return call


# ---------------------------------------------------------------------------------------------- timing
def time_interleaved(fns: Dict[str, Step], inputs: List, warmup: int, reps: int, desc: str) -> Dict[str, List[float]]:
    """Seconds per call: each rep runs every variant once on the same input, in a rotating order."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](inputs[i % len(inputs)])
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in tqdm(range(reps), desc=desc, leave=False):
        x = inputs[rep % len(inputs)]
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            start = time.perf_counter()
            fns[name](x)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: List[float]) -> float:
    return 1e3 * statistics.median(times)


def paired_ratio(num: List[float], den: List[float]) -> float:
    """Median over reps of num/den: robust to load that changes between reps."""
    return statistics.median(a / b for a, b in zip(num, den))


def markdown_table(times: Dict[str, List[float]], labels: Dict[str, str], extra: Dict[str, str], extra_header: str,
                   unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1e6
    lines = [f"| variant | median {unit} | p25-p75 {unit} | {extra_header} |", "| --- | ---: | ---: | --- |"]
    for name, ts in times.items():
        lo, med, hi = np.percentile(np.array(ts) * scale, [25, 50, 75])
        lines.append(f"| {labels[name]} | {med:.1f} | {lo:.1f}-{hi:.1f} | {extra.get(name, '')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    started = time.perf_counter()

    workload = make_workload(args)
    tables = workload.tables
    mappings = {m: fit_all(workload, m, args.compression, args.seed) for m in (*LEARNED_METHODS, "hash")}
    num_ids = sum(t.num_embeddings for t in tables)
    num_rows = sum(m.num_rows for m in mappings["hash"].values())
    # The mappings' buffers and what the fused remap adds to apply them (IdRemapper.state_bytes).
    mapping_bytes = {m: sum(x.nbytes + runtime_bytes(x) for x in maps.values()) for m, maps in mappings.items()}

    def storages(method: str) -> str:
        kinds = [x.storage for x in mappings[method].values()]
        return " / ".join(f"{kinds.count(s)} {s}" for s in ("dense", "perfect_hash", "sorted", "none"))

    # 1. Training step.
    modules = {m: fused_learned_hash_ebc(tables, mappings[m]) for m in (*LEARNED_METHODS, "hash")}
    modules["full"] = FusedEmbeddingBagCollection(tables, torch.optim.SGD, {"lr": 0.01})
    train_fns = {k: train_step(m) for k, m in modules.items()}
    train_fns["hash_remap"] = eval_call(modules["hash"].remapper)
    train = time_interleaved(train_fns, workload.batches, args.warmup, args.reps, "train")
    table_bytes = {k: 4 * sum(c.num_embeddings * c.embedding_dim for c in m.embedding_bag_configs()) for k, m in modules.items()}
    train_labels = {m: f"(a) learned-hash EBC, `{m}` mappings" for m in LEARNED_METHODS}
    train_labels.update({
        "hash": "(b) hashing-trick EBC: same module, `hash` mappings",
        "full": "(c) full-size EBC",
        "hash_remap": "(b)'s remap alone (`IdRemapper`, no grad)",
    })
    train_extra = {k: f"{mb(table_bytes[k])} + {mb(mapping_bytes.get(k, 0))}" for k in modules}
    train_extra["hash_remap"] = ""
    ratios = {m: paired_ratio(train[m], train["hash"]) for m in (*LEARNED_METHODS, "full")}
    del modules

    # 2. Remap alone.
    remappers = {m: LearnedHashEmbeddingBagCollection(tables, mappings[m]).remapper.eval() for m in (*LEARNED_METHODS, "hash")}
    remappers["mch"] = mch_collection(tables, mappings["hash"], workload.profiles)
    remap = time_interleaved({k: eval_call(m) for k, m in remappers.items()}, workload.batches, args.warmup, args.reps, "remap")
    remap_labels = {m: f"`IdRemapper`, `{m}` mappings" for m in (*LEARNED_METHODS, "hash")}
    remap_labels["mch"] = "TorchRec `ManagedCollisionCollection` of MCH modules, eval"
    remap_extra = {m: mb(mapping_bytes[m]) for m in (*LEARNED_METHODS, "hash")}
    remap_extra["mch"] = mb(sum(b.numel() * b.element_size() for b in remappers["mch"].buffers()))
    del remappers

    # 3. Where the remap time goes: the largest table alone.
    big = max(tables, key=lambda t: t.num_embeddings)
    freq = mappings["frequency"][big.name]
    dense = densely_stored(freq, big.num_embeddings)
    ids = [b[big.feature_names[0]].values() for b in workload.batches]
    hashed = mappings["hash"][big.name]
    stored_sorted = freq.with_storage("sorted")
    probe = {
        "fitted": eval_call(freq),
        "lookup": eval_call(freq._lookup),
        "sorted": eval_call(stored_sorted),
        "dense": eval_call(dense),
        "hash": eval_call(hashed),
    }
    parts = time_interleaved(probe, ids, args.warmup, 10 * args.reps, "probe")
    hit_rate = float(torch.cat([freq._lookup(x)[1] for x in ids]).float().mean())
    probe_labels = {
        "fitted": f"`frequency` mapping as fitted ({freq.storage}, {freq.num_entries:,} entries)",
        "lookup": "its entry lookup alone (`_lookup`, hashes nothing)",
        "sorted": "the same function in sorted keys + searchsorted (the storage fitted before `perfect_hash`)",
        "dense": "the same function stored densely (int32 per id)",
        "hash": "`hash` mapping (`hash_ids`)",
    }
    probe_extra = {"fitted": mb(freq.nbytes), "sorted": mb(stored_sorted.nbytes), "dense": mb(dense.nbytes),
                   "hash": mb(0)}

    # 4. Serving.
    float_module = LearnedHashEmbeddingBagCollection(tables, mappings["combination"]).eval()
    serving = {
        "float": float_module,
        "int8_front": quantize_learned_hash_ebc(float_module, torch.qint8, fold_remap="none"),
        "int8_dense": quantize_learned_hash_ebc(float_module, torch.qint8, fold_remap="dense"),
        "int8_all": quantize_learned_hash_ebc(float_module, torch.qint8, fold_remap="all"),
        "fp16_all": quantize_learned_hash_ebc(float_module, torch.float16, fold_remap="all"),
    }
    fns = {k: eval_call(m) for k, m in serving.items()}
    fns["int8_script"] = eval_call(script_for_serving(serving["int8_all"]))
    serve = time_interleaved(fns, workload.batches, args.warmup, args.reps, "serve")
    serve_labels = {
        "float": "float module (fp32 tables, remap in front)",
        "int8_front": "int8, all remaps in front (`fold_remap='none'`)",
        "int8_dense": f"int8, `fold_remap='dense'` (default: {len(serving['int8_dense'].folded_tables)} tables folded)",
        "int8_all": "int8, all remaps folded (`fold_remap='all'`)",
        "fp16_all": "fp16, all remaps folded",
        "int8_script": "int8, all folded, TorchScript (`script_for_serving`)",
    }
    serve_extra = {"float": f"{mb(table_bytes['combination'])} + {mb(mapping_bytes['combination'])}"}
    for k, m in serving.items():
        if k != "float":
            tables_nbytes = sum(b.numel() * b.element_size() for b in m.ebc.buffers())
            serve_extra[k] = f"{mb(tables_nbytes)} + {mb(sum(m.remap_nbytes().values()))}"
    serve_extra["int8_script"] = serve_extra["int8_all"]

    elapsed = time.perf_counter() - started
    command = " ".join(["python benchmarks/module.py", *(sys.argv[1:] if argv is None else argv)])
    verdicts = ", ".join(
        f"`{m}` {ratios[m]:.3f} ({'meets' if ratios[m] <= TARGET_RATIO else 'misses'} the target <= {TARGET_RATIO})"
        for m in LEARNED_METHODS
    )
    remap_share = paired_ratio(train["hash_remap"], train["hash"])
    full_vs_compressed = (
        "The full-size EBC trains faster than the compressed ones: its lookups need no remap, and the "
        "smaller tables save less lookup time than the remap costs."
        if ratios["full"] < 1 else "The compressed EBCs train faster than the full-size one."
    )
    kernel_ratio = median_ms(serve["int8_front"]) / median_ms(serve["float"])
    body = f"""Command: `{command}` ({elapsed:.0f} s in all). Machine: {machine_description()}. The machine is shared: other
jobs load it, hence 1 torch thread (with 2 threads on 2 busy cores each parallel op can wait ~10 ms
for a descheduled worker) and medians of interleaved reps, with their spread.

Workload: 26 features, one id per feature, batch {args.batch}, dim {args.dim}; cardinalities
`max({MIN_CARDINALITY}, round({args.scale} x C))` of Criteo Kaggle's C (total {num_ids:,} ids; full-size fp32
tables {mb(table_bytes['full'])}); Zipf({args.zipf}) ids over a random permutation of each id space;
mappings fitted on {args.history:,} accesses per feature, every table compressed {args.compression}x
({num_rows:,} rows). Storage chosen by the fit: `combination` {storages('combination')};
`frequency` {storages('frequency')}. {args.reps} interleaved reps after {args.warmup} warmups, cycling
over {args.num_batches} batches.

### Training step: forward, backward of `sum(pooled)`, SGD fused into the backward (FBGEMM TBE)

{markdown_table(train, train_labels, train_extra, 'fp32 tables + mapping')}

(a)/(b), median of per-rep ratios: {verdicts}. (c)/(b) = {ratios['full']:.3f}.
The remap is {100 * remap_share:.0f}% of the hashing-trick step (median of per-rep ratios). {full_vs_compressed}

### Remap alone (eval, one batch's KJT)

{markdown_table(remap, remap_labels, remap_extra, 'remap memory')}

`IdRemapper` maps the ids of all tables together, one pass per storage
(`lhf_torchrec.mapping.fused.FusedIdMappings`: dense tables, each perfect hash layout, the hash), the
features of equal size as a (features, ids) matrix whose rows broadcast their table's parameters. The
memory columns count the mappings' buffers and what the fused remap adds (`runtime_bytes`: the 4 KiB dense
copies it runs the small sorted tables from, the unused byte of each int64 record it packs perfect hash
slots of int32 keys and 3-byte rows into, per-table parameters); its packed arrays are the mappings'
own buffers, not copies. A mapping's file and the fit's byte budget count its buffers alone (how it runs
depends on the module: see `lhf_torchrec/mapping/fused.py`).

Same KJT, same rows per table. TorchRec's MCH holds the M - 1 most frequent ids of the same history
in sorted int64 slots (searchsorted, gather, compare) and sends every other id to one shared miss
row; ours looks up the mapping's entries (int32) and hashes every other id into a reserved region.
MCH does less per miss (no hash) and stores 24 bytes per row (int64 sorted raw id, remapped id and
LFU count) where ours stores 7-8 bytes per entry (perfect hash table, int32 keys, 2- or 3-byte rows) or 1, 2 or 4 per id of the span (dense: the narrowest integer that holds the table's rows).

### Where the remap time goes: the largest table alone ({big.name}, {big.num_embeddings:,} ids, {args.batch} ids per call)

{markdown_table(parts, probe_labels, probe_extra, 'mapping memory', unit='us')}

{100 * hit_rate:.0f}% of these lookups hit an entry of the `frequency` mapping. The perfect hash table
finds an entry with three or four gathers and a comparison; sorted keys pay a binary search (~17 dependent
gathers); both then hash the misses. Stored densely the same function is one gather (in-span ids'
hash rows are precomputed), at 1-4 bytes per id (the narrowest integer that holds its rows: the memory column) instead of 7-8 per entry.

### Serving: eval forward of the quantized module (`quantize_learned_hash_ebc`, `combination` mappings)

{markdown_table(serve, serve_labels, serve_extra, 'tables + remap')}

int8 with the remap in front takes {kernel_ratio:.2f}x the float module's time: on this CPU FBGEMM's
inference kernel (`IntNBitTableBatchedEmbeddingBagsCodegen`) is slower than the fp32 EBC's lookup, so
quantization buys memory here, not speed. int8 and fp16 rows take 32 bytes (dim 16, rows aligned to 16 bytes, int8 with its fp16 scale
and bias). Folding a table's remap costs 4 bytes per raw id plus its hash block; `'dense'` folds only
mappings already stored densely, so it costs about what the mapping did.
"""
    print(body)
    if not args.no_write:
        write_doc_section(args.output, SECTION, body)
        print(f"wrote the section to {os.path.abspath(args.output)}")
    return body


if __name__ == "__main__":
    main()
