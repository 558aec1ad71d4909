"""Benchmark of reading a CSV: a pass over the text against a pass over its parse cache.

    .venv/bin/python benchmarks/data.py            # 1,000,000 rows, Criteo-shaped (~6 minutes on 2 cores)
    .venv/bin/python benchmarks/data.py --quick    # 20,000 rows

The file is Criteo-shaped: a 0/1 label, 13 integer counts, 26 categorical columns of 8-hex-digit ids
drawn from a Zipf(1.2) law (most accesses on few ids, a long tail seen once), 2% of the fields empty.
Timed, each in the same process, one after the other (wall clock):

* ``count records``: the pass that counts records (``CSVSource.record_counts``: the ``csv`` reader alone);
* ``pass over the text``: every record parsed and converted (what every pass cost before the cache);
* ``build the cache``: the pass that parses every record once more and writes the npy arrays, plus
  their checksums (``CSVSource.cache`` on a cold cache, after the count above);
* ``open the cache``: another process's ``cache()`` on a warm cache (reads the manifest, checks every
  array's sha256);
* ``pass over the cache``: the same rows as the text pass, read through the memory maps.

A training run reads the data several times (table sizes, profiles, the learn step's epochs, every
method's epochs, validation and test), each once over the text before the cache. Results are printed
and written to docs/performance.md (section "CSV reading").
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

from lhf_torchrec.data import CSVSource, CSVSpec  # noqa: E402

DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
BLOCK = 50_000


def write_criteo_like_csv(path: str, rows: int, seed: int = 0) -> None:
    """``rows`` Criteo-shaped records (see the module docstring)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(",".join(["label", *DENSE, *CATEGORICAL]) + "\n")
        for start in range(0, rows, BLOCK):
            n = min(BLOCK, rows - start)
            labels = (rng.random(n) < 0.25).astype(int)
            counts = rng.geometric(0.01, (n, len(DENSE))) - 1
            ids = (rng.zipf(1.2, (n, len(CATEGORICAL))) * 2654435761) % (1 << 32)
            empty = rng.random((n, len(DENSE) + len(CATEGORICAL))) < 0.02
            for i in range(n):
                fields = [str(c) for c in counts[i]] + [f"{int(x):08x}" for x in ids[i]]
                fields = ["" if e else v for v, e in zip(fields, empty[i])]
                f.write(f"{labels[i]}," + ",".join(fields) + "\n")


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows")
    parser.add_argument("--rows", type=int, help="rows of the file (default 1,000,000, --quick 20,000)")
    parser.add_argument("--doc", default="docs/performance.md")
    args = parser.parse_args()
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    spec = CSVSpec(label="label", dense=DENSE, categorical=CATEGORICAL, transforms={c: "log1p" for c in DENSE})
    work = tempfile.mkdtemp(prefix="lhf-data-bench-")
    try:
        path = os.path.join(work, "criteo_like.csv")
        write_criteo_like_csv(path, rows)
        cache_dir = os.path.join(work, "cache")

        def full_pass(source: CSVSource) -> None:
            assert sum(len(chunk) for chunk in source.chunks(1 << 16)) == rows

        text = CSVSource(path, spec)
        results = [("count records", timed(text.record_counts)), ("pass over the text", timed(lambda: full_pass(text)))]
        cached = CSVSource(path, spec)
        cached.record_counts()  # counted above: the build below is the parse and the writes
        results.append(("build the cache", timed(lambda: cached.cache(cache_dir, progress=False))))
        reopened = CSVSource(path, spec)
        results.append(("open the cache", timed(lambda: reopened.cache(cache_dir, progress=False))))
        results.append(("pass over the cache", timed(lambda: full_pass(reopened))))
        folder = reopened.cache(cache_dir, progress=False)
        cache_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        text_mb = os.path.getsize(path) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text_pass = results[1][1]
    table = markdown_table([{"step": step, "seconds": round(s, 3), "records_per_s": int(rows / s) if s else 0,
                             "vs_text_pass": round(s / text_pass, 4)} for step, s in results],
                           ["step", "seconds", "records_per_s", "vs_text_pass"])
    command = "python benchmarks/data.py" + (" --quick" if args.quick else "") + (f" --rows {args.rows}" if args.rows else "")
    body = (f"Command: `{command}`. {machine_description()}.\n\n"
            f"{rows:,} records, {len(DENSE)} dense and {len(CATEGORICAL)} categorical columns ({text_mb:,.0f} MB of "
            f"text; the parse cache takes {cache_mb:,.0f} MB). Wall clock of each step, once each, in one process.\n\n"
            f"{table}\n\n"
            f"A pass over the cache costs {results[4][1] / text_pass:.1%} of a pass over the text; building the cache "
            f"costs {results[2][1] / text_pass:.2f} text passes after the count, so it pays for itself from a run's second "
            f"pass on, and every later run on the same file starts from it ({results[3][1]:.2f} s to open and check).\n")
    print(body)
    write_doc_section(args.doc, "CSV reading (benchmarks/data.py)", body)


if __name__ == "__main__":
    main()
