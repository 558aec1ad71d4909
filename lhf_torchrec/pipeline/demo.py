"""``lhf demo``: the whole pipeline on the embedded synthetic data, four methods against the full tables.

On Criteo-shaped synthetic data with planted id groups it profiles the training split, learns 8-d
id embeddings with a short full-table run, fits ``hash``, ``frequency``, ``learned`` and
``combination`` mappings at the same total bytes (``compression`` times smaller than the full
tables, mapping bytes counted), trains the same DLRM with each and with the full tables, and
reports test logloss, AUC and normalized entropy with a plot of quality against bytes.
"""

import logging
import time
from dataclasses import dataclass
from typing import List, Sequence

from lhf_torchrec.pipeline.compare import RunRecord, compare_methods, format_table, summarize, write_results
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import init_runtime
from lhf_torchrec.training.trainer import TrainConfig

logger = logging.getLogger(__name__)

DEMO_METHODS = ("full", "hash", "frequency", "learned", "combination")


@dataclass
class DemoConfig:
    rows: int = 1_000_000
    scale: float = 0.01  # Criteo Kaggle cardinalities x scale: the largest table has 101k ids
    compression: float = 10.0
    embedding_dim: int = 16
    batch_size: int = 1024
    epochs: int = 1
    seed: int = 0
    out_dir: str = "runs/demo"

    def __post_init__(self) -> None:
        if self.compression < 1:
            raise ValueError(f"DemoConfig: compression must be >= 1 (full bytes / compressed bytes), got {self.compression}")
        if self.rows < 1 or self.epochs < 1 or self.scale <= 0:
            raise ValueError(f"DemoConfig: rows and epochs must be >= 1 and scale > 0, got rows={self.rows}, "
                             f"epochs={self.epochs}, scale={self.scale}")


def run_demo(config: DemoConfig = DemoConfig(), methods: Sequence[str] = DEMO_METHODS) -> List[RunRecord]:
    """Runs the demo and writes ``results.json``, ``results.md`` and ``quality_vs_bytes.png``."""
    started = time.perf_counter()
    runtime = init_runtime()
    data = load_split(DatasetSpec("synthetic", rows=config.rows, scale=config.scale, seed=config.seed),
                      config.embedding_dim, progress=runtime.is_main)
    records = compare_methods(
        data,
        methods,
        [config.compression],
        [config.seed],
        ModelConfig(embedding_dim=config.embedding_dim),
        TrainConfig(batch_size=config.batch_size, epochs=config.epochs, progress=runtime.is_main),
        runtime=runtime,
    )
    if runtime.is_main:
        rows = summarize(records)
        table = format_table(rows)
        elapsed = time.perf_counter() - started
        summary = (
            f"lhf demo: {config.rows:,} synthetic rows (scale {config.scale}), {config.compression:g}x smaller "
            f"tables at equal total bytes, {config.epochs} epoch(s), {elapsed:.0f} s\n\n{table}\n"
        )
        print("\n" + summary)
        plot_path = write_results(records, summary, config.out_dir, f"synthetic, {config.compression:g}x compression")
        print(f"wrote {config.out_dir}/results.json, results.md and {plot_path}")
    return records
