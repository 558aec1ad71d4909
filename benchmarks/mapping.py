"""Benchmark of the mapping library: fit time and peak memory by vocabulary size, apply throughput.

    .venv/bin/python benchmarks/mapping.py            # fits of 1e5, 1e6, 1e7 ids (~10 minutes on 2 cores)
    .venv/bin/python benchmarks/mapping.py --large    # and 1e8 ids (about an hour more; needs ~12 GB free)
    .venv/bin/python benchmarks/mapping.py --quick    # 1e5, 1e6 ids
    .venv/bin/python benchmarks/mapping.py --fit-only --large   # only the fit table (no apply rows)
    .venv/bin/python benchmarks/mapping.py --fresh ...          # forget the recorded fit rows first
    .venv/bin/python benchmarks/mapping.py --fit-only --sizes 1e8   # one size (rows of others are kept)
    .venv/bin/python benchmarks/mapping.py --fit-only --sizes 1e8 --methods frequency   # and one method
    .venv/bin/python benchmarks/mapping.py --apply         # only the apply throughput table
    .venv/bin/python benchmarks/mapping.py --apply-scale --large   # apply of 1e6-1e8 64-bit keys (~10 GB)
    .venv/bin/python benchmarks/mapping.py --distributed   # distributed fit, 2 gloo ranks vs 1 (~30 minutes, loaded box)
    .venv/bin/python benchmarks/mapping.py --distributed --sizes 1e7 --methods combination --paths library
                                                            # a slice: printed, docs left as they are

Fit: every size runs in a fresh subprocess (so peak RSS is that fit's own), on a Zipf(1.1) access
profile over n distinct ids with random 8-d embeddings, fitting ``frequency`` and ``combination``
(hot 25%, hashed 10%, every other id clustered: ``min_count=1``) into n / 10 rows. The profile
and embeddings are the user's input (1e8 ids: 0.8 + 0.8 GB of profile, 3.2 GB of vectors); the
fit's own memory is the growth of peak RSS over the RSS before the fit (the peak is reset there).
Each fit runs one torch thread (a fit's time does not then depend on how many cores the other jobs
of a shared machine leave it). Every finished fit is appended to docs/mapping_fit_runs.jsonl
(rewritten atomically) and a rerun skips the (size, method) pairs recorded there, so a long run that
is stopped resumes where it was; ``--fresh`` starts over.

Apply: ids drawn from the same access distribution (1% never seen; ids dense, sparse 40-bit or
sparse 64-bit), mapped by a fitted mapping in every storage that can hold it, eager and compiled
(``IdMapping.compile``'s settings, one compile per mapping; a mapping that applies through the CPU kernel
also compiled with torch ops), next to a plain gather
``table.index_select(0, ids)`` from an int32 table of 1e6 rows, measured interleaved in one process
on one torch thread; medians of repeated runs.

Distributed fit (``--distributed``): the same Zipf profile fitted on 1 and on 2 gloo ranks (B = 64
buckets), each rank a fresh process holding its share of the profile, through the library
(:mod:`lhf_torchrec.distributed.fit`, fixed rows) and through the pipeline (``fit_mappings`` at a
budget: share, budget planned across the ranks, fit, gather), and sharded (the library path ending with each
rank's shard and co-sharded remap, no gather); wall time and per-rank peak RSS (per phase on the library
paths) side by side.

Results are printed and written to docs/performance.md (section "Mapping").
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

EMBEDDING_DIM = 8


def zipf_profile(num_ids: int, seed: int, sparse_ids: bool):
    """A profile of num_ids distinct ids whose counts follow Zipf(1.1) by popularity rank."""
    from lhf_torchrec.mapping import IdProfile

    rng = np.random.default_rng(seed)
    counts = np.empty(num_ids, np.int64)
    for start in range(0, num_ids, 1 << 22):  # by chunk: no float64 array of 1e8 ranks
        ranks = np.arange(start + 1, min(num_ids, start + (1 << 22)) + 1, dtype=np.float64)
        counts[start:start + ranks.size] = np.maximum(1, np.round(1e3 * num_ids ** 0.1 * ranks ** -1.1))
    ids = rng.permutation(num_ids).astype(np.int64)  # popularity independent of id
    if sparse_ids:
        ids = np.sort(rng.choice(1 << 40, size=num_ids, replace=False))[rng.permutation(num_ids)]
        order = np.argsort(ids)
        return IdProfile(ids[order], counts[order], int(counts.sum()))
    by_id = np.empty_like(counts)  # ids are a permutation of 0..n-1: placing counts sorts them, no argsort
    by_id[ids] = counts
    return IdProfile(np.arange(num_ids, dtype=np.int64), by_id, int(counts.sum()))


def _rss_mb() -> Tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


FIT_RUNS = "docs/mapping_fit_runs.jsonl"
FIT_SUBSECTION = "### Fit time and peak memory"
FIT_METHODS = ("frequency", "combination")


def fit_once(num_ids: int, method: str) -> dict:
    """Runs in a child process: one fit, its wall time, the process's peak RSS and the fit's own growth."""
    from lhf_torchrec.mapping import IdEmbeddings, fit_mapping

    torch.set_num_threads(1)
    profile = zipf_profile(num_ids, seed=0, sparse_ids=False)
    embeddings = (IdEmbeddings(profile.ids, torch.randn(num_ids, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
                  if method == "combination" else None)  # frequency needs none: 3.2 GB less input at 1e8
    setup_peak = _rss_mb()[1]
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak: the fit's own peak is measured from here
        f.write("5")
    rss_before = _rss_mb()[0]
    hyper = {"min_count": 1, "hot_fraction": 0.25, "hashed_fraction": 0.1} if method == "combination" else {}
    times, cpu_times = [], []
    while not times or (sum(times) < 2.0 and len(times) < 7):  # a fit under 2 s: median of repeats (noise)
        start, cpu_start = time.perf_counter(), time.process_time()
        mapping = fit_mapping(profile, method=method, num_rows=max(1, num_ids // 10), embeddings=embeddings, **hyper)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) == 1:  # the first fit's peak (a repeat holds the previous mapping until it is done)
            fit_peak = _rss_mb()[1]
    seconds = statistics.median(times)
    return {"ids": num_ids, "method": method, "rows": mapping.num_rows, "fit_s": seconds, "repeats": len(times),
            "cpu_s": statistics.median(cpu_times),
            "input_mb": rss_before, "peak_rss_mb": max(setup_peak, fit_peak), "fit_rss_mb": fit_peak - rss_before,
            "mapping_mb": mapping.nbytes / 2**20, "storage": mapping.storage, "fingerprint": mapping.fingerprint[:12],
            "load_1min": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _recorded_fits() -> list:
    """The fit rows in FIT_RUNS (one JSON object a line), or [] when there is none."""
    if not os.path.exists(FIT_RUNS):
        return []
    with open(FIT_RUNS) as f:
        return [json.loads(line) for line in f if line.strip()]


def _record_fit(row: dict) -> None:
    """Adds a fit row to FIT_RUNS (rewritten atomically: a run stopped mid-write loses nothing)."""
    from lhf_torchrec.files import atomic_write

    import fcntl
    import tempfile

    # Two runs (say 1e8 beside the rest) may record at once: one at a time (the lock file lives outside the repo).
    with open(os.path.join(tempfile.gettempdir(), "lhf-mapping-fit-runs.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in _recorded_fits() if (r["ids"], r["method"]) != (row["ids"], row["method"])] + [row]
        with atomic_write(FIT_RUNS) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())


def fit_rows(sizes, methods=FIT_METHODS, fresh: bool = False) -> list:
    """Every (size, method) fit, each in a fresh process, smallest first; pairs already in FIT_RUNS are
    kept, not rerun (unless ``fresh``). Returns every recorded row (also of other sizes) with ``us_per_id`` and
    ``per_id_vs_1e6`` (time per id over the same method's 1e6 fit; 1.0 = linear)."""
    from tqdm import tqdm

    if fresh and os.path.exists(FIT_RUNS):
        os.remove(FIT_RUNS)
    done = {(r["ids"], r["method"]) for r in _recorded_fits()}
    jobs = [(n, m) for n in sorted(sizes) for m in methods if (n, m) not in done]
    for n, method in tqdm(jobs, desc="fit"):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), method], stdout=subprocess.PIPE, text=True)
        if out.returncode:
            raise RuntimeError(f"the fit of {n:,} ids with '{method}' failed (exit code {out.returncode}); "
                               f"the fits before it are recorded in {FIT_RUNS}")
        _record_fit(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = sorted(_recorded_fits(), key=lambda r: (r["ids"], FIT_METHODS.index(r["method"])))
    for row in rows:
        row["us_per_id"] = row["fit_s"] / row["ids"] * 1e6
        row["cpu_us_per_id"] = row["cpu_s"] / row["ids"] * 1e6 if "cpu_s" in row else float("nan")
    for row in rows:
        base = next((r for r in rows if r["method"] == row["method"] and r["ids"] == 10**6), None)
        row["per_id_vs_1e6"] = row["us_per_id"] / base["us_per_id"] if base else float("nan")
        row["cpu_per_id_vs_1e6"] = row["cpu_us_per_id"] / base["cpu_us_per_id"] if base else float("nan")
    return rows


def fit_section(rows, command: str) -> str:
    """The "Fit time and peak memory" subsection of docs/performance.md."""
    loads = [r["load_1min"] for r in rows]
    table = markdown_table(rows, ["ids", "method", "rows", "storage", "fit_s", "repeats", "us_per_id", "per_id_vs_1e6",
                                  "cpu_s", "cpu_per_id_vs_1e6", "input_mb", "peak_rss_mb", "fit_rss_mb", "mapping_mb", "load_1min"])
    return "\n".join([
        FIT_SUBSECTION,
        f"Command: `{command}` (rows recorded in `{FIT_RUNS}`, finished {min(r['finished'] for r in rows)} to "
        f"{max(r['finished'] for r in rows)}). {machine_description().split(', torch ')[0]}, torch "
        f"{torch.__version__} with one thread per fit; 1-min load average at the end of each fit {min(loads):.1f} to {max(loads):.1f} (`load_1min`).",
        "",
        "Zipf(1.1) profile over n distinct ids, 8-d random embeddings, n / 10 rows (`combination`: hot 25%, "
        "hashed 10%, `min_count=1`, so about 97% of the ids are k-means'd into 65% of the rows); each fit in a "
        "fresh process. `input_mb` is the RSS before the fit (interpreter, torch, the profile and, for "
        "`combination`, the embeddings: the user's input), `peak_rss_mb` the process's peak, `fit_rss_mb` the "
        "fit's own growth (peak during the fit minus `input_mb`); a fit under 2 s is repeated (`repeats`, up to 7) "
        "and `fit_s` is the median; `per_id_vs_1e6` is the fit time per id "
        "(`us_per_id`) relative to the same method's 1e6 fit (1.0 = linear; the target is <= 1.3 up to 1e8). "
        "The machine is shared with other jobs (load average above): wall times are slower than on a quiet "
        "machine and their ratios noisy; `cpu_s` (CPU time of the fit's process, one thread) and its ratio "
        "`cpu_per_id_vs_1e6` depend far less on the other jobs (they still share caches and memory bandwidth).",
        "",
        table,
        "",
        _growth_summary(rows),
    ])


def _growth_summary(rows) -> str:
    """One sentence per method: time per id at the largest size against 1e6, and the 1.3x target."""
    parts = []
    for method in FIT_METHODS:
        largest = max((r for r in rows if r["method"] == method), key=lambda r: r["ids"], default=None)
        if largest is None or largest["ids"] <= 10**6 or largest["per_id_vs_1e6"] != largest["per_id_vs_1e6"]:
            continue
        verdict = "meets" if largest["per_id_vs_1e6"] <= 1.3 else "misses"
        cpu = largest["cpu_per_id_vs_1e6"]
        parts.append(f"`{method}` {largest['per_id_vs_1e6']:.2f}x wall" + (f", {cpu:.2f}x CPU" if cpu == cpu else "")
                     + f" at {largest['ids']:,} ids (wall {verdict} the target)")
    missing = [f"{n:,} ids `{m}`" for n in sorted({r["ids"] for r in rows}) for m in FIT_METHODS
               if not any((r["ids"], r["method"]) == (n, m) for r in rows)]
    return " ".join(([("Time per id against 1e6: " + "; ".join(parts) + ".")] if parts else [])
                    + ([f"Not measured yet: {', '.join(missing)}."] if missing else []))


def _write_fit_subsection(text: str) -> None:
    """Replaces the fit subsection inside the Mapping section of docs/performance.md, the rest as it is."""
    from lhf_torchrec.files import atomic_write

    path = "docs/performance.md"
    doc = open(path).read()
    start = doc.index(FIT_SUBSECTION + "\n")
    nxt = [i for i in (doc.find("\n### ", start + 1), doc.find("\n## ", start + 1)) if i >= 0]
    end = min(nxt) + 1 if nxt else len(doc)
    with atomic_write(path) as f:
        f.write((doc[:start] + text + ("\n\n" if nxt else "\n") + doc[end:]).encode())


def time_median(fns, reps: int):
    """Median CPU seconds of the calling thread in each function, run interleaved so drifts hit all alike.
    The functions run on one torch thread (the calling one): thread time leaves out the time other jobs
    of a shared box hold the core, which wall time would count."""
    samples = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.thread_time()
            fn()
            samples[i].append(time.thread_time() - start)
    return [statistics.median(s) for s in samples]


APPLY_CASES = [  # (ids, method, hyper-parameters): each fitted mapping is applied in every storage it can take
    ("dense", "hash", {}),
    ("dense", "frequency", {}),
    ("dense", "combination", {"min_count": 1}),
    ("sparse 40-bit", "frequency", {}),
    ("sparse 40-bit", "combination", {"min_count": 1}),
    ("sparse 64-bit", "frequency", {}),
    ("sparse 64-bit", "combination", {"min_count": 1}),
]
APPLY_TARGET = 3.0  # sparse storages: apply / gather
APPLY_SUBSECTION = "### Apply throughput"
# Dense storage is measured only where its table stays small (4 bytes per id of the entries' span).
_MAX_DENSE_SPAN = 1 << 24


def _spread_ids(profile, kind: str, rng: np.random.Generator):
    """The profile with its ids replaced by distinct ids of ``kind`` ("dense": unchanged; "sparse 40-bit":
    in [0, 2^40); "sparse 64-bit": anywhere in int64), sorted again."""
    from lhf_torchrec.mapping import IdProfile

    if kind == "dense":
        return profile
    low, high = (0, 1 << 40) if kind == "sparse 40-bit" else (-(1 << 63), (1 << 63) - 1)
    ids = rng.permutation(np.unique(rng.integers(low, high, size=2 * profile.num_ids, dtype=np.int64)))[:profile.num_ids]
    order = np.argsort(ids)
    return IdProfile(ids[order], profile.counts[order], profile.total)


def _compiled(mapping, ids: torch.Tensor):
    """``mapping`` compiled as ``IdMapping.compile`` does (a wrapper: the eager mapping stays), the seconds of
    its first call (the compile), checked against eager on ``ids`` and on a batch of another size."""
    from torch._inductor import config as inductor_config

    from lhf_torchrec.mapping.id_mapping import COMPILE_SETTINGS

    compiled = torch.compile(mapping, **COMPILE_SETTINGS)
    start = time.perf_counter()
    with inductor_config.patch(force_disable_caches=True):  # a cold compile, as on a fresh machine
        rows = compiled(ids)
    compile_s = time.perf_counter() - start
    torch.compiler.set_stance("fail_on_recompile")  # another batch size runs the same graph
    try:
        same = torch.equal(rows, mapping(ids)) and torch.equal(compiled(ids[:1000]), mapping(ids[:1000]))
    finally:
        torch.compiler.set_stance("default")
    if not same:
        raise AssertionError(f"compiled {mapping.storage} mapping maps ids differently from eager")
    return compiled, compile_s


def _layout_label(storage_label: str, storage: str) -> str:
    """The slot layout in a row's storage label (`perfect_hash remainders (fitted)` -> ` remainders`)."""
    layout = storage_label[len(storage):].replace("(fitted)", "").strip()
    return f" {layout}" if layout else ""


def _split_slots(mapping):
    """``mapping`` (int64 keys in perfect hash remainders) with its entries in split slots instead."""
    from lhf_torchrec.mapping import IdMapping, perfect_hash

    keys, rows = mapping.stored_entries()
    tensors = perfect_hash.build(keys, rows, mapping.seed, mapping.table_name, torch.int64, mapping.num_rows, "split")
    return IdMapping(mapping.num_rows, storage="perfect_hash", tensors=tensors, num_entries=mapping.num_entries,
                     **mapping._settings())


def _torch_ops(mapping):
    """``mapping`` applied with torch ops where it would call the CPU kernel (native.py): the path of CUDA and of
    CPUs without AVX-512. The same buffers and function."""
    import copy

    plain = copy.copy(mapping)
    plain._native_layout = None
    return plain


def apply_rows(num_ids: int, batch: int, reps: int) -> list:
    """Apply throughput of every storage, eager and compiled, next to a plain gather, on one torch thread
    (the box is shared)."""
    from lhf_torchrec.mapping import IdEmbeddings, fit_mapping, perfect_hash

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The floor: a plain gather of as many ids from an int32 table of num_ids rows (4 MB at 1e6).
    floor_table = torch.randint(0, num_ids // 10, (num_ids,), dtype=torch.int32)
    floor_ids = torch.randint(0, num_ids, (batch,), dtype=torch.int64)
    rows = []
    for kind, method, hyper in APPLY_CASES:
        rng = np.random.default_rng(2)
        profile = _spread_ids(zipf_profile(num_ids, seed=1, sparse_ids=False), kind, rng)
        seen = profile.ids[rng.choice(profile.num_ids, size=batch, p=profile.counts / profile.counts.sum())]
        unseen = rng.integers(-(1 << 63), (1 << 63) - 1, size=batch // 100, dtype=np.int64)
        ids = torch.from_numpy(np.concatenate([seen, unseen])[rng.permutation(seen.size + unseen.size)])
        embeddings = IdEmbeddings(profile.ids, torch.randn(num_ids, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
        fitted = fit_mapping(profile, method=method, num_rows=num_ids // 10,
                             embeddings=embeddings if method == "combination" else None, **hyper)
        keys, _ = fitted.stored_entries()
        span = int(keys[-1]) - int(keys[0]) + 1 if keys.numel() else 0
        storages = ["none"] if fitted.storage == "none" else [
            s for s in ("dense", "perfect_hash", "sorted") if s != "dense" or span <= _MAX_DENSE_SPAN]
        variants = [fitted if s == fitted.storage else fitted.with_storage(s) for s in storages]
        # A remainders table next to the split slots int64 keys took before it (the same function).
        for i, m in enumerate(list(variants)):
            if "slot_remainders" in m._buffers:
                storages.insert(i + 1, m.storage)
                variants.insert(i + 1, _split_slots(m))
        hit = float(fitted.has_entry(ids).float().mean())
        # Every mapping compiles once (dynamic batch size); dynamo keeps 8 compiled versions of
        # IdMapping.forward (each mapping's constants are its own), so start each case afresh.
        torch._dynamo.reset()
        compiled = [_compiled(m, ids) for m in variants]
        # Where a mapping calls the CPU kernel, the same mapping compiled with torch ops too.
        kernel = [i for i, m in enumerate(variants) if m._native_layout is not None]
        torch_compiled = {i: _compiled(_torch_ops(variants[i]), ids)[0] for i in kernel}
        # Apply (entries found, every other id hashed) eager and compiled, and the entry lookup alone
        # (what the storage does, eager).
        k = len(variants)
        times = time_median([lambda: floor_table.index_select(0, floor_ids)]
                            + [lambda m=m: m(ids) for m in variants]
                            + [lambda c=c: c(ids) for c, _ in compiled]
                            + [lambda m=m: m._lookup(ids) for m in variants]
                            + [lambda c=torch_compiled[i]: c(ids) for i in kernel], reps)
        for i in kernel:  # the kernel and the torch ops: one function
            if not torch.equal(variants[i](ids), _torch_ops(variants[i])(ids)):
                raise AssertionError(f"the CPU kernel maps ids differently from the torch ops ({storages[i]})")
        gather = times[0]
        for i, (storage, mapping) in enumerate(zip(storages, variants)):
            t_apply, t_compiled, t_lookup = times[1 + i], times[1 + k + i], times[1 + 2 * k + i]
            t_torch = times[1 + 3 * k + kernel.index(i)] if i in kernel else t_compiled
            layout = perfect_hash.slot_layout_of(mapping._buffers) if storage == "perfect_hash" else ""
            rows.append({"ids": kind, "method": method,
                         "storage": f"{storage} {layout}".strip() + (" (fitted)" if mapping is fitted else ""),
                         "entries": mapping.num_entries, "hit": hit, "mapping_mb": mapping.nbytes / 2**20,
                         "gather_Mids_s": ids.numel() / gather / 1e6, "apply_Mids_s": ids.numel() / t_apply / 1e6,
                         "compiled_Mids_s": ids.numel() / t_compiled / 1e6, "apply/gather": t_apply / gather,
                         "compiled/gather": t_compiled / gather, "kernel": "yes" if i in kernel else "no",
                         "torch_compiled/gather": t_torch / gather, "lookup/gather": t_lookup / gather,
                         "compile_s": compiled[i][1]})
    torch.set_num_threads(threads)
    return rows


SCALE_SUBSECTION = "### Apply at scale"


def scale_rows(sizes, batch: int, reps: int) -> list:
    """Apply of tables of n random 64-bit keys (n / 10 rows) through the CPU kernel where it loads and compiled torch
    ops, next to a gather of as many ids from an int32 table of n rows, on one torch thread."""
    from lhf_torchrec.mapping import IdMapping, perfect_hash

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        rng = np.random.default_rng(3)
        keys = np.unique(rng.integers(-(1 << 63), (1 << 63) - 1, size=n + n // 100, dtype=np.int64))[:n]
        num_rows = n // 10
        started = time.perf_counter()
        mapping = IdMapping.from_entries(keys, rng.integers(0, num_rows - num_rows // 10, size=keys.size), num_rows,
                                         hash_offset=num_rows - num_rows // 10)
        build_s = time.perf_counter() - started
        # Zipf(1.1) over the keys in a random order, plus 1% never-seen ids.
        weights = np.arange(1, n + 1, dtype=np.float64) ** -1.1
        seen = keys[rng.permutation(n)[rng.choice(n, size=batch, p=weights / weights.sum())]]
        del weights
        unseen = rng.integers(-(1 << 63), (1 << 63) - 1, size=batch // 100, dtype=np.int64)
        ids = torch.from_numpy(np.concatenate([seen, unseen])[rng.permutation(batch + batch // 100)])
        # The floor reads the dense storage of the same lookups: each key's position among the keys (an unseen id
        # a random one), so its reads are as skewed as the mapping's.
        floor_table = torch.randint(0, num_rows, (n,), dtype=torch.int32)
        floor_ids = torch.from_numpy(np.searchsorted(keys, ids.numpy()).clip(max=n - 1))
        torch._dynamo.reset()
        compiled, _ = _compiled(_torch_ops(mapping), ids)
        if not torch.equal(compiled(ids), mapping(ids)):
            raise AssertionError(f"the CPU kernel maps ids differently from the torch ops ({n:,} entries)")
        gather, applied, torch_compiled = time_median(
            [lambda: floor_table.index_select(0, floor_ids), lambda: mapping(ids), lambda: compiled(ids)], reps)
        rows.append({"entries": n, "rows": num_rows, "layout": perfect_hash.slot_layout_of(mapping._buffers),
                     "mapping_mb": mapping.nbytes / 2**20, "build_s": build_s,
                     "kernel": "yes" if mapping._native_layout is not None else "no",
                     "distinct_ids": int(np.unique(ids.numpy()).size), "gather_Mids_s": ids.numel() / gather / 1e6,
                     "apply/gather": applied / gather, "torch_compiled/gather": torch_compiled / gather})
        print(json.dumps(rows[-1]), flush=True)
        del mapping, compiled, floor_table, floor_ids, ids, keys
    torch.set_num_threads(threads)
    return rows


def scale_doc(rows: list, batch: int, reps: int) -> str:
    """The "Apply at scale" subsection."""
    def spread(column: str) -> str:
        return f"{min(r[column] for r in rows):.2f}-{max(r[column] for r in rows):.2f}x"

    return "\n".join([
        SCALE_SUBSECTION,
        f"Tables of n random 64-bit keys into n / 10 rows (the fit's storage for them: `perfect_hash` in "
        f"`remainders`), {batch:,} lookups Zipf(1.1)-distributed over the keys in a random order plus 1% never-seen "
        "ids (`distinct_ids`: how many of the lookups are different). `apply` is eager `mapping(ids)` (the CPU "
        "kernel where `kernel` says so), `torch_compiled` the same mapping compiled with torch ops (the path of "
        "CUDA and of CPUs without AVX-512); the floor a gather of as many ids from an int32 table of n rows (the "
        "dense storage of n ids) at the position of each looked-up key (as skewed as the lookups; a never-seen id "
        "at the position of the next key), in the same interleaved reps; median of "
        f"{reps} reps of the timing thread's CPU time, 1 torch thread. `build_s`: the perfect hash table's build. "
        "Beyond the last-level cache a lookup's slot is a random read from memory, as the floor's row is; the "
        "kernel's pipeline keeps the next blocks' reads in flight, while in torch ops the slot arithmetic sits "
        f"between dependent reads: apply/gather {spread('apply/gather')}, torch_compiled/gather "
        f"{spread('torch_compiled/gather')} here.",
        "",
        markdown_table(rows, ["entries", "rows", "layout", "mapping_mb", "build_s", "kernel", "distinct_ids",
                              "gather_Mids_s", "apply/gather", "torch_compiled/gather"]),
    ])


DIST_BUCKETS = 64
DIST_WORLD_SIZES = (1, 2)
DIST_SUBSECTION = "### Distributed fit"


def _id_vectors(ids: np.ndarray) -> torch.Tensor:
    """8-d pseudo-random vectors in [-0.5, 0.5), a fixed function of each id (one seeded hash per
    dimension): every rank count sees the same embeddings. Written 2^20 ids at a time: they are the
    caller's input, and their temporaries (a stack of 8 columns, mix64's) would otherwise be the peak of
    the fits measured after them."""
    from lhf_torchrec.mapping.hashing import bucket_key, mix64

    keys = torch.from_numpy(ids)
    out = torch.empty(len(ids), EMBEDDING_DIM)
    for start in range(0, len(ids), 1 << 20):
        chunk = keys[start:start + (1 << 20)]
        for j in range(EMBEDDING_DIM):
            out[start:start + len(chunk), j] = ((mix64(chunk ^ bucket_key(j)) >> 40) & 0xFFFFFF).to(
                torch.float32) / (1 << 24) - 0.5
    return out


def _reset_peak_rss() -> float:
    """Resets this process's peak RSS to its current RSS (Linux); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb()[0]


def _rank_start(world_size: int, rank: int, parts_dir: str):
    """A benchmark rank: one torch thread, its gloo group, its part of the profile; (profile, the RSS in MB
    before loading it)."""
    import torch.distributed as dist

    from lhf_torchrec.mapping import IdProfile

    # One thread per rank: the per-rank work compares alike, and intra-op threads on a shared, loaded
    # machine spin against other jobs (measured: 2 threads made the 1-rank fit 7x slower per bucket).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    base_rss = _rss_mb()[0]
    ids, counts = np.load(os.path.join(parts_dir, f"ids{rank}.npy")), np.load(os.path.join(parts_dir, f"counts{rank}.npy"))
    return IdProfile(ids, counts, int(counts.sum())), base_rss


def _phase_peak(rss_before: float) -> float:
    """The growth of the peak RSS since the last reset over ``rss_before`` (MB); resets the peak for the next phase."""
    peak = _rss_mb()[1] - rss_before
    _reset_peak_rss()
    return peak


def _entry_checksum(ids: np.ndarray, rows: np.ndarray) -> int:
    """An order-free checksum of (id, row) entries (sum of a 64-bit hash of each, mod 2^64): the
    shards' checksums add up to the whole mapping's."""
    from lhf_torchrec.mapping.hashing import mix64

    hashed = mix64(mix64(torch.from_numpy(ids)) ^ torch.from_numpy(rows)).numpy().view(np.uint64)
    return int(hashed.sum(dtype=np.uint64))


def distributed_fit_rank(num_ids: int, method: str, world_size: int, rank: int, parts_dir: str,
                         sharded: bool = False) -> dict:
    """Runs in a child process (one rank): exchange, fit of the rank's buckets, then the gather and
    assembly of the whole mapping (as ``fit_bucketed_distributed`` does them: the exchanged profile and
    the rank's own entries are freed first), or with ``sharded`` the rank's :class:`MappingShard` and
    its co-sharded remap; times, per-phase and whole peak RSS growth."""
    import torch.distributed as dist

    from lhf_torchrec.distributed.fit import (cosharded_remap, exchange_profiles, fit_owned_buckets,
                                              gather_keyed_fits, shard_mapping)
    from lhf_torchrec.mapping import IdEmbeddings
    from lhf_torchrec.mapping.buckets import assemble_keyed

    local, base_rss = _rank_start(world_size, rank, parts_dir)
    hyper = {"min_count": 1, "hot_fraction": 0.25, "hashed_fraction": 0.1} if method == "combination" else {}
    num_rows = num_ids // 10 // DIST_BUCKETS * DIST_BUCKETS
    dist.barrier()
    rss_before = _reset_peak_rss()
    start = time.perf_counter()
    owned = exchange_profiles(local, DIST_BUCKETS, seed=0)
    owned_ids = owned.num_ids
    exchange_mb = _phase_peak(rss_before)
    exchanged = time.perf_counter()
    # The rank's embeddings (the input of the learned methods) are held to the end, as a caller's are.
    embeddings = IdEmbeddings(owned.ids, _id_vectors(owned.ids)) if method == "combination" else None
    fits = fit_owned_buckets(method, num_rows, DIST_BUCKETS, owned, embeddings, **hyper)
    del owned
    fit_mb = _phase_peak(rss_before)
    fitted = time.perf_counter()
    if sharded:
        shard = shard_mapping(method, num_rows, DIST_BUCKETS, fits, **hyper)
        del fits
        mapping = cosharded_remap(shard)
        checksum = _entry_checksum(shard.fits.entry_ids, shard.fits.entry_rows)
        mapping_mb = sum(b.numel() * b.element_size() for b in mapping.buffers()) / 2**20
    else:
        whole = gather_keyed_fits(fits, num_rows, DIST_BUCKETS)
        del fits
        mapping = assemble_keyed(method, num_rows, DIST_BUCKETS, whole, **hyper)
        del whole
        checksum, mapping_mb = mapping.fingerprint, mapping.nbytes / 2**20
    done = time.perf_counter()
    assemble_mb = _phase_peak(rss_before)
    dist.destroy_process_group()
    peak = rss_before + max(exchange_mb, fit_mb, assemble_mb)
    return {"rank": rank, "owned_ids": owned_ids, "exchange_s": exchanged - start, "fit_s": fitted - exchanged,
            "gather_s": done - fitted, "total_s": done - start, "peak_rss_mb": peak, "rank_mb": peak - base_rss,
            "exchange_mb": exchange_mb, "fit_phase_mb": fit_mb,
            "gather_mb": assemble_mb, "mapping_mb": mapping_mb, "fit_rss_mb": max(exchange_mb, fit_mb, assemble_mb),
            "fingerprint": checksum}


def distributed_pipeline_rank(num_ids: int, method: str, world_size: int, rank: int, parts_dir: str) -> dict:
    """Runs in a child process (one rank): the pipeline path of ``lhf fit --num-buckets 64`` at 10x
    compression (``fit_mappings``, the budget planned from the profile). On 2 ranks: the rank's share
    of the profile (exchange), the budget planned across the ranks, the fit of its buckets, the gather;
    on 1 rank: the one-process path on the whole profile. Times and peak RSS. On 2 ranks the rank drops its
    local profile once shared, as ``lhf fit`` does (``share_tables``)."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagConfig

    from lhf_torchrec.distributed.fit import share_profile
    from lhf_torchrec.mapping import IdEmbeddings
    from lhf_torchrec.pipeline.steps import fit_mappings

    local, base_rss = _rank_start(world_size, rank, parts_dir)
    table = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=num_ids, feature_names=["f"])
    dist.barrier()
    rss_before = _reset_peak_rss()
    start = time.perf_counter()
    profile = share_profile(local, DIST_BUCKETS, seed=0, table="t") if world_size > 1 else local
    del local
    shared = time.perf_counter()
    own_ids = profile.profile.ids if world_size > 1 else profile.ids
    embeddings = {"t": IdEmbeddings(own_ids, _id_vectors(own_ids))} if method == "combination" else None
    mapping = fit_mappings([table], {"t": profile}, method, compression=10, embeddings=embeddings,
                           num_buckets=DIST_BUCKETS).compression.mappings["t"]
    done = time.perf_counter()
    peak = _rss_mb()[1]
    dist.destroy_process_group()
    return {"rank": rank, "owned_ids": own_ids.size, "share_s": shared - start, "fit_s": done - shared,
            "total_s": done - start, "peak_rss_mb": peak, "fit_rss_mb": peak - rss_before, "rank_mb": peak - base_rss,
            "rows": mapping.num_rows,
            "fingerprint": mapping.fingerprint}


DIST_PATHS = {"library": distributed_fit_rank, "sharded": functools.partial(distributed_fit_rank, sharded=True),
              "pipeline": distributed_pipeline_rank}
_LIBRARY_COLUMNS = ("exchange_s", "fit_s", "gather_s", "total_s", "exchange_mb", "fit_phase_mb", "gather_mb",
                    "mapping_mb")
DIST_COLUMNS = {"library": _LIBRARY_COLUMNS, "sharded": _LIBRARY_COLUMNS, "pipeline": ("share_s", "fit_s", "total_s")}


def distributed_fit_rows(sizes, methods=("frequency", "combination"), on_row=None, path: str = "library",
                         world_sizes=DIST_WORLD_SIZES, repeats: int = 1) -> list:
    """Each (size, method) fitted on 1 and on 2 ranks (``world_sizes``, 1 first), side by side; every
    rank a fresh process that loads only its share of the profile (ids dealt round-robin: each id in one rank's data). ``path``: "library"
    (:func:`distributed_fit_rank`) or "pipeline" (:func:`distributed_pipeline_rank`). ``on_row(rows,
    pending)`` is called after each job (rows so far, jobs left), so a long run records what it has.
    "sharded": the library path ending with each rank's shard and co-sharded remap instead of the gather.
    ``repeats``: each job runs that many times (fresh processes each time), every number its median
    over the runs (a rank's peak RSS moves by 10-25% from run to run with the heap glibc keeps)."""
    import socket
    import tempfile

    from tqdm import tqdm

    rows = []
    jobs = [(n, m, w) for n in sizes for m in methods for w in world_sizes]
    profiles = {}
    measured = DIST_COLUMNS[path] + ("peak_rss_mb", "fit_rss_mb", "rank_mb")
    for num_ids, method, world_size in tqdm(jobs, desc=f"distributed fit ({path})"):
        profile = profiles.setdefault(num_ids, zipf_profile(num_ids, seed=0, sparse_ids=False))
        runs = []
        with tempfile.TemporaryDirectory(prefix="lhf-bench-distfit-") as parts_dir:
            for rank in range(world_size):
                np.save(os.path.join(parts_dir, f"ids{rank}.npy"), profile.ids[rank::world_size])
                np.save(os.path.join(parts_dir, f"counts{rank}.npy"), profile.counts[rank::world_size])
            for _ in range(repeats):
                with socket.socket() as s:
                    s.bind(("localhost", 0))
                    port = s.getsockname()[1]
                env = {**os.environ, "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}
                procs = [subprocess.Popen([sys.executable, __file__, "--dist-child", str(num_ids), method,
                                           str(world_size), str(rank), parts_dir, path], env=env,
                                          stdout=subprocess.PIPE, text=True)
                         for rank in range(world_size)]
                ranks = []
                for proc in procs:
                    out, _ = proc.communicate()
                    if proc.returncode:
                        raise RuntimeError(f"distributed fit of {num_ids} ids ({method}, {world_size} ranks, {path}) "
                                           "failed")
                    ranks.append(json.loads(out.strip().splitlines()[-1]))
                # A shard's checksum covers its entries: the ranks' add up to the whole mapping's.
                fingerprint = (f"{sum(r['fingerprint'] for r in ranks) % 2**64:016x}" if path == "sharded"
                               else ranks[0]["fingerprint"])[:12]
                runs.append({"ids_per_rank": max(r["owned_ids"] for r in ranks), "fingerprint": fingerprint,
                             **{k: max(r[k] for r in ranks) for k in measured}})
        if len({r["fingerprint"] for r in runs}) > 1:
            raise RuntimeError(f"distributed fit of {num_ids} ids ({method}, {world_size} ranks, {path}): the runs "
                               f"fitted different mappings ({sorted({r['fingerprint'] for r in runs})})")
        rows.append({"ids": num_ids, "method": method, "ranks": world_size, "ids_per_rank": runs[0]["ids_per_rank"],
                     **{k: statistics.median(r[k] for r in runs) for k in measured},
                     "repeats": repeats, "fingerprint": runs[0]["fingerprint"]})
        one = next(r for r in rows if (r["ids"], r["method"], r["ranks"]) == (num_ids, method, 1))
        row = rows[-1]
        row["time_vs_1_rank"] = row["total_s"] / one["total_s"]
        row["fit_rss_vs_1_rank"] = row["fit_rss_mb"] / one["fit_rss_mb"] if one["fit_rss_mb"] else float("nan")
        row["rank_vs_1_rank"] = row["rank_mb"] / one["rank_mb"]
        row["same_mapping"] = "yes" if row["fingerprint"] == one["fingerprint"] else "NO"
        if "mapping_mb" in row:  # the rank's peak over the output it keeps (a replicated mapping is whole on every rank)
            row["minus_mapping_mb"] = row["fit_rss_mb"] - row["mapping_mb"]
            row["minus_mapping_vs_1_rank"] = row["minus_mapping_mb"] / (one["fit_rss_mb"] - one["mapping_mb"])
        if on_row is not None:
            on_row(rows, jobs[len(rows):])
    return rows


def distributed_fit_section(done: dict, seconds: float, pending=()) -> str:
    """The "Distributed fit" subsection of docs/performance.md: a table per path of ``done`` (its rows)
    (``pending``: jobs not run yet, said so)."""
    columns = ["ids", "method", "ranks", "ids_per_rank", "repeats"]
    after = ["peak_rss_mb", "fit_rss_mb", "fit_rss_vs_1_rank", "rank_mb", "rank_vs_1_rank", "same_mapping"]

    def table(path: str) -> str:
        measured = list(DIST_COLUMNS[path])
        at = measured.index("total_s") + 1
        output = ["minus_mapping_mb", "minus_mapping_vs_1_rank"] if "mapping_mb" in measured else []
        return markdown_table(done[path], columns + measured[:at] + ["time_vs_1_rank"] + measured[at:] + after + output)

    return "\n".join([
        DIST_SUBSECTION,
        f"Command: `python benchmarks/mapping.py --distributed` ({seconds:.0f} s). {machine_description()}. "
        f"The same Zipf(1.1) profile (B = {DIST_BUCKETS} buckets; `combination` with 8-d embeddings fixed per id) "
        "fitted on 1 rank and on 2 gloo ranks, each rank a fresh process holding its share of the profile (ids "
        "dealt round-robin: each id in one rank's data). Times and RSS are the slowest / largest rank's; "
        "`fit_rss_mb` is the growth of the peak RSS over the RSS after loading the share (the peak is reset "
        "there), `peak_rss_mb` includes ~750 MB of imports (torch, TorchRec); `rank_mb` is the peak over the RSS "
        "before the rank loaded its share: everything its fit holds, its input included (a rank of 2 loads half "
        "the profile); `same_mapping`: the 2-rank mapping "
        "has the 1-rank one's fingerprint. Each rank runs one torch thread (the 2-rank fit uses 2 cores, the "
        "1-rank fit 1). The machine is shared with other jobs (load average above): absolute times are inflated "
        "and noisy; each 1-rank / 2-rank pair ran back to back.",
        "",
        "Library path (`lhf_torchrec.distributed.fit`, n / 10 rows; `combination` with `min_count=1`, hot 25%, "
        "hashed 10%): exchange by bucket, fit of the rank's own buckets, gather of every bucket's entries keyed "
        "by bucket hash (int64 key and int32 row, each rank keying and checking its own) and assembly of the whole "
        "mapping on every rank (as `fit_bucketed_distributed`: the exchanged profile is freed before the gather, "
        "the rank's own entries before the assembly; the rank's embeddings are held to the end, as a caller's "
        "are). Peak growth per phase over the same start: `exchange_mb`, `fit_phase_mb` (embeddings, fit), "
        "`gather_mb` (gather and assembly); `fit_rss_mb` is the largest; `mapping_mb`: the mapping's buffers; "
        "`minus_mapping_mb`: `fit_rss_mb` less `mapping_mb`, the rank's fitting memory beside the output it keeps "
        "(a replicated mapping is whole on every rank: that is what replicated asks for).",
        "",
        table("library"),
        "",
        "Sharded (the same fit, then `shard_mapping` and `cosharded_remap`: each rank keeps its buckets' entries "
        "and builds its co-sharded remap, `mapping_mb`; no gather): `same_mapping` compares an order-free checksum "
        "of the (id, row) entries, the ranks' shards added up, with the 1-rank shard's (all buckets).",
        "",
        table("sharded"),
        "",
        f"Pipeline path (what `lhf fit --num-buckets {DIST_BUCKETS} --compression 10` runs, "
        "`lhf_torchrec.pipeline.steps.fit_mappings` with the methods' defaults, a dim-16 table of n ids, SGD): "
        "on 2 ranks `share_s` is the exchange that leaves each rank the merged counts of its own buckets' ids, "
        "then `fit_s` plans the budget across the ranks (collectives over the ranks' count histograms and "
        "bucket splits), fits the rank's buckets and gathers the mapping; on 1 rank the one-process path "
        "(budget and fit on the whole profile). Neither holds the whole profile on a rank of 2. A rank of 2 drops "
        "its local profile once shared, as `lhf fit` does (`share_tables`); the library path's caller holds it to "
        "the end (`fit_bucketed_distributed` takes it as an argument).",
        "",
        table("pipeline"),
    ] + ([
        "",
        "Not measured yet (the run was stopped before them): "
        + ", ".join(f"{n:,} ids {m} on {w} rank(s) ({path})" for path, n, m, w in pending) + ".",
    ] if pending else []))


def _write_distributed_subsection(text: str, subsection: str = DIST_SUBSECTION) -> None:
    """Replaces (or adds) the distributed-fit subsection (or another ``subsection``) inside the Mapping
    section, leaving the rest as it is."""
    from lhf_torchrec.files import atomic_write

    path = "docs/performance.md"
    doc = open(path).read()
    start = doc.find(subsection + "\n")
    if start < 0:  # before the next section, at the end of the Mapping section
        mapping_start = doc.index("## Mapping (benchmarks/mapping.py)")
        after = doc.find("\n## ", mapping_start + 1)
        start = end = after + 1 if after >= 0 else len(doc)
        text += "\n\n"
    else:
        nxt = [i for i in (doc.find("\n### ", start + 1), doc.find("\n## ", start + 1)) if i >= 0]
        end = min(nxt) + 1 if nxt else len(doc)
        text += "\n\n" if nxt else "\n"
    with atomic_write(path) as f:
        f.write((doc[:start] + text + doc[end:]).encode())


def _kept_distributed_subsection() -> str:
    """The distributed-fit subsection now in docs/performance.md (with its leading blank lines), or ''."""
    doc = open("docs/performance.md").read() if os.path.exists("docs/performance.md") else ""
    start = doc.find(DIST_SUBSECTION + "\n")
    if start < 0:
        return ""
    nxt = [i for i in (doc.find("\n### ", start + 1), doc.find("\n## ", start + 1)) if i >= 0]
    return "\n\n" + doc[start:min(nxt) if nxt else len(doc)].rstrip("\n")


ZCH_MAX_PROBE = 128


def _zero_collision_hash(ids: torch.Tensor, identities: torch.Tensor, fallback: bool) -> torch.Tensor:
    """FBGEMM's ZCH lookup (TorchRec's HashZchManagedCollisionModule), read-only as its CPU path must be:
    the slot of each id, or -1 if absent (``fallback``: its first probe slot instead)."""
    slots, _ = torch.ops.fbgemm.zero_collision_hash(
        input=ids, identities=identities, max_probe=ZCH_MAX_PROBE, circular_probe=True, exp_hours=-1, readonly=True,
        local_sizes=None, offsets=None, metadata=None, output_on_uvm=False, disable_fallback=not fallback,
        _modulo_identity_DPRECATED=False, input_metadata=None, eviction_threshold=-1, eviction_policy=0,
        opt_in_prob=-1, num_reserved_slots=-1, opt_in_rands=None, runtime_meta=None)
    return slots


def _zch_insert(keys: torch.Tensor, identities: torch.Tensor) -> torch.Tensor:
    """Inserts ``keys`` into empty ZCH ``identities`` as the kernel's linear probing would (its CPU path
    cannot write): from each key's first probe slot, the lowest key takes a contested free slot, the
    others move on. The slot of each key, -1 when it found none within ``ZCH_MAX_PROBE`` probes."""
    flat = identities.view(-1)
    position = _zero_collision_hash(keys, identities, fallback=True)
    slot = torch.full_like(keys, -1)
    pending = torch.arange(keys.numel())
    owner = torch.full((flat.numel(),), keys.numel(), dtype=torch.int64)
    for _ in range(ZCH_MAX_PROBE):
        if not pending.numel():
            break
        at = position.index_select(0, pending)
        free = flat.index_select(0, at) == -1
        owner.scatter_reduce_(0, at[free], pending[free], "amin")
        won = free & (owner.index_select(0, at) == pending)
        flat[at[won]] = keys[pending[won]]
        slot[pending[won]] = at[won]
        owner[at[free]] = keys.numel()
        blocked = pending[~free]
        position[blocked] = (position[blocked] + 1) % flat.numel()
        pending = pending[~won]
    return slot


def zch_rows(num_ids: int, batch: int, reps: int) -> list:
    """The entry lookup of a sparse 64-bit ``frequency`` mapping: our perfect hash table vs FBGEMM's
    ``zero_collision_hash`` over the same entries (identities at the same load, then a gather of the
    slot's row), next to the plain gather; one torch thread."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    from lhf_torchrec.mapping import fit_mapping

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    profile = _spread_ids(zipf_profile(num_ids, seed=1, sparse_ids=False), "sparse 64-bit", rng)
    seen = profile.ids[rng.choice(profile.num_ids, size=batch, p=profile.counts / profile.counts.sum())]
    ids = torch.from_numpy(np.concatenate([seen, rng.integers(-(1 << 63), (1 << 63) - 1, size=batch // 100)]))
    mapping = fit_mapping(profile, method="frequency", num_rows=num_ids // 10)
    keys, rows = mapping.stored_entries()
    identities = torch.full((mapping.slot_keys.numel(), 1), -1, dtype=torch.int64)  # as many slots as ours
    start = time.perf_counter()
    slots = _zch_insert(keys, identities)
    insert_s = time.perf_counter() - start
    inserted = slots >= 0
    slot_rows = torch.full((identities.numel(),), -1, dtype=torch.int32)
    slot_rows[slots[inserted]] = rows[inserted].to(torch.int32)

    def zch_lookup():
        found_slots = _zero_collision_hash(ids, identities, fallback=False)
        return slot_rows.index_select(0, found_slots.clamp(min=0)).to(torch.int64), found_slots >= 0

    ours, theirs = mapping._lookup(ids), zch_lookup()
    agree = bool(torch.equal(ours[1], theirs[1]) and torch.equal(ours[0][ours[1]], theirs[0][theirs[1]]))
    floor_table = torch.randint(0, num_ids // 10, (num_ids,), dtype=torch.int32)
    floor_ids = torch.randint(0, num_ids, (ids.numel(),), dtype=torch.int64)
    times = time_median([lambda: floor_table.index_select(0, floor_ids), lambda: mapping._lookup(ids), zch_lookup], reps)
    torch.set_num_threads(threads)
    return [{"entry lookup": name, "entries": keys.numel(), "inserted": inserted_count, "build_s": build,
             "lookup/gather": t / times[0], "same rows as perfect_hash": ("yes" if agree else "no") if name != "perfect_hash" else "-"}
            for name, inserted_count, build, t in (
                ("perfect_hash", keys.numel(), "-", times[1]),
                ("FBGEMM zero_collision_hash, readonly + row gather", int(inserted.sum()), insert_s, times[2]))]


def apply_doc(rows: list, num_ids: int, batch: int, reps: int, zch: list) -> str:
    """The "Apply throughput" subsection."""
    def worst(storage: str, column: str) -> str:
        return f"{max(r[column] for r in rows if r['storage'].startswith(storage)):.2f}x"

    def over(storage: str) -> str:
        own = [r for r in rows if r["storage"].startswith(storage)]
        parts = []
        for label, keep in (("meet it", lambda r: r["compiled/gather"] <= APPLY_TARGET),
                            ("over it", lambda r: r["compiled/gather"] > APPLY_TARGET)):
            named = [f"{r['ids']} `{r['method']}`{_layout_label(r['storage'], storage)} {r['compiled/gather']:.2f}x"
                     for r in own if keep(r)]
            parts.append(f"{label}: " + (", ".join(named) if named else "none"))
        return "; ".join(parts)

    sparse = [s for s in ("perfect_hash", "sorted") if any(r["storage"].startswith(s) for r in rows)]
    verdict = ". ".join(f"`{s}` eager {worst(s, 'apply/gather')}, compiled {worst(s, 'compiled/gather')} "
                        f"(compiled rows that {over(s)})" for s in sparse)
    fitted_sparse = [r for r in rows if "(fitted)" in r["storage"] and r["ids"] != "dense"]
    fitted = (f"{max(r['apply/gather'] for r in fitted_sparse):.2f}x eager, "
              f"{max(r['compiled/gather'] for r in fitted_sparse):.2f}x compiled") if fitted_sparse else "none"
    kernel_rows = [r for r in rows if r["kernel"] == "yes"]
    kernel = (f"{min(r['torch_compiled/gather'] / r['compiled/gather'] for r in kernel_rows):.1f}-"
              f"{max(r['torch_compiled/gather'] / r['compiled/gather'] for r in kernel_rows):.1f}x") if kernel_rows else "-"
    return "\n".join([
        APPLY_SUBSECTION,
        f"{batch:,} lookups drawn from the access distribution of {num_ids:,} profiled ids, plus 1% never-seen ids "
        f"anywhere in int64; ids dense (a permutation of [0, {num_ids:,})), sparse 40-bit (random in [0, 2^40)) or "
        f"sparse 64-bit (random int64); mappings into {num_ids // 10:,} rows. Each fitted mapping is applied in every "
        "storage that can hold it (`with_storage`: the same function; dense only where the entries' span is small); "
        "`(fitted)` marks the storage the fit chose. `perfect_hash` comes in three slot layouts "
        "(`perfect_hash.slot_layout`): `split` (key, low and high row bits in three arrays; int32 keys relative to "
        "the smallest, or int64), `records` (key relative to the smallest and row in one int64, where their bits "
        "fit in 63: here the 40-bit ids) and `remainders` (full 64-bit keys: the mixed key above the row bits and "
        "the row in one int64, the key's low bits given back by the slot); a fitted `remainders` table is also "
        "timed in the `split` slots int64 keys took before it (same function, side by side). `hit` is the share of "
        "lookups that find an entry (the others are hashed by `hash_ids`). `kernel`: whether the mapping applies "
        "through the CPU kernel (`lhf_torchrec/mapping/native_lookup.c`, AVX-512, every slot layout; "
        "docs/method.md, \"Storage\"). `apply` is eager `mapping(ids)`; `compiled` the same mapping compiled "
        "as `mapping.compile()` does (`torch.compile` with `COMPILE_SETTINGS`: one graph, dynamic batch size, "
        "inductor's scalar C++ code, the kernel an op in it), once per mapping; `torch_compiled` the same mapping "
        "compiled with torch ops instead of the kernel (the path of CUDA and of CPUs without AVX-512; equal to "
        "`compiled` where there is no kernel); `compile_s` is the first call (a cold compile, inductor's caches "
        "off; the first one also loads inductor), and every compiled mapping gives the eager rows on these ids "
        "and on a batch of another size without recompiling (the kernel's rows are checked against the torch ops' "
        "too). `lookup/gather` times the storage alone in torch ops, eager (`_lookup`: finds the entries, hashes "
        "nothing). The floor is a plain `int32_table.index_select(0, int64_ids)` gather of as many ids from a "
        f"{num_ids:,}-row table, timed in the same interleaved reps; median of {reps} reps of the timing thread's "
        "CPU time, 1 torch thread. The box is shared with other jobs: absolute throughputs move with its load, "
        "the ratios much less. Only CPU was measured; on CUDA `torch.compile` generates triton code instead "
        "(not checked).",
        "",
        markdown_table(rows, ["ids", "method", "storage", "entries", "hit", "mapping_mb", "kernel", "gather_Mids_s",
                              "apply_Mids_s", "compiled_Mids_s", "apply/gather", "compiled/gather",
                              "torch_compiled/gather", "lookup/gather", "compile_s"]),
        "",
        f"Target for sparse storages: <= {APPLY_TARGET:g}x the gather. The storages the fit chose for sparse ids: "
        f"worst {fitted}. Worst of every storage: {verdict}. The kernel against the same mapping compiled with "
        f"torch ops: {kernel} faster (torch's CPU capability on this machine: "
        f"{torch.backends.cpu.get_cpu_capability()}; the kernel needs AVX512). Blocks of 32 ids go through three "
        "stages as a pipeline, eight ids at a time in AVX-512 (mix and group; slot from the pilot; read, compare "
        "and hash the misses), each stage prefetching what the next one reads, so the next blocks' random reads "
        "are in flight while one block is compared; in torch ops the lookup of a table that "
        "outgrows the caches (1e6 entries, 8.4-8.5 MB of slots) is a chain of dependent reads (pilot, then slot) "
        "between ~40 scalar int64 ops: inductor's fused loop keeps few reads in flight, and reading the slots in "
        "an op of their own (`lhf_torchrec::gather_apart`, tables over `perfect_hash.APART_BYTES`) still leaves "
        "the scalar slot arithmetic at about one gather (\"What the apply tried before the kernel\" below). "
        "Eager torch ops make every element-wise op a pass over the ids (~20-25 passes), hence the `split` rows' "
        "`apply/gather` (small tables: no kernel, compile them). `sorted` is a binary search (~20 dependent reads "
        "per id) either way. `cpp.simdlen: 1` in `COMPILE_SETTINGS`: inductor's vectorized CPU code moves every "
        "gathered element through a stack buffer, 2-3x slower than its scalar loads for a plain gather (one-off, "
        "AVX2, 2026-11-30).",
        "",
        "FBGEMM's `torch.ops.fbgemm.zero_collision_hash` (TorchRec's `HashZchManagedCollisionModule`; its CPU path "
        "is read-only at lookup) on the entries of the sparse 64-bit `frequency` mapping, with as many identity "
        "slots as our table (~96% load), then a gather of the slot's row: its slot is the output row in TorchRec, "
        "while our entries share rows (clusters, hot rows), hence the extra gather.",
        "",
        markdown_table(zch, ["entry lookup", "entries", "inserted", "build_s", "lookup/gather",
                             "same rows as perfect_hash"]),
        "",
        "Not used: a linear-probing table needs probe sequences (data-dependent length; `max_probe` bounds "
        "them, and an id that does not fit within it is silently not inserted), its layout is defined by the "
        "kernel's insert order and hash rather than a fixed function we can rebuild bit for bit in a checksum, and "
        "our lookup runs the same function on CUDA (torch ops) and CPU (the kernel or torch ops).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1e5 and 1e6 only")
    parser.add_argument("--large", action="store_true", help="also 1e8 ids (about an hour, ~12 GB)")
    parser.add_argument("--fit-only", action="store_true", help="only the fit table (no apply rows)")
    parser.add_argument("--fresh", action="store_true", help=f"forget the fits recorded in {FIT_RUNS} first")
    parser.add_argument("--sizes", type=float, nargs="+", help="fit only these numbers of ids (e.g. 1e8)")
    parser.add_argument("--methods", nargs="+", choices=FIT_METHODS, default=FIT_METHODS, help="fit only these methods")
    parser.add_argument("--child", nargs=2, metavar=("IDS", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--distributed", action="store_true",
                        help="only the distributed fit, library, sharded and pipeline paths: 1e6 and 1e7 ids on 1 "
                             "and 2 gloo ranks (--quick: 1e6)")
    parser.add_argument("--paths", nargs="+", choices=list(DIST_PATHS),
                        help="with --distributed: only these paths (like --sizes and --methods: a slice, printed "
                             "and not written to docs/performance.md)")
    parser.add_argument("--world-sizes", type=int, nargs="+",
                        help=f"with --distributed: these numbers of ranks, 1 first (a slice; default "
                             f"{' '.join(map(str, DIST_WORLD_SIZES))}; each rank a process: more ranks than cores "
                             f"time nothing, their memory still counts)")
    parser.add_argument("--dist-repeats", type=int, default=1,
                        help="with --distributed: run each job this many times, every number the median of the runs")
    parser.add_argument("--apply", action="store_true",
                        help="only the apply throughput table (replaces its subsection of docs/performance.md)")
    parser.add_argument("--apply-scale", action="store_true",
                        help="only the apply of 1e6 and 1e7 random 64-bit keys (--large: and 1e8, ~10 GB), the "
                             "kernel and compiled torch ops next to a gather (replaces its subsection of "
                             "docs/performance.md)")
    parser.add_argument("--dist-child", nargs=6, metavar=("IDS", "METHOD", "WORLD", "RANK", "DIR", "PATH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fit_once(int(args.child[0]), args.child[1])))
        return
    if args.dist_child:
        n, method, world, rank, parts_dir, path = args.dist_child
        print(json.dumps(DIST_PATHS[path](int(n), method, int(world), int(rank), parts_dir)))
        return
    if args.distributed:
        started = time.perf_counter()
        sizes = [int(n) for n in args.sizes] if args.sizes else [10**6] if args.quick else [10**6, 10**7]
        paths = args.paths or list(DIST_PATHS)
        # Sharded rows: combination only, the method whose replicated assembly dominates a rank's memory.
        methods = {path: [m for m in args.methods if path != "sharded" or m == "combination"] for path in paths}
        world_sizes = tuple(args.world_sizes or DIST_WORLD_SIZES)
        if world_sizes[0] != 1 or any(DIST_BUCKETS % w for w in world_sizes):
            parser.error(f"--world-sizes must start with 1 and divide {DIST_BUCKETS} buckets, got {list(world_sizes)}")
        whole_run = not args.sizes and not args.paths and tuple(args.methods) == FIT_METHODS and not args.world_sizes
        done = {path: [] for path in DIST_PATHS}
        jobs = [(path, n, m, w) for path in paths for n in sizes for m in methods[path] for w in world_sizes]

        def record(path):
            def on_row(rows, _pending):
                done[path] = rows
                left = jobs[sum(len(r) for r in done.values()):]
                text = distributed_fit_section(done, time.perf_counter() - started, left)
                if whole_run:  # a slice (--sizes, --methods, --paths) prints its rows only
                    _write_distributed_subsection(text)
                print(text if not left else json.dumps(rows[-1]), flush=True)
            return on_row

        for path in paths:
            distributed_fit_rows(sizes, methods[path], on_row=record(path), path=path, world_sizes=world_sizes,
                                 repeats=args.dist_repeats)
        return

    if args.apply:
        started = time.perf_counter()
        text = apply_doc(apply_rows(10**6, batch=10**6, reps=args.reps), 10**6, 10**6, args.reps,
                         zch_rows(10**6, 10**6, args.reps))
        text = text.replace("\n", f"\n`python benchmarks/mapping.py --apply --reps {args.reps}` "
                            f"({time.perf_counter() - started:.0f} s). {machine_description()}.\n\n", 1)
        _write_distributed_subsection(text, APPLY_SUBSECTION)
        print(text)
        return

    if args.apply_scale:
        started = time.perf_counter()
        command = "python benchmarks/mapping.py --apply-scale" + (" --large" if args.large else "") + f" --reps {args.reps}"
        text = scale_doc(scale_rows([10**6, 10**7] + ([10**8] if args.large else []), 10**6, args.reps), 10**6, args.reps)
        text = text.replace("\n", f"\n`{command}` ({time.perf_counter() - started:.0f} s). {machine_description()}.\n\n", 1)
        _write_distributed_subsection(text, SCALE_SUBSECTION)
        print(text)
        return

    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7] + ([10**8] if args.large else [])
    sizes = [int(n) for n in args.sizes] if args.sizes else sizes
    started = time.perf_counter()
    fits = fit_rows(sizes, args.methods, fresh=args.fresh)
    command = ("python benchmarks/mapping.py" + (" --quick" if args.quick else "") + (" --large" if args.large else "")
               + (" --fit-only" if args.fit_only else "") + (f" --sizes {' '.join(f'{n:.0e}' for n in sizes)}" if args.sizes else "")
               + (f" --methods {' '.join(args.methods)}" if tuple(args.methods) != FIT_METHODS else ""))
    fit_text = fit_section(fits, command)
    if args.fit_only:
        print(fit_text)
        _write_fit_subsection(fit_text)
        return
    applies = apply_rows(10**6, batch=10**6, reps=args.reps)
    total = time.perf_counter() - started

    body = "\n".join([
        f"Command: `{command}` ({total:.0f} s). {machine_description()}.",
        "",
        fit_text,
        "",
        apply_doc(applies, 10**6, 10**6, args.reps, zch_rows(10**6, 10**6, args.reps)),
    ])
    print(body)
    # The distributed-fit subsection comes from another run (--distributed): keep it.
    write_doc_section("docs/performance.md", "Mapping (benchmarks/mapping.py)", body + _kept_distributed_subsection())


if __name__ == "__main__":
    main()
