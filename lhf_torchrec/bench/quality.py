"""The quality benchmark: every method at equal total bytes, on several datasets, several seeds.

``benchmarks/quality.py`` and ``lhf bench quality`` run :func:`run_quality`, which trains every
method of :data:`QUALITY_METHODS` at every compression ratio with every seed through
:func:`~lhf_torchrec.pipeline.compare.compare_methods` (same data, epochs, optimizer, learning
rates and seeds for all; bytes counted the same way), then writes ``results.md`` (tables, the share
of the hashing trick's logloss gap each method recovers, and plain statements of where
``combination`` loses), ``results.json`` and ``quality_vs_bytes.png``.

Every table says the epochs each run saw (training epochs + the learn step's passes, which only
the methods that learn embeddings make; :func:`~lhf_torchrec.pipeline.compare.epochs_seen`). With
``equal_passes`` (``--equal-passes``) the methods without a learn step train that many more epochs,
so that every method makes the same number of gradient passes over the training split.

A progress bar counts the runs (runs done / total, with an ETA) and every finished run logs one
line. When the full-table model learned nothing on a dataset (validation NE >= 1 or AUC <= 0.5:
too few training steps for its size), the benchmark says so at once, and the report marks that
dataset instead of printing gap percentages, which would be noise.
"""

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Mapping, Sequence, Tuple

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lhf_torchrec.bench.selection import (
    TUNING_BUDGET,
    all_settings_report,
    chosen_flags_report,
    grid_specs,
    select_on_validation,
    selection_methods,
    selection_report,
    table_settings_report,
)
from lhf_torchrec.pipeline.compare import (
    MethodSpec,
    RunRecord,
    compare_methods,
    epochs_seen,
    format_table,
    num_runs,
    summarize,
    write_results,
)
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.training.metrics import untrained_warning
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import Runtime, init_runtime
from lhf_torchrec.training.trainer import TrainConfig

logger = logging.getLogger(__name__)

OURS = "combination"
QUALITY_METHODS: Tuple[Any, ...] = (
    "full",
    "hash",
    "frequency",
    "double_hash",
    "qr",
    "mch",
    "cce",
    "learned",
    "combination",
    # Ideas for combination, measured one by one (see docs/results.md). The first three undo one of
    # its defaults each: no id seen fewer than 10 times is clustered, and half the rows are hot.
    MethodSpec("combination, rare ids clustered", "combination", {"min_count": 1}),
    MethodSpec("combination, clustered from 5 accesses", "combination", {"min_count": 5}),
    MethodSpec("combination, 25% hot", "combination", {"hot_fraction": 0.25}),
    MethodSpec("combination, auto split", "combination", {"hot_fraction": "auto", "hashed_fraction": "auto"}),
    MethodSpec("combination, warm start", "combination", warm_start=True),
    # Half of each table's budget for the mapping's entries instead of a quarter: at high compression
    # the budget raises the clustering floor far above 10 accesses, and more clustered ids beat more rows.
    MethodSpec("combination, mapping share 50%", "combination", {"mapping_share": 0.5}),
    MethodSpec("frequency, warm start", "frequency", warm_start=True),
    # What bucketing (the foundation of co-sharding a mapping with its table) costs, at equal bytes.
    MethodSpec("combination, 64 buckets", "combination", {"num_buckets": 64}),
    # 5% of the training ids replaced by ids never seen: trains the hash rows that ids new at test time land in.
    MethodSpec("combination, unseen ids 5%", "combination", unseen_id_rate=0.05),
    # Each table's rare tail and clustering floor chosen on validation (pipeline/table_choice.py).
    MethodSpec("combination, per table", "combination", per_table=True),
)


