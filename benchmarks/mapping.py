"""Benchmark of the mapping library: fit time and peak memory by vocabulary size, apply throughput.

    .venv/bin/python benchmarks/mapping.py            # fits of 1e5, 1e6, 1e7 ids (~10 minutes on 2 cores)
    .venv/bin/python benchmarks/mapping.py --large    # and 1e8 ids (about an hour more; needs ~12 GB free)
    .venv/bin/python benchmarks/mapping.py --quick    # 1e5, 1e6 ids

Fit: every size runs in a fresh subprocess (so peak RSS is that fit's own), on a Zipf(1.1) access
profile over n distinct ids with random 8-d embeddings, fitting ``frequency`` and ``combination``
(hot 25%, hashed 10%, every other id clustered: ``min_count=1``) into n / 10 rows. The profile
and embeddings are the user's input (1e8 ids: 0.8 + 0.8 GB of profile, 3.2 GB of vectors); the
fit's own memory is the growth of peak RSS over the RSS before the fit (the peak is reset there).

Apply: ids drawn from the same access distribution (1% never seen), mapped by a fitted mapping,
next to a plain gather ``table[ids]`` from an int32 tensor as long as the dense mapping's table,
measured interleaved in one process; medians of repeated runs.

Results are printed and written to docs/performance.md (section "Mapping").
"""

import argparse
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


