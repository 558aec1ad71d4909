"""Honest selection: every method's hyper-parameters are chosen on the validation split, test is reported.

Each method declares a small grid of settings (:data:`SELECTION_GRIDS`, at most :data:`TUNING_BUDGET`
per method, so no method gets more tries than another). The quality benchmark trains every setting
(``lhf bench quality --select``); then, per dataset, budget and seed, :func:`select_on_validation` keeps
the setting with the best validation logloss (of the epoch that was tested) and reports *its* test
metrics under the method's name. The test split never takes part in a choice.

``combination``'s grid is where the rare tail is decided (issue 12, item 5): how many rows the ids
seen too rarely to cluster get, one shared row (as TorchRec's MCH gives every non-hot id; at floor 10
trained for unseen ids by replacing 5% of the training ids by ids never seen) or 10% of
the rows, and where the clustering floor lies: 10 or 30 accesses. Its fourth setting chooses both
for each table on its own (:mod:`lhf_torchrec.pipeline.table_choice`: the learn step's model scores
each table's candidates on validation, one training in all), among them half of the table's bytes
for the mapping instead of a quarter, which lowers the floor where the budget raised it (high compression),
and first each table's bytes within the same total (since stop 23; the label is unchanged).
"""

import statistics
from dataclasses import dataclass, replace
from typing import Collection, Dict, List, Sequence, Tuple

from lhf_torchrec.pipeline.compare import MethodSpec, RunRecord, epochs_seen_of
from lhf_torchrec.pipeline.methods import get_method

# The most settings any method may try: the same small tuning budget for every method.
TUNING_BUDGET = 4

# method -> its settings, the first one the method's default. A method without knobs has one setting.
SELECTION_GRIDS: Dict[str, Tuple[MethodSpec, ...]] = {
    "full": (MethodSpec("full", "full"),),
    "hash": (MethodSpec("hash", "hash"),),
    "frequency": tuple(MethodSpec(f"frequency [hot {h}]", "frequency", {"hot_fraction": h})
                       for h in (0.5, 0.25, 0.75, "auto")),
    "double_hash": tuple(MethodSpec(f"double_hash [hot {h}]", "double_hash", {"hot_fraction": h})
                         for h in (0.5, 0.25, 0.75, "auto")),
    "qr": (MethodSpec("qr", "qr"),),
    "mch": tuple(MethodSpec(f"mch [{p}]", "mch", {"eviction_policy": p}) for p in ("lfu", "lru")),
    "cce": tuple(MethodSpec(f"cce [pointers {s}]", "cce", {"pointer_share": s}) for s in (0.25, 0.0, 0.5)),
    "combination": (
        MethodSpec("combination [tail 10%, floor 10]", "combination", {}),
        # One row for every id without an entry, as MCH's miss row, trained for the ids first seen after
        # training by replacing 5% of the training ids by unseen ones (in place of the same setting without:
        # docs/results.md, "Unseen ids in training").
        MethodSpec("combination [tail 1 row, floor 10, unseen ids 5%]", "combination", {"hashed_fraction": 0.0},
                   unseen_id_rate=0.05),
        MethodSpec("combination [tail 1 row, floor 30]", "combination", {"hashed_fraction": 0.0, "min_count": 30}),
        # In place of "tail 10%, floor 10, mapping 50%", one of its candidates (docs/results.md, stop 20).
        MethodSpec("combination [per table on validation]", "combination", per_table=True),
    ),
}


def grid_specs(methods: Sequence[str]) -> List[MethodSpec]:
    """Every setting of every method in ``methods`` (clear error for a method without a grid)."""
    unknown = [m for m in methods if m not in SELECTION_GRIDS]
    if unknown:
        raise ValueError(f"no selection grid for {unknown}; methods with one: {', '.join(SELECTION_GRIDS)}")
    return [spec for m in methods for spec in SELECTION_GRIDS[m]]


def family_of(label: str) -> str:
    """The method a setting's label belongs to (``"combination [tail 1 row, floor 30]"`` -> ``"combination"``)."""
    for method, grid in SELECTION_GRIDS.items():
        if any(spec.label == label for spec in grid):
            return method
    raise ValueError(f"'{label}' is no setting of any selection grid")


