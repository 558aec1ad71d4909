"""Benchmark of the learn step's memory: a row for every profiled id, or only for the well-observed ones.

    .venv/bin/python benchmarks/learn_step.py            # 1e7 distinct ids (~5 minutes on 2 cores)
    .venv/bin/python benchmarks/learn_step.py --quick    # 1e5 distinct ids

One table whose profile holds n distinct ids with Zipf(1.0) access counts, 10 accesses per id on
average (most ids are seen a few times, a few percent at least 10 times), with dense ids (0..n-1,
the table's own rows) and sparse 40-bit ids (behind a mapping). Each case runs
:func:`~lhf_torchrec.pipeline.steps.learn_model` (8-d, batch 1024) in a fresh subprocess, so
its peak RSS is that learn step's own, at two floors:

* ``min_count=1``: a row for every profiled id, what the learn step trained before it had a floor
  (the same rows and mapping as main's full tables: the table itself for dense ids, a vocabulary
  of n + 1 rows for sparse ones);
* ``min_count=10`` (``MIN_COUNT``, the learned methods' clustering floor): a row per id seen at
  least 10 times, the others hashed into a region of a tenth of those rows.

The learn model trains on 8 batches drawn from the same access law: its tables and their optimizer
state are allocated when the model is built, so more steps would change no memory (the memory
measured does not depend on the data's length; the quality of the embeddings is measured by the
quality benchmark, docs/results.md). Table + optimizer bytes are the learn model's rows x
``row_bytes`` (fp32 weights and row-wise Adagrad's one float per row); peak RSS is the process's
during the learn step (``VmHWM`` reset when it starts, Linux), which holds the returned embeddings and
their copy sent to the other ranks (``broadcast_object_list``) too.

Results are printed and written to docs/performance.md (section "Learn step").
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

DIM = 8
BATCH = 1024
STEPS = 8
MEAN_ACCESSES = 10
FLOORS = (1, 10)


def zipf_counts(num_ids: int) -> np.ndarray:
    """Access counts by popularity rank: Zipf(1.0), ``MEAN_ACCESSES`` per id on average, at least 1."""
    ranks = np.arange(1, num_ids + 1, dtype=np.float64)
    scale = MEAN_ACCESSES * num_ids / np.log(num_ids)
    return np.maximum(1, np.round(scale / ranks)).astype(np.int64)


def learn_once(num_ids: int, sparse_ids: bool, min_count: int) -> dict:
    """Runs in a child process: one learn step, its memory and time."""
    from torchrec import EmbeddingBagConfig

    from lhf_torchrec.data import CTRData
    from lhf_torchrec.mapping import IdProfile
    from lhf_torchrec.mapping.budget import row_bytes
    from lhf_torchrec.mapping.tables import learn_mappings
    from lhf_torchrec.pipeline.steps import learn_model
    from lhf_torchrec.training.runtime import init_runtime
    from lhf_torchrec.training.trainer import TrainConfig

    rng = np.random.default_rng(0)
    counts = zipf_counts(num_ids)
    ids = rng.choice(1 << 40, size=num_ids, replace=False) if sparse_ids else rng.permutation(num_ids)
    ids = ids.astype(np.int64)  # ids[r]: the id of popularity rank r
    accesses = ids[np.searchsorted(np.cumsum(counts), rng.integers(0, counts.sum(), STEPS * BATCH), side="right")]
    train = CTRData(dense=rng.random((accesses.size, 1), np.float32), sparse=accesses[:, None],
                    labels=(rng.random(accesses.size) < 0.25).astype(np.float32), dense_names=["d"],
                    sparse_names=["ids"])
    order = np.argsort(ids)
    profile = IdProfile(ids[order], counts[order], int(counts.sum()))
    table = EmbeddingBagConfig(name="t_ids", embedding_dim=DIM, num_embeddings=(1 << 40) if sparse_ids else num_ids,
                               feature_names=["ids"])
    config = TrainConfig(batch_size=BATCH, progress=False)
    mapping = learn_mappings({"t_ids": profile}, [table], min_count, config.seed).get("t_ids")
    rows = mapping.num_rows if mapping is not None else num_ids
    runtime = init_runtime()
    del accesses, counts, ids, order
    rss_before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM: from here on it is the learn step's peak
        f.write("5")
    start = time.perf_counter()
    embeddings = learn_model(train, [table], {"t_ids": profile}, dim=DIM, min_count=min_count,
                             train_config=config, runtime=runtime).embeddings
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {
        "ids": "sparse 40-bit" if sparse_ids else "dense",
        "min_count": min_count,
        "ids embedded": int(embeddings["t_ids"].ids.size),
        "learn rows": rows,
        "tables + optimizer MB": rows * row_bytes(DIM, config.optimizer) / 2**20,
        "mapping MB": (mapping.nbytes if mapping is not None else 0) / 2**20,
        "RSS before MB": rss_before / 2**20,
        "peak RSS MB": peak / 2**20,
        "growth MB": (peak - rss_before) / 2**20,
        "seconds": seconds,
    }


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def run_child(num_ids: int, sparse_ids: bool, min_count: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(num_ids), str(int(sparse_ids)), str(min_count)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"learn step on {num_ids} ids failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list, num_ids: int, command: str, seconds: float) -> str:
    """The doc section's text: the setting and a table of ``rows`` (one per :func:`learn_once`)."""
    for row in rows:
        before = next(r for r in rows if r["ids"] == row["ids"] and r["min_count"] == 1)
        row["of min_count=1"] = (f"{row['tables + optimizer MB'] / before['tables + optimizer MB']:.3f} / "
                                 f"{row['growth MB'] / before['growth MB']:.3f}")
    counts = zipf_counts(num_ids)
    kept = counts >= 10
    columns = ["ids", "min_count", "ids embedded", "learn rows", "tables + optimizer MB", "mapping MB",
               "RSS before MB", "peak RSS MB", "growth MB", "of min_count=1", "seconds"]
    return f"""Command: `{command}` ({seconds:.0f} s; {machine_description()}; the machine was
shared with other jobs, so the seconds are loose). One table of {num_ids:,} distinct ids, Zipf(1.0)
access counts, {MEAN_ACCESSES} accesses per id on average: {int(kept.sum()):,} ids ({kept.mean():.1%}) are
seen at least 10 times and carry {counts[kept].sum() / counts.sum():.0%} of the accesses. Each row is
`learn_model` (dim {DIM}, batch {BATCH}, {STEPS} steps: the tables and their optimizer state exist
from the first step, so more steps change no memory) in a fresh process. `min_count=1` gives every
profiled id a row, as the learn step did before it had a floor (the table itself for dense ids, a
vocabulary of n + 1 rows for sparse ones); `min_count=10` (the learned methods' clustering floor)
gives a row to each id seen at least 10 times and hashes the others into a tenth as many rows
(`mapping/tables.py` `learn_mappings`). Tables + optimizer: rows x (fp32 weights + row-wise
Adagrad's one float per row). RSS before: the process's resident memory when the learn step starts
(torch and TorchRec imported, the profile and data built); peak RSS: its peak during the learn step
(Linux `VmHWM`, reset when the step starts), which holds the model, the trained weights gathered on
rank 0, the returned embeddings and their copy broadcast to the other ranks; growth: peak - before.
"of min_count=1": tables + optimizer, and growth, as a share of the `min_count=1` row with the same ids.

{markdown_table(rows, columns)}

At `min_count=10` most of the growth is not the tables: fitting the learn mapping ranks every profiled
id by its count, and those temporaries scale with the profile (16 bytes per id already held), not with
the learn model's rows.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e5 ids")
    parser.add_argument("--num-ids", type=int, help="distinct ids of the profile (default 1e7, --quick 1e5)")
    parser.add_argument("--doc", default="docs/performance.md")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(learn_once(args.child[0], bool(args.child[1]), args.child[2])))
        return
    num_ids = args.num_ids or (100_000 if args.quick else 10_000_000)
    started = time.perf_counter()
    rows = []
    for sparse_ids in (False, True):
        for min_count in FLOORS:
            rows.append(run_child(num_ids, sparse_ids, min_count))
            print(rows[-1], flush=True)
    command = "python benchmarks/learn_step.py" + (" --quick" if args.quick else "") + (
        f" --num-ids {args.num_ids}" if args.num_ids else "")
    body = report(rows, num_ids, command, time.perf_counter() - started)
    print(body)
    write_doc_section(args.doc, "Learn step (benchmarks/learn_step.py)", body)


if __name__ == "__main__":
    main()
