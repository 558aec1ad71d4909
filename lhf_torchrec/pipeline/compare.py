"""Methods side by side at equal total bytes: the loop behind ``lhf demo`` and the quality benchmark.

For every seed: profile the training split, learn low-dimensional embeddings once (only when a
learned method is compared; its time is charged to the learned methods), then for every
compression ratio and method fit the method (:mod:`lhf_torchrec.pipeline.methods`) at that
budget, train the same DLRM with the same data, optimizer and epochs, and evaluate on the test split.

Epochs seen: the learn step is ``learn_epochs`` more gradient passes over the training split (a
small model's, or the DLRM's dim for a warm start), which the methods without it do not get. Every
:class:`RunRecord` says how many passes its run made (:func:`epochs_seen`), and ``equal_passes``
gives the methods without a learn step that many more training epochs. Passes that read ids only
(the counting profile every method shares; MCH's replay of the stream through TorchRec's remapper)
compute no gradient and are not counted as epochs; MCH's is shown beside them.
"""

import dataclasses
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from lhf_torchrec.files import atomic_write
from lhf_torchrec.mapping.methods import MIN_COUNT
from lhf_torchrec.mapping.tables import check_budget_split, full_table_bytes
from lhf_torchrec.pipeline.datasets import SplitData
from lhf_torchrec.pipeline.methods import FitInputs, fit_method, get_method
from lhf_torchrec.pipeline.steps import learn_model, profile_tables, warm_start_rows
from lhf_torchrec.pipeline.table_choice import fit_per_table
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import Runtime, init_runtime
from lhf_torchrec.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """One trained model: which method at which budget, what it cost and how good it is."""

    dataset: str
    method: str
    compression: float
    seed: int
    total_bytes: int
    table_bytes: int
    mapping_bytes: int
    full_bytes: int
    fit_seconds: float
    train_seconds: float
    steps: int
    test: Dict[str, float]
    validation: List[Dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # the epoch whose model was tested (the last, or the best on validation)
    error: str = ""  # why the method could not be fitted at this budget (then nothing was trained)
    # Passes over the training split (0 in results written before they were recorded: unknown).
    train_epochs: int = 0  # of the DLRM's training
    learn_epochs: int = 0  # of the learn step (gradient passes of the model that learns the embeddings)
    id_passes: int = 0  # that read ids only, no gradient (MCH's replay of the stream), beyond the shared profile
    # What each table chose on validation (MethodSpec.per_table; table -> its bytes and TABLE_SETTINGS label,
    # e.g. "x2 bytes, tail 10%, floor 10", or "full size").
    table_settings: Dict[str, str] = field(default_factory=dict)
    # How the compression's bytes went to the tables (lhf_torchrec.mapping.tables.BUDGET_SPLITS).
    budget_split: str = "table"


def epochs_seen(record: RunRecord) -> str:
    """The gradient passes a run made over the training split, e.g. ``"1"``, ``"1 + 1 learn"``,
    ``"2 + 1 ids only"`` (an id-only pass: MCH's), ``"?"`` for a record written before they were kept."""
    if not record.train_epochs:
        return "?"
    text = str(record.train_epochs)
    text += f" + {record.learn_epochs} learn" if record.learn_epochs else ""
    return text + (f" + {record.id_passes} ids only" if record.id_passes else "")


def epochs_seen_of(records: Sequence[RunRecord]) -> str:
    """:func:`epochs_seen` of runs of one method (seeds), each distinct value once: ``"1 + 1 learn"``."""
    return " / ".join(dict.fromkeys(epochs_seen(r) for r in records))


@dataclass(frozen=True)
class MethodSpec:
    """A method under a label, with the settings of its fit: e.g. ``MethodSpec("combination (auto split)",
    "combination", {"hot_fraction": "auto", "hashed_fraction": "auto"})``. Estimator hyper-parameters
    and the mapping methods' budget settings (``num_buckets``, ``mapping_share``, which
    :func:`~lhf_torchrec.mapping.fit.fit_mapping` takes as its own arguments) go in the same dict.
    A plain method name stands for ``MethodSpec(name, name)``."""

    label: str
    method: str
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    # Learn embeddings at the model's dim and start every compressed row from them (warm_start_rows).
    warm_start: bool = False
    # TrainConfig.unseen_id_rate of the run: training ids replaced by ids never seen (with_unseen_ids).
    unseen_id_rate: float = 0.0
    # Each table's bytes (within the same total) and its tail and clustering floor among TABLE_SETTINGS
    # chosen on validation by the learn model (lhf_torchrec.pipeline.table_choice); hyperparams apply to
    # every setting.
    per_table: bool = False


def _spec(method: Union[str, MethodSpec]) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else MethodSpec(method, method)


def compare_methods(
    data: SplitData,
    methods: Sequence[Union[str, MethodSpec]],
    compressions: Sequence[float],
    seeds: Sequence[int],
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    learn_dim: int = 8,
    learn_epochs: int = 1,
    best_epoch: bool = False,
    equal_passes: bool = False,
    budget_split: str = "table",
    runtime: Optional[Runtime] = None,
    on_record: Optional[Callable[[RunRecord], None]] = None,
) -> List[RunRecord]:
    """Trains ``full`` once per seed and every method at every compression; returns the records.

    Every run gets the same data, epochs (``train_config.epochs``), optimizer, learning rates and
    seed; the methods with a learn step (learned embeddings, warm start) also had its ``learn_epochs``
    passes. With ``equal_passes`` (when some method has a learn step) the methods without one train
    ``train_config.epochs + learn_epochs`` epochs instead, so that every run makes the same number of
    gradient passes over the training split (MCH's id-only replay not counted: it computes no
    gradient, as the profile every method reads). With ``best_epoch`` the test metrics are those of
    the epoch with the best validation logloss (best of the run's epochs), otherwise of the last
    epoch. ``budget_split`` splits every method's bytes across the tables the same way
    (:func:`~lhf_torchrec.mapping.tables.table_budgets`). ``on_record`` is called with each record as
    soon as its run is done (:func:`num_runs` of them), e.g. to show progress.
    """
    check_budget_split(budget_split)
    specs = [_spec(m) for m in methods]
    for s in specs:  # unknown names fail here, before any training
        if not get_method(s.method).maps_ids and (s.warm_start or s.unseen_id_rate):
            raise ValueError(f"{s.label}: warm start and unseen ids need a method that maps ids to rows, not "
                             f"'{s.method}'")
        if s.per_table and (s.warm_start or not get_method(s.method).needs_embeddings):
            raise ValueError(f"{s.label}: a per-table choice scores with the learn step's model: it needs a method "
                             f"that learns embeddings (learned, combination), without warm start, not '{s.method}'")
    floors = learn_floors(specs, model_config.embedding_dim, learn_dim)
    runtime = runtime or init_runtime()
    profiles = profile_tables(data.train, data.tables)
    full_bytes = full_table_bytes(data.tables, profiles, train_config.optimizer)
    records: List[RunRecord] = []
    any_learn_step = any(_has_learn_step(s) for s in specs)
    for seed in seeds:
        config = TrainConfig(**{**asdict(train_config), "seed": seed, "checkpoint_dir": None, "resume": False})
        learned: Dict[int, Any] = {}  # embedding dim -> (learned model, seconds to learn it)

        def learned_at(dim: int):
            if dim not in learned:
                start = time.perf_counter()
                learned[dim] = (learn_model(data.train, data.tables, profiles, dim=dim, epochs=learn_epochs,
                                            min_count=floors[dim], train_config=config, runtime=runtime),
                                time.perf_counter() - start)
            return learned[dim]

        runs = [(s, 1.0) for s in specs if s.method == "full"]
        runs += [(s, c) for c in compressions for s in specs if s.method != "full"]
        for spec, compression in runs:
            needs_embeddings = _has_learn_step(spec)
            passes = dict(train_epochs=config.epochs, learn_epochs=learn_epochs if needs_embeddings else 0,
                          id_passes=1 if spec.method == "mch" else 0)
            if equal_passes and any_learn_step and not needs_embeddings:
                passes["train_epochs"] += learn_epochs
            run_config = dataclasses.replace(config, epochs=passes["train_epochs"], unseen_id_rate=spec.unseen_id_rate)
            model, learn_seconds = (
                learned_at(model_config.embedding_dim if spec.warm_start else learn_dim)
                if needs_embeddings else (None, 0.0)
            )
            embeddings = model.embeddings if model is not None else None
            start = time.perf_counter()
            table_settings: Dict[str, str] = {}
            try:
                if spec.per_table:
                    fitted, table_settings = fit_per_table(
                        model, data.validation, data.tables, profiles, spec.method, compression=compression,
                        optimizer=train_config.optimizer, seed=seed, budget_split=budget_split,
                        **dict(spec.hyperparams))
                else:
                    inputs = FitInputs(embeddings, data.train, config.batch_size * runtime.world_size)
                    fitted = fit_method(spec.method, data.tables, profiles, inputs, compression=compression,
                                        optimizer=train_config.optimizer, seed=seed, budget_split=budget_split,
                                        **dict(spec.hyperparams))
                tables_compression = fitted.compression
                if spec.warm_start:
                    mappings = tables_compression.mappings
                    tables_compression = LearnedHashing(mappings, {
                        name: warm_start_rows(m, profiles[name], embeddings[name], seed)
                        for name, m in mappings.items() if name in embeddings})
            except ValueError as e:  # the method cannot represent some table at this budget
                logger.warning("%s %s %gx seed %d does not fit: %s", data.name, spec.label, compression, seed, e)
                records.append(RunRecord(data.name, spec.label, compression, seed, 0, 0, 0, full_bytes, 0.0, 0.0, 0,
                                         {}, error=str(e), budget_split=budget_split, **passes))
                if on_record is not None:
                    on_record(records[-1])
                continue
            fit_seconds = time.perf_counter() - start + learn_seconds
            trainer = Trainer(model_config, run_config, data.tables, len(data.train.dense_names), tables_compression,
                              runtime)
            test, epoch, result = _train_and_test(trainer, data, run_config, best_epoch)
            record = RunRecord(data.name, spec.label, compression, seed, fitted.total_bytes, fitted.table_bytes,
                               fitted.mapping_bytes, full_bytes, fit_seconds, result.train_seconds, result.steps,
                               test, result.validation, epoch, table_settings=table_settings,
                               budget_split=budget_split, **passes)
            logger.info("%s %s %.0fx seed %d (epochs seen %s): test %s", data.name, spec.label, compression, seed,
                        epochs_seen(record), test)
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records


def _has_learn_step(spec: MethodSpec) -> bool:
    """Whether the method's fit learns embeddings first (its learned methods, or a warm start)."""
    return spec.warm_start or get_method(spec.method).needs_embeddings


def learn_floors(specs: Sequence[MethodSpec], model_dim: int, learn_dim: int) -> Dict[int, int]:
    """Embedding dim -> the ``min_count`` its learn step keeps ids from: the lowest ``min_count`` of
    the fits that use embeddings of that dim (the budget only raises it), and 1 for a warm start
    (every profiled id's embedding initializes the row it maps to)."""
    floors: Dict[int, int] = {}
    for s in specs:
        if s.warm_start:
            floors[model_dim] = 1
        elif get_method(s.method).needs_embeddings:
            floor = s.hyperparams.get("min_count", MIN_COUNT)
            floors[learn_dim] = min(floors.get(learn_dim, floor), floor)
    return floors


def num_runs(methods: Sequence[Union[str, MethodSpec]], compressions: Sequence[float], seeds: Sequence[int]) -> int:
    """How many records :func:`compare_methods` returns: ``full`` once per seed, the others per compression."""
    full = sum(_spec(m).method == "full" for m in methods)
    return len(seeds) * (full + len(compressions) * (len(methods) - full))


def _train_and_test(trainer: Trainer, data: SplitData, config: TrainConfig, best_epoch: bool):
    """(test metrics, their epoch, the training result): of the last epoch, or the best on validation."""
    if not best_epoch:
        result = trainer.fit(data.train, data.validation)
        return trainer.evaluate(data.test), config.epochs, result
    best = None
    seconds, validation = 0.0, []
    for epoch in range(1, config.epochs + 1):
        trainer.config = dataclasses.replace(config, epochs=epoch)  # fit() continues where it stopped
        result = trainer.fit(data.train, data.validation)
        seconds += result.train_seconds
        validation += result.validation
        if best is None or result.validation[-1]["logloss"] < best[0]:
            best = (result.validation[-1]["logloss"], trainer.evaluate(data.test), epoch)
    result.train_seconds, result.validation = seconds, validation
    return best[1], best[2], result


def summarize(records: Sequence[RunRecord]) -> List[Dict[str, Any]]:
    """Mean and standard deviation over seeds per (dataset, method, compression)."""
    groups: Dict[tuple, List[RunRecord]] = {}
    for r in records:
        if r.error:
            continue
        groups.setdefault((r.dataset, r.method, r.compression), []).append(r)
    rows = []
    for (dataset, method, compression), rs in groups.items():
        row: Dict[str, Any] = {"dataset": dataset, "method": method, "compression": compression, "seeds": len(rs)}
        for metric in ("logloss", "auc", "ne"):
            values = [r.test[metric] for r in rs]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["total_mb"] = statistics.fmean(r.total_bytes for r in rs) / 2**20
        row["mapping_mb"] = statistics.fmean(r.mapping_bytes for r in rs) / 2**20
        row["full_mb"] = rs[0].full_bytes / 2**20
        row["fit_s"] = statistics.fmean(r.fit_seconds for r in rs)
        row["train_s"] = statistics.fmean(r.train_seconds for r in rs)
        row["epochs_seen"] = epochs_seen_of(rs)
        rows.append(row)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows."""
    header = ("| dataset | method | budget | epochs seen | test logloss | test AUC | NE | total MB | mapping MB | "
              "fit s | train s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "full" if r["method"] == "full" else f"{r['compression']:g}x"
        pm = lambda m: f"{r[m]:.4f}" + (f" ± {r[m + '_std']:.4f}" if r["seeds"] > 1 else "")  # noqa: E731
        lines.append(
            f"| {r['dataset']} | {r['method']} | {budget} | {r['epochs_seen']} | {pm('logloss')} | {pm('auc')} | "
            f"{pm('ne')} | {r['total_mb']:.2f} | {r['mapping_mb']:.3f} | {r['fit_s']:.1f} | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_quality_vs_bytes(rows: Sequence[Dict[str, Any]], path: str, title: str = "") -> None:
    """Test logloss and AUC against total bytes: a row of two panels per dataset, each method in the
    same colour and marker in every panel, one legend (written atomically)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    markers = "os^vD<>phX*"
    style = {m: (colors[i % len(colors)], markers[i % len(markers)]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for ax, metric, label in ((axes[row][0], "logloss", "test logloss (lower is better)"),
                                  (axes[row][1], "auc", "test AUC (higher is better)")):
            for method in methods:
                pts = sorted((r["total_mb"], r[metric], r[f"{metric}_std"]) for r in rows
                             if r["dataset"] == dataset and r["method"] == method)
                if not pts:
                    continue
                color, marker = style[method]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=color,
                            marker=marker, capsize=3, label=method, linestyle="-" if len(pts) > 1 else "none")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("total bytes: tables + optimizer state + mappings (MB)")
            ax.set_ylabel(label)
            ax.set_title(dataset)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def write_records(records: Sequence[RunRecord], path: str) -> None:
    """Every run as JSON (atomically)."""
    with atomic_write(path) as f:
        f.write(json.dumps([asdict(r) for r in records], indent=1).encode())


def write_results(records: Sequence[RunRecord], report: str, out_dir: str, title: str) -> str:
    """A comparison's three files in ``out_dir``: ``results.md`` (``report``), ``results.json``
    (every run) and ``quality_vs_bytes.png`` (the :func:`summarize` rows, titled ``title``; none when
    no run trained: every run's error is in the report and the records). Returns the plot's path, or ""."""
    with atomic_write(os.path.join(out_dir, "results.md")) as f:
        f.write(report.encode())
    write_records(records, os.path.join(out_dir, "results.json"))
    rows = summarize(records)
    if not rows:
        logger.warning("no run trained (every fit failed): %s has no plot", out_dir)
        return ""
    plot_path = os.path.join(out_dir, "quality_vs_bytes.png")
    plot_quality_vs_bytes(rows, plot_path, title=title)
    return plot_path