def validation_logloss(record: RunRecord) -> float:
    """Validation logloss of the epoch whose model was tested (the one that counts for selection)."""
    if not record.validation:
        raise ValueError(f"{record.dataset} {record.method} seed {record.seed}: no validation metrics to select on")
    return record.validation[min(record.epoch, len(record.validation)) - 1]["logloss"]


@dataclass(frozen=True)
class Choice:
    """The setting one (dataset, method, budget, seed) kept, and what it scored on validation."""

    dataset: str
    method: str
    compression: float
    seed: int
    setting: str
    validation_logloss: float
    tried: int


def select_on_validation(records: Sequence[RunRecord]) -> Tuple[List[RunRecord], List[Choice]]:
    """Per (dataset, method, budget, seed): the run with the lowest validation logloss among the
    method's settings, relabelled with the method's name, and the choice made (ties: the setting
    declared first, i.e. the default). Runs that could not be fitted take no part."""
    groups: Dict[Tuple[str, str, float, int], List[RunRecord]] = {}
    for r in records:
        if not r.error:
            groups.setdefault((r.dataset, family_of(r.method), r.compression, r.seed), []).append(r)
    selected, choices = [], []
    for (dataset, method, compression, seed), runs in groups.items():
        order = [spec.label for spec in SELECTION_GRIDS[method]]
        best = min(runs, key=lambda r: (validation_logloss(r), order.index(r.method)))
        selected.append(replace(best, method=method))
        choices.append(Choice(dataset, method, compression, seed, best.method, validation_logloss(best), len(runs)))
    return selected, choices