@dataclass
class QualityConfig:
    datasets: List[DatasetSpec] = field(default_factory=lambda: [
        DatasetSpec("synthetic", rows=500_000, scale=0.01),
        DatasetSpec("movielens"),
    ])
    compressions: Sequence[float] = (4, 10, 50)
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 1
    best_epoch: bool = False
    # The methods without a learn step train epochs + its passes (compare_methods' equal_passes).
    equal_passes: bool = False
    # How each compression's bytes go to the tables, the same for every method (mapping.tables.BUDGET_SPLITS).
    budget_split: str = "table"
    embedding_dim: int = 16
    batch_size: Dict[str, int] = field(default_factory=lambda: {"movielens": 256})
    default_batch_size: int = 1024
    out_dir: str = "runs/quality"
    command: str = "python benchmarks/quality.py"


def quick_config(out_dir: str = "runs/quality-quick") -> QualityConfig:
    """A smoke run of every method in well under 3 minutes: tiny synthetic data, 10x, one seed."""
    return QualityConfig(datasets=[DatasetSpec("synthetic", rows=20_000, scale=0.001)], compressions=(10,),
                         seeds=(0,), out_dir=out_dir, command="python benchmarks/quality.py --quick")


REPORT_FILES = ("results.md", "results.json", "quality_vs_bytes.png")


