"""Benchmark of reading a CSV: a pass over the text against a pass over its parse cache.

    .venv/bin/python benchmarks/data.py            # 1,000,000 rows, Criteo-shaped (~6 minutes on 2 cores)
    .venv/bin/python benchmarks/data.py --quick    # 20,000 rows

The file is Criteo-shaped: a 0/1 label, 13 integer counts, 26 categorical columns of 8-hex-digit ids
drawn from a Zipf(1.2) law (most accesses on few ids, a long tail seen once), 2% of the fields empty.
Timed, each in the same process, one after the other (wall clock):

* ``count records``: the pass that counts records (``CSVSource.record_counts``: the ``csv`` reader alone);
* ``pass over the text``: every record parsed and converted (what every pass cost before the cache);
* ``build the cache``: the pass that parses every record once more and writes the npy arrays, plus
  their checksums (``CSVSource.cache`` on a cold cache, after the count above), in this process alone
  (``workers=0``) and with the default DataLoader workers converting the blocks;
* ``open the cache``: another process's ``cache()`` on a warm cache (reads the manifest, checks every
  array's sha256);
* ``pass over the cache``: the same rows as the text pass, read through the memory maps.

A training run reads the data several times (table sizes, profiles, the learn step's epochs, every
method's epochs, validation and test), each once over the text before the cache. Results are printed
and written to docs/performance.md (section "CSV reading").
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

from lhf_torchrec.data import CSVSource, CSVSpec  # noqa: E402
from lhf_torchrec.data.tabular import _MAX_PARSE_WORKERS  # noqa: E402

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


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the parse workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(work) -> tuple[float, float]:
    """(wall, CPU) seconds of ``work()``."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    work()
    return time.perf_counter() - start, _cpu_seconds() - cpu


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
        alone = CSVSource(path, spec)
        alone.record_counts()  # counted above: the builds below are the parse and the writes
        results.append(("build the cache, 1 process",
                        timed(lambda: alone.cache(os.path.join(work, "alone"), progress=False, workers=0))))
        cached = CSVSource(path, spec)
        cached.record_counts()
        results.append((f"build the cache, {_MAX_PARSE_WORKERS} workers",
                        timed(lambda: cached.cache(cache_dir, progress=False))))
        reopened = CSVSource(path, spec)
        results.append(("open the cache", timed(lambda: reopened.cache(cache_dir, progress=False))))
        results.append(("pass over the cache", timed(lambda: full_pass(reopened))))
        folder = reopened.cache(cache_dir, progress=False)
        cache_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        text_mb = os.path.getsize(path) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {step: wall for step, (wall, _) in results}
    text_pass = results[1][1][0]
    table = markdown_table([{"step": step, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                             "records_per_s": int(rows / wall) if wall else 0,
                             "vs_text_pass": round(wall / text_pass, 4)} for step, (wall, cpu) in results],
                           ["step", "seconds", "cpu_seconds", "records_per_s", "vs_text_pass"])
    alone, parallel = results[2][1][0], results[3][1][0]
    command = "python benchmarks/data.py" + (" --quick" if args.quick else "") + (f" --rows {args.rows}" if args.rows else "")
    body = (f"Command: `{command}`. {machine_description()}.\n\n"
            f"{rows:,} records, {len(DENSE)} dense and {len(CATEGORICAL)} categorical columns ({text_mb:,.0f} MB of "
            f"text; the parse cache takes {cache_mb:,.0f} MB). Wall clock and CPU time (this process and its parse "
            f"workers) of each step, once each, one after the other; the parse workers are the cores' share the other "
            f"jobs on the machine leave (load average above).\n\n"
            f"{table}\n\n"
            f"A pass over the cache costs {seconds['pass over the cache'] / text_pass:.1%} of a pass over the text; "
            f"building the cache in one process costs {alone / text_pass:.2f} text passes after the count, "
            f"{parallel / text_pass:.2f} with {_MAX_PARSE_WORKERS} workers ({alone / parallel:.2f}x faster), so it pays for "
            f"itself from a run's second pass on, and every later run on the same file starts from it "
            f"({seconds['open the cache']:.2f} s to open and check).\n")
    print(body)
    write_doc_section(args.doc, "CSV reading (benchmarks/data.py)", body)


if __name__ == "__main__":
    main()