def selection_report(selected: Sequence[RunRecord], choices: Sequence[Choice],
                     untrained: Collection[str] = ()) -> str:
    """Markdown: validation and test logloss of every method's selected setting (mean ± std over
    seeds), the share of the hashing trick's gap recovered on validation and on test (``n/a`` on the
    datasets in ``untrained``, whose full-table model learned nothing), the passes over the training
    data each method saw, and the setting each seed chose."""
    def stats(rs: Sequence[RunRecord], value) -> Tuple[float, float]:
        values = [value(r) for r in rs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    groups: Dict[Tuple[str, float, str], List[RunRecord]] = {}
    for r in selected:
        groups.setdefault((r.dataset, r.compression, r.method), []).append(r)
    mean: Dict[Tuple[str, float, str], Tuple[float, float]] = {
        key: (stats(rs, validation_logloss)[0], stats(rs, lambda r: r.test["logloss"])[0]) for key, rs in groups.items()}
    full = {d: v for (d, _, m), v in mean.items() if m == "full"}
    hashed = {(d, c): v for (d, c, m), v in mean.items() if m == "hash"}

    def recovered(dataset: str, compression: float, method: str, which: int) -> str:
        if method in ("full", "hash") or dataset not in full or (dataset, compression) not in hashed:
            return "-"
        if dataset in untrained:
            return "n/a"
        gap = hashed[(dataset, compression)][which] - full[dataset][which]
        return f"{(hashed[(dataset, compression)][which] - mean[(dataset, compression, method)][which]) / gap:.0%}" \
            if gap > 0 else "no gap"

    by_key: Dict[Tuple[str, float, str], List[str]] = {}
    for c in sorted(choices, key=lambda c: c.seed):
        by_key.setdefault((c.dataset, c.compression, c.method), []).append(f"{c.seed}: {c.setting}")
    tried = {(c.dataset, c.compression, c.method): c.tried for c in choices}
    lines = ["| dataset | budget | method | settings tried | validation logloss | test logloss | gap recovered "
             "(validation) | gap recovered (test) | epochs seen | chosen setting per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(SELECTION_GRIDS)
    for key in sorted(groups, key=lambda k: (k[0], k[1] if k[2] != "full" else 0, order.index(k[2]))):
        dataset, compression, method = key
        rs = groups[key]
        v, vs = stats(rs, validation_logloss)
        t, ts = stats(rs, lambda r: r.test["logloss"])
        budget = "full" if method == "full" else f"{compression:g}x"
        lines.append(
            f"| {dataset} | {budget} | {method} | {tried[key]} | {v:.4f} ± {vs:.4f} | {t:.4f} ± {ts:.4f} | "
            f"{recovered(dataset, compression, method, 0)} | {recovered(dataset, compression, method, 1)} | "
            f"{epochs_seen_of(rs)} | {'; '.join(by_key[key])} |")
    return "\n".join(lines)


def all_settings_report(records: Sequence[RunRecord]) -> str:
    """Markdown: every setting's validation and test logloss (mean over seeds), so that a reader sees
    what selection chose from."""
    groups: Dict[Tuple[str, float, str], List[RunRecord]] = {}
    for r in records:
        if not r.error:
            groups.setdefault((r.dataset, r.compression, r.method), []).append(r)
    lines = ["| dataset | budget | setting | seeds | validation logloss | test logloss |", "|---|---|---|---|---|---|"]
    for (dataset, compression, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        budget = "full" if label == "full" else f"{compression:g}x"
        v = statistics.fmean(validation_logloss(r) for r in rs)
        t = statistics.fmean(r.test["logloss"] for r in rs)
        lines.append(f"| {dataset} | {budget} | {label} | {len(rs)} | {v:.4f} | {t:.4f} |")
    return "\n".join(lines)


def table_settings_report(records: Sequence[RunRecord]) -> str:
    """Markdown: the setting each table chose in the runs that chose per table (``MethodSpec.per_table``),
    one line per dataset, budget and seed; "" when no run did."""
    lines = [f"| {r.dataset} | {r.compression:g}x | {r.method} | {r.seed} | "
             + "; ".join(f"{table}: {label}" for table, label in sorted(r.table_settings.items())) + " |"
             for r in sorted(records, key=lambda r: (r.dataset, r.compression, r.method, r.seed))
             if r.table_settings and not r.error]
    return "\n".join(["| dataset | budget | setting | seed | each table's choice |", "|---|---|---|---|---|"]
                     + lines) if lines else ""


def train_flags(spec: MethodSpec, compression: float) -> str:
    """The ``lhf train`` flags that train the setting ``spec`` at ``compression`` on a user's data, or ""
    where ``lhf train`` has no such method (QR, MCH and CCE are the benchmark's baselines)."""
    if not get_method(spec.method).maps_ids or spec.warm_start:
        return ""
    flags = [f"--method {spec.method}"] + ([] if spec.method == "full" else [f"--compression {compression:g}"])
    flags += [f"--param {name}={value}" for name, value in spec.hyperparams.items()]
    if spec.unseen_id_rate:
        flags.append(f"--unseen-id-rate {spec.unseen_id_rate:g}")
    if spec.per_table:
        flags.append("--per-table")
    return " ".join(flags)


def chosen_flags_report(choices: Sequence[Choice]) -> str:
    """Markdown: each setting that selection kept, per dataset and budget, how many seeds kept it, and the
    ``lhf train`` flags that train it (add the data, model and training flags of the benchmark's run)."""
    specs = {spec.label: spec for grid in SELECTION_GRIDS.values() for spec in grid}
    kept: Dict[Tuple[str, float, str, str], List[int]] = {}
    for c in choices:
        kept.setdefault((c.dataset, c.compression, c.method, c.setting), []).append(c.seed)
    order = list(SELECTION_GRIDS)
    lines = ["| dataset | budget | setting | kept on seeds | lhf train flags |", "|---|---|---|---|---|"]
    for (dataset, compression, method, setting), seeds in sorted(
            kept.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]), kv[0][3])):
        if method in ("full", "hash"):
            continue
        flags = train_flags(specs[setting], compression)
        lines.append(f"| {dataset} | {compression:g}x | {setting} | {', '.join(map(str, sorted(seeds)))} | "
                     f"{f'`{flags}`' if flags else 'a baseline of the benchmark, not in lhf train'} |")
    return "\n".join(lines)


def selection_methods(wanted: Sequence[str] = ()) -> List[str]:
    """The methods to select among: ``wanted`` (default: all with a grid), always with ``full`` and
    ``hash``, which every gap needs."""
    methods = list(wanted) or list(SELECTION_GRIDS)
    return [m for m in SELECTION_GRIDS if m in ("full", "hash") or m in methods] + \
        [m for m in methods if m not in SELECTION_GRIDS]


__all__ = [
    "SELECTION_GRIDS",
    "TUNING_BUDGET",
    "Choice",
    "all_settings_report",
    "chosen_flags_report",
    "family_of",
    "grid_specs",
    "select_on_validation",
    "selection_methods",
    "selection_report",
    "table_settings_report",
    "train_flags",
    "validation_logloss",
]