def check_report_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuses, before any training, an ``out_dir`` that already holds a report (another run's), unless
    ``overwrite``: a benchmark of one dataset must not replace the results of another."""
    found = [name for name in REPORT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if found and not overwrite:
        raise ValueError(f"--out-dir {out_dir} already holds a quality report ({', '.join(found)}); choose another "
                         f"--out-dir, or pass --overwrite to replace it")


def run_quality(config: QualityConfig, methods: Sequence[Any] = QUALITY_METHODS) -> List[RunRecord]:
    """Trains every method of ``methods`` (labels or :class:`MethodSpec`) and writes the report."""
    started = time.perf_counter()
    records, runtime = _train_all(config, methods)
    if runtime.is_main:
        write_report(records, config, time.perf_counter() - started)
    return records


def run_selection(config: QualityConfig, methods: Sequence[str] = ()) -> List[RunRecord]:
    """Trains every setting of the selection grid of each method in ``methods`` (default: all; ``full``
    and ``hash`` always), keeps per dataset, budget and seed the setting with the best validation
    logloss (:mod:`lhf_torchrec.bench.selection`) and writes a report of the kept settings' test
    metrics. Returns every run."""
    started = time.perf_counter()
    records, runtime = _train_all(config, grid_specs(selection_methods(methods)))
    if runtime.is_main:
        write_selection_report(records, config, time.perf_counter() - started)
    return records


def _train_all(config: QualityConfig, methods: Sequence[Any]) -> Tuple[List[RunRecord], Runtime]:
    runtime = init_runtime()
    records: List[RunRecord] = []
    total = len(config.datasets) * num_runs(methods, config.compressions, config.seeds)
    bar = tqdm(total=total, desc="quality runs", unit="run", disable=not runtime.is_main)
    with bar, logging_redirect_tqdm():
        for spec in config.datasets:
            data = load_split(spec, config.embedding_dim, progress=runtime.is_main)
            train = TrainConfig(batch_size=config.batch_size.get(spec.kind, config.default_batch_size),
                                epochs=config.epochs, progress=False)
            logger.info("quality benchmark on %s: %d training examples", data.name, data.train.num_examples())

            def finished(record: RunRecord) -> None:
                bar.update(1)
                if runtime.is_main:
                    logger.info("[%d/%d] %s", bar.n, total, _run_line(record))
                    why = full_model_warning([record]) if record.method == "full" and not record.error else ""
                    if why:
                        logger.warning("%s, seed %d: %s", record.dataset, record.seed, why)

            records += compare_methods(data, methods, config.compressions, config.seeds,
                                       ModelConfig(embedding_dim=config.embedding_dim), train,
                                       best_epoch=config.best_epoch, equal_passes=config.equal_passes,
                                       budget_split=config.budget_split, runtime=runtime, on_record=finished)
    return records, runtime


def _run_line(r: RunRecord) -> str:
    head = f"{r.dataset} {r.method} {'full' if r.method == 'full' else f'{r.compression:g}x'} seed {r.seed}"
    if r.error:
        return f"{head}: not fitted ({r.error})"
    return (f"{head}: test logloss {r.test['logloss']:.4f} AUC {r.test['auc']:.4f} NE {r.test['ne']:.4f} "
            f"(epochs seen {epochs_seen(r)}, {r.steps} steps, fit {r.fit_seconds:.1f} s, "
            f"train {r.train_seconds:.1f} s)")


def tested_validation(record: RunRecord) -> Dict[str, float]:
    """The validation metrics of the epoch whose model was tested (one validation per epoch)."""
    return record.validation[min(record.epoch, len(record.validation)) - 1]


def full_model_warning(full_runs: Sequence[RunRecord]) -> str:
    """:func:`~lhf_torchrec.training.metrics.untrained_warning` of the full-table model (one run per
    seed, validation metrics averaged over seeds): "" when it learned something."""
    validation = None
    if all(r.validation for r in full_runs):
        tested = [tested_validation(r) for r in full_runs]
        # click_rate: absent from results written before it was recorded.
        validation = {k: statistics.fmean(m[k] for m in tested) for k in ("logloss", "ne", "auc", "click_rate")
                      if all(k in m for m in tested)}
    return untrained_warning("the full-table model", validation, min(r.steps for r in full_runs))


def untrained_datasets(records: Sequence[RunRecord]) -> Dict[str, str]:
    """Dataset -> :func:`full_model_warning`, for the datasets whose full-table model learned nothing."""
    by_dataset: Dict[str, List[RunRecord]] = {}
    for r in records:
        if r.method == "full" and not r.error:
            by_dataset.setdefault(r.dataset, []).append(r)
    warnings = {dataset: full_model_warning(runs) for dataset, runs in by_dataset.items()}
    return {dataset: why for dataset, why in warnings.items() if why}


def gap_recovered(
    rows: Sequence[Dict[str, Any]], untrained: Collection[str] = ()
) -> Dict[Tuple[str, str, float], float]:
    """Per (dataset, method, compression): the share of the hashing trick's test-logloss gap to the
    full tables that the method closes (1 = as good as full, 0 = as the hashing trick). Datasets in
    ``untrained`` (whose full-table model learned nothing) have no such share."""
    full = {r["dataset"]: r["logloss"] for r in rows if r["method"] == "full" and r["dataset"] not in untrained}
    hashed = {(r["dataset"], r["compression"]): r["logloss"] for r in rows if r["method"] == "hash"}
    out = {}
    for r in rows:
        key = (r["dataset"], r["compression"])
        if r["method"] in ("full", "hash") or key not in hashed or r["dataset"] not in full:
            continue
        gap = hashed[key] - full[r["dataset"]]
        if gap > 0:
            out[(r["dataset"], r["method"], r["compression"])] = (hashed[key] - r["logloss"]) / gap
    return out


def verdicts(rows: Sequence[Dict[str, Any]], untrained: Collection[str] = ()) -> List[str]:
    """Plain statements: where ``combination`` wins, where it loses and to what, by how much (on a
    dataset in ``untrained``, with a note that the differences are noise)."""
    lines = []
    recovered = gap_recovered(rows, untrained)
    for dataset in sorted({r["dataset"] for r in rows}):
        for compression in sorted({r["compression"] for r in rows if r["dataset"] == dataset and r["method"] != "full"}):
            at = [r for r in rows if r["dataset"] == dataset and r["compression"] == compression and r["method"] != "full"]
            ours = next((r for r in at if r["method"] == OURS), None)
            if ours is None:
                continue
            better = sorted((r for r in at if r["logloss"] < ours["logloss"] and r["method"] != OURS),
                            key=lambda r: r["logloss"])
            share = recovered.get((dataset, OURS, compression))
            head = f"{dataset}, {compression:g}x: {OURS} test logloss {ours['logloss']:.4f}"
            head += f", {share:.0%} of the hashing trick's gap to the full tables recovered" if share is not None else ""
            if dataset in untrained:
                head += " (the full tables learned nothing here: these differences are noise)"
            if better:
                losses = ", ".join(f"{r['method']} ({r['logloss']:.4f}, {ours['logloss'] - r['logloss']:+.4f})"
                                   for r in better)
                lines.append(f"- {head}; **{OURS} loses to**: {losses}.")
            else:
                lines.append(f"- {head}; best of all compressed methods.")
    return lines


def write_report(records: Sequence[RunRecord], config: QualityConfig, seconds: float) -> None:
    rows = summarize(records)
    untrained = untrained_datasets(records)
    recovered = gap_recovered(rows, untrained)
    gap_lines = ["| dataset | budget | " + " | ".join(m for m in _methods(rows) if m not in ("full", "hash")) + " |"]
    gap_lines.append("|---|---|" + "---|" * (len(gap_lines[0].split("|")) - 4))
    for dataset in sorted({r["dataset"] for r in rows}):
        for c in sorted({r["compression"] for r in rows if r["dataset"] == dataset and r["method"] != "full"}):
            cells = ["n/a" if dataset in untrained else f"{recovered[(dataset, m, c)]:.0%}"
                     if (dataset, m, c) in recovered else "-" for m in _methods(rows) if m not in ("full", "hash")]
            gap_lines.append(f"| {dataset} | {c:g}x | " + " | ".join(cells) + " |")
    gap_lines += [f"\nn/a on {dataset}: the full tables learned nothing (see the warning above), so there is no gap "
                  "to recover." for dataset in sorted(untrained)]
    full = {r["dataset"]: r["logloss"] for r in rows if r["method"] == "full"}
    gap_lines += [f"\nNo gap on {r['dataset']} at {r['compression']:g}x: the hashing trick's test logloss "
                  f"({r['logloss']:.4f}) is no worse than the full tables' ({full[r['dataset']]:.4f})."
                  for r in rows if r["method"] == "hash" and r["dataset"] in full and r["dataset"] not in untrained
                  and r["logloss"] <= full[r["dataset"]]]
    seeds = ", ".join(str(s) for s in config.seeds)
    epochs = _epochs_text(config)
    text = f"""# Model quality at equal memory

Command: `{config.command}` ({seconds:.0f} s on this machine). Seeds {seeds}; {epochs}; every
method trains the same TorchRec DLRM (dim {config.embedding_dim}) with the same data, optimizer (fused
row-wise Adagrad for the tables, Adam for the MLPs), learning rates (no per-method search: the same
fixed values for all) and seeds. Budgets are total bytes: table weights + optimizer state + mappings
+ any structure a method keeps (QR's two tables, MCH's slot ids, CCE's pointers), {_split_text(config)};
tables under 100 rows stay full size for every method. Metrics are on the test split (the last rows in
time order), mean ± std over seeds. {_passes_text(config)}

## Results

{_untrained_warning(untrained)}{format_table(rows)}

## Share of the hashing trick's logloss gap recovered

(hash - method) / (hash - full) of mean test logloss: 100% matches the full tables, 0% the hashing
trick, negative is worse than it.

{chr(10).join(gap_lines)}

## Where {OURS} wins and loses

{chr(10).join(verdicts(rows, untrained))}
{_failures(records)}
![quality vs bytes](quality_vs_bytes.png)
"""
    os.makedirs(config.out_dir, exist_ok=True)
    write_results(records, text, config.out_dir, title=f"test quality vs total bytes ({epochs})")
    print(text)


def write_selection_report(records: Sequence[RunRecord], config: QualityConfig, seconds: float) -> None:
    """``results.md`` (the settings selected on validation, their test metrics, every setting tried),
    ``results.json`` (every run) and the plot of the selected settings, in ``config.out_dir``."""
    selected, choices = select_on_validation(records)
    untrained = untrained_datasets(records)
    seeds = ", ".join(str(s) for s in config.seeds)
    epochs = _epochs_text(config)
    text = f"""# Model quality at equal memory, settings selected on validation

Command: `{config.command}` ({seconds:.0f} s on this machine). Seeds {seeds}; {epochs}; the same DLRM
(dim {config.embedding_dim}), data, optimizer and learning rates for every method. Each method tried the
settings of its grid (at most {TUNING_BUDGET}, `lhf_torchrec/bench/selection.py`); per dataset, budget and
seed the setting with the best **validation** logloss was kept and its **test** metrics are reported. Budgets
are total bytes (tables, optimizer state, mappings), {_split_text(config)}. Gap recovered:
(hash - method) / (hash - full) of mean logloss, on each split. {_passes_text(config)}

{_untrained_warning(untrained)}{selection_report(selected, choices, untrained=untrained)}

## Where {OURS} wins and loses (selected settings, test split)

{chr(10).join(verdicts(summarize(selected), untrained))}
{_failures(records)}
## Every setting tried (mean over seeds)

{all_settings_report(records)}
{_table_choices(records)}
## Training a kept setting on your data

`lhf train` with these flags (and the data, model and training flags of this run) trains the setting that
selection kept; `lhf fit` takes the same `--param` flags (`--per-table` and `--unseen-id-rate` are `lhf train`'s:
they need its validation split and its training).

{chosen_flags_report(choices)}
"""
    os.makedirs(config.out_dir, exist_ok=True)
    write_results(records, text, config.out_dir, title=f"every setting tried: test quality vs total bytes ({epochs})")
    print(text)


def _table_choices(records: Sequence[RunRecord]) -> str:
    table = table_settings_report(records)
    return ("\n## Each table's choice (the settings chosen per table on validation)\n\n" + table + "\n") if table else ""


def _epochs_text(config: QualityConfig) -> str:
    epochs = f"best of {config.epochs} epochs on validation" if config.best_epoch else f"{config.epochs} epoch(s)"
    return epochs + (", + the learn step's passes for the methods without one (equal passes)" if config.equal_passes
                     else "")


def _split_text(config: QualityConfig) -> str:
    if config.budget_split == "access":
        return ("the total of 1/compression of every compressed table's full bytes split across the tables by "
                "access (`--budget-split access`: the same tables' bytes for every method)")
    return "each table at 1/compression of its full bytes"


def _passes_text(config: QualityConfig) -> str:
    text = ("\"Epochs seen\": the run's training epochs + the passes of its learn step (the methods that learn "
            "embeddings first, warm starts too); \"ids only\": MCH's replay of the training stream through "
            "TorchRec's remapper, which reads ids and computes no gradient.")
    if config.equal_passes:
        return text + (" Equal passes: the methods without a learn step train as many more epochs as it makes "
                       "passes, so every method makes the same number of gradient passes over the training split.")
    return text + (" The methods without a learn step make fewer passes (`--equal-passes` gives them as many "
                   "more epochs).")


def _untrained_warning(untrained: Mapping[str, str]) -> str:
    return "".join(f"**Warning, {dataset}**: {why}.\n\n" for dataset, why in sorted(untrained.items()))


def _failures(records: Sequence[RunRecord]) -> str:
    failed = sorted({(r.dataset, r.method, r.compression, r.error) for r in records if r.error})
    if not failed:
        return ""
    lines = [f"- {d}, {m} at {c:g}x: {e}" for d, m, c, e in failed]
    return "\nMethods that could not be fitted at a budget (not trained, not in the tables):\n\n" + "\n".join(lines) + "\n"


def _methods(rows: Sequence[Dict[str, Any]]) -> List[str]:
    seen: List[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


__all__ = [
    "QUALITY_METHODS",
    "QualityConfig",
    "gap_recovered",
    "quick_config",
    "run_quality",
    "run_selection",
    "full_model_warning",
    "tested_validation",
    "untrained_datasets",
    "verdicts",
    "write_selection_report",
]