def fit_once(num_ids: int, method: str) -> dict:
    """Runs in a child process: one fit, its wall time, the process's peak RSS and the fit's own growth."""
    from lhf_torchrec.mapping import IdEmbeddings, fit_mapping

    profile = zipf_profile(num_ids, seed=0, sparse_ids=False)
    embeddings = IdEmbeddings(profile.ids, torch.randn(num_ids, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
    setup_peak = _rss_mb()[1]
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak: the fit's own peak is measured from here
        f.write("5")
    rss_before = _rss_mb()[0]
    hyper = {"min_count": 1, "hot_fraction": 0.25, "hashed_fraction": 0.1} if method == "combination" else {}
    start = time.perf_counter()
    mapping = fit_mapping(profile, method=method, num_rows=max(1, num_ids // 10),
                          embeddings=embeddings if method == "combination" else None, **hyper)
    seconds = time.perf_counter() - start
    fit_peak = _rss_mb()[1]
    return {"ids": num_ids, "method": method, "rows": mapping.num_rows, "fit_s": seconds,
            "input_mb": rss_before, "peak_rss_mb": max(setup_peak, fit_peak), "fit_rss_mb": fit_peak - rss_before,
            "mapping_mb": mapping.nbytes / 2**20, "storage": mapping.storage}


def time_median(fns, reps: int):
    """Median seconds of each function, run interleaved so drifts hit all alike."""
    samples = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


APPLY_CASES = [  # (ids, method, hyper-parameters): each storage layout once
    ("dense", "hash", {}),
    ("dense, all seen", "combination", {"min_count": 1}),  # every id has an entry: dense storage
    ("dense", "combination", {"min_count": 1}),
    ("dense", "frequency", {}),  # the hot 5% of ids spread over the whole range: sorted storage
    ("sparse", "frequency", {}),
    ("sparse", "combination", {"min_count": 1}),
]


def apply_rows(num_ids: int, batch: int, reps: int) -> list:
    from lhf_torchrec.mapping import IdEmbeddings, fit_mapping

    rows = []
    for kind, method, hyper in APPLY_CASES:
        profile = zipf_profile(num_ids, seed=1, sparse_ids=kind == "sparse")
        rng = np.random.default_rng(2)
        seen = profile.ids[rng.choice(profile.num_ids, size=batch, p=profile.counts / profile.counts.sum())]
        unseen = rng.integers(-(1 << 62), 1 << 62, size=0 if kind.endswith("all seen") else batch // 100)
        ids = torch.from_numpy(np.concatenate([seen, unseen])[rng.permutation(seen.size + unseen.size)])
        embeddings = IdEmbeddings(profile.ids, torch.randn(num_ids, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
        mapping = fit_mapping(profile, method=method, num_rows=num_ids // 10,
                              embeddings=embeddings if method == "combination" else None, **hyper)
        span = mapping.table.numel() if mapping.storage == "dense" else num_ids
        floor_table = torch.randint(0, mapping.num_rows, (span,), dtype=torch.int32)
        floor_ids = torch.randint(0, span, (ids.numel(),), dtype=torch.int64)
        t_apply, t_gather = time_median([lambda: mapping(ids), lambda: floor_table.index_select(0, floor_ids)], reps)
        rows.append({"ids": "sparse 40-bit" if kind == "sparse" else kind, "method": method,
                     "storage": mapping.storage, "mapping_mb": mapping.nbytes / 2**20,
                     "apply_Mids_s": ids.numel() / t_apply / 1e6, "gather_Mids_s": ids.numel() / t_gather / 1e6,
                     "apply/gather": t_apply / t_gather})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1e5 and 1e6 only")
    parser.add_argument("--large", action="store_true", help="also 1e8 ids (about an hour, ~12 GB)")
    parser.add_argument("--child", nargs=2, metavar=("IDS", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fit_once(int(args.child[0]), args.child[1])))
        return

    from tqdm import tqdm

    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7] + ([10**8] if args.large else [])
    started = time.perf_counter()
    fits = []
    jobs = [(n, m) for n in sizes for m in ("frequency", "combination")]
    for n, method in tqdm(jobs, desc="fit"):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), method], check=True,
                             capture_output=True, text=True)
        fits.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in fits:
        base = next(r for r in fits if r["method"] == row["method"] and r["ids"] == 10**6)
        row["time_per_id_vs_1e6"] = (row["fit_s"] / row["ids"]) / (base["fit_s"] / base["ids"])
    applies = apply_rows(10**6, batch=10**6, reps=args.reps)
    total = time.perf_counter() - started

    fit_table = markdown_table(fits, ["ids", "method", "rows", "storage", "fit_s", "time_per_id_vs_1e6",
                                      "input_mb", "peak_rss_mb", "fit_rss_mb", "mapping_mb"])
    apply_table = markdown_table(applies, ["ids", "method", "storage", "mapping_mb", "apply_Mids_s",
                                           "gather_Mids_s", "apply/gather"])
    command = "python benchmarks/mapping.py" + (" --quick" if args.quick else "") + (" --large" if args.large else "")
    body = "\n".join([
        f"Command: `{command}` ({total:.0f} s). {machine_description()}.",
        "",
        "### Fit time and peak memory",
        "Zipf(1.1) profile over n distinct ids, 8-d random embeddings, n / 10 rows (`combination`: hot 25%, "
        "hashed 10%, `min_count=1`, so about 97% of the ids are k-means'd into 65% of the rows); each fit in a "
        "fresh process. `input_mb` is the RSS before the fit (interpreter, torch, the profile and the "
        "embeddings: the user's input), `peak_rss_mb` the process's peak, `fit_rss_mb` the fit's own growth "
        "(peak during the fit minus `input_mb`); `time_per_id_vs_1e6` is the fit time per id relative to the "
        "1e6 run (1.0 = linear; the target is <= 1.3 up to 1e8). The machine was shared and loaded (see above): "
        "times are slower than on a quiet machine, and their ratios noisier.",
        "",
        fit_table,
        "",
        "### Apply throughput",
        f"1e6 lookups drawn from the access distribution of 1e6 profiled ids (plus 1% never-seen 64-bit ids, except "
        f"in the 'all seen' row), mapping into 1e5 rows; "
        f"median of {args.reps} interleaved runs. The floor is a plain `int32_table.index_select(0, int64_ids)` gather of the same "
        "number of ids from a table as long as the dense mapping's (or 1e6 for the others), with `index_select`, "
        "the fastest plain gather on CPU. The target for dense storage is apply/gather <= 1.5.",
        "",
        apply_table,
    ])
    print(body)
    write_doc_section("docs/performance.md", "Mapping (benchmarks/mapping.py)", body)


if __name__ == "__main__":
    main()
