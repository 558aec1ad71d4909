"""Capacity table: Criteo 1TB at 10x on W ranks, mappings replicated vs co-sharded, from TorchRec's planner.

    .venv/bin/python benchmarks/capacity.py                       # W = 8, 64, 128, 1024 (~10 min on 2 cores)
    .venv/bin/python benchmarks/capacity.py --world-sizes 8 64

Each row is one ``plan_report`` (what ``lhf plan --preset criteo-1tb --world-size W --compression 10
[--replicated] --json`` prints): dim 128, row-wise Adagrad, 80 GB HBM per rank, synthetic mappings with
an entry for 10% of each table's ids; co-sharded: bucketed in B = W buckets. Cluster bytes are weights,
optimizer state and mappings summed over all ranks (every replica counted). Planning is deterministic:
the numbers do not depend on the machine, only the seconds do.

Results are printed and written to docs/capacity_planning.md (section "Replicated vs co-sharded mappings").
"""

import argparse
import logging
import os
import sys
import warnings

from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table, write_doc_section  # noqa: E402

COLUMNS = ("W", "mappings", "before GB", "after GB", "ratio", "max rank GB", "max rank mapping MB",
           "co-sharded tables", "plan s")
GB, MB = 1024**3, 1024**2


def capacity_rows(world_sizes, compression: float = 10.0):
    from lhf_torchrec.distributed.planner import plan_report
    from lhf_torchrec.distributed.presets import preset_tables

    tables = preset_tables("criteo-1tb", 128)
    rows = []
    runs = [(w, cosharding) for w in world_sizes for cosharding in (False, True)]
    for world_size, cosharding in tqdm(runs, desc="plan", unit="plan"):
        report = plan_report(tables, world_size=world_size, compression=compression, cosharding=cosharding)
        after = report.after
        rows.append({
            "W": world_size,
            "mappings": "co-sharded" if cosharding else "replicated",
            "before GB": report.before.cluster_bytes / GB,
            "after GB": after.cluster_bytes / GB,
            "ratio": report.compression,
            "max rank GB": after.max_rank_bytes / GB,
            "max rank mapping MB": after.max_rank_mapping_bytes / MB,
            "co-sharded tables": f"{sum(c.cosharded is not None for c in report.choices.values())} of "
                                 f"{len(report.choices)}",
            "plan s": report.before.seconds + after.seconds,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 128, 1024])
    parser.add_argument("--doc", default=os.path.join(os.path.dirname(__file__), "..", "docs", "capacity_planning.md"))
    args = parser.parse_args()
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = capacity_rows(args.world_sizes)
    table = markdown_table(rows, COLUMNS)
    print(table)
    body = (
        "`python benchmarks/capacity.py` (each row: `lhf plan --preset criteo-1tb --world-size W --compression 10 "
        "--json`, with `--replicated` for the replicated rows). Criteo 1TB, dim 128, row-wise Adagrad, 80 GB HBM "
        "per rank, synthetic mappings (an entry for 10% of each compressed table's ids; co-sharded: B = W "
        "buckets, the fullest bucket assumed at its mean + 4 standard deviations). before / after GB: weights, "
        "optimizer state and mappings summed over all W ranks, every replica counted; ratio = before / after; "
        "max rank GB: the most loaded rank's planner total (also input/output buffers and the 15% reservation); "
        "max rank mapping MB: replicated + co-sharded mapping bytes on the most loaded rank.\n\n"
        f"{table}\n\n"
        f"Planned on {machine_description()} (the seconds only; every byte is deterministic)."
    )
    write_doc_section(os.path.abspath(args.doc), "Replicated vs co-sharded mappings", body,
                      title="# Capacity planning with `lhf plan`")


if __name__ == "__main__":
    main()
