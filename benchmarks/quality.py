"""Model quality at equal memory: every method, several budgets, datasets and seeds.

    .venv/bin/python benchmarks/quality.py            # synthetic + MovieLens-100k, 4x/10x/50x, 3 seeds
    .venv/bin/python benchmarks/quality.py --quick    # smoke run of every method (< 3 min)
    lhf bench quality --data criteo-tsv --data-path day_0   # the same on your data
    lhf bench quality --data csv --data-path clicks.csv --csv-spec spec.json --seeds 0 --compressions 10

Writes results.md, results.json and quality_vs_bytes.png to runs/quality/ (--quick: runs/quality-quick/,
--select: runs/selection/, or --out-dir), never over another run's report unless --overwrite. docs/results.md
is written by hand from such runs (each section names its command): it holds analysis no run regenerates.
"""

import sys

from lhf_torchrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "quality", *sys.argv[1:]]))
