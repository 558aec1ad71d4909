"""Each table's bytes, rare tail and clustering floor chosen on validation loss, at fit time (issue 12).

How many rows the ids too rare to cluster get (down to one shared row, as TorchRec's MCH gives every
non-hot id) and where the clustering floor lies depend on the table: a user table of a few ratings
per user and an item table of long histories do not want the same. Training a model per table and
setting would multiply the trainings by the tables, so each candidate is scored by a proxy: the
learn step's model (:class:`~lhf_torchrec.pipeline.steps.LearnedModel`, trained anyway) evaluated on
the validation split with *one* table's rows replaced by what the candidate mapping makes of them:
every id reads the access-weighted mean of the learned embeddings of the ids that share its row
(the row a warm start would give it). The other tables keep their learned rows, so a table's score
is the validation loss its collisions alone cost.

A table keeps the default setting unless a candidate's per-example validation loss is lower by more
than :data:`SIGNIFICANCE` standard errors of the paired difference (the same examples, one table
changed): on data where the candidates differ by noise (the synthetic tables, docs/results.md) the
default stays, and only differences the validation split can see change a table.

The bytes come first (:func:`choose_budgets`): how much a table is worth is what its collisions cost the
proxy, so each compressed table is scored at :data:`BYTES_MULTIPLES` of the budget its split gives it and
at its full size, and the tables' choices that cost the least proxy loss within the same total are kept
(a multiple-choice knapsack, solved exactly), where they beat the split's own budgets by more than the
noise. The tail and floor are then chosen at those budgets.

Only the validation split takes part; the test split is never read here.
"""

import functools
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.fit import ProfileShare
from lhf_torchrec.mapping.budget import BudgetTooSmall
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile, ProfileSummary
from lhf_torchrec.mapping.tables import full_size_bytes, spread_leftover
from lhf_torchrec.pipeline.steps import LearnedModel, fit_mappings, fitted_tables, row_means
from lhf_torchrec.training.compression import FittedTables

logger = logging.getLogger(__name__)

# label -> the fit's settings; the first is the default (combination's own defaults). The tail: 10%
# of the rows or one shared row; the floor: 10 or 30 accesses, or, where the budget raises it (high
# compression), half of the table's bytes for the mapping instead of a quarter, which lowers it.
TABLE_SETTINGS: Dict[str, Dict[str, Any]] = {
    "tail 10%, floor 10": {},
    "tail 1 row, floor 10": {"hashed_fraction": 0.0},
    "tail 1 row, floor 30": {"hashed_fraction": 0.0, "min_count": 30},
    "tail 10%, mapping 50%": {"mapping_share": 0.5},
    "tail 1 row, mapping 50%": {"hashed_fraction": 0.0, "mapping_share": 0.5},
}

# A candidate replaces the default only when its mean per-example validation loss is lower by more
# than this many standard errors of the paired difference.
SIGNIFICANCE = 2.0

# The bytes a compressed table may take, as multiples of the budget its split gives it (its full size is
# the other candidate): a large table of rarely seen ids may give up to three quarters of its bytes, a
# small one of often seen ids grow up to 8x or to its full size; steps of a half or less below 2x, so
# that the bytes one table gives up can buy another a step. Chosen on validation (docs/results.md, stop 23).
BYTES_MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)


def collided_rows(learned: LearnedModel, table: str, profile: Union[IdProfile, ProfileShare],
                  mapping: IdMapping) -> torch.Tensor:
    """The learn model's rows of ``table`` as ``mapping`` would make them: each profiled id reads the
    access-weighted mean of the learned embeddings of the ids that share its row under ``mapping``
    (a learned row that several ids read, e.g. of the learn step's hashed region, gets their mean).
    Rows no profiled id reads (unseen ids only) keep their learned values.

    ``profile``: the whole profile, or this rank's :class:`ProfileShare` of it (each id in one rank's
    share): then the sums over ids are added up across the ranks (collective), the same rows on every rank."""
    if mapping.probes != 1:
        raise ValueError(f"table '{table}': a per-table choice needs one row per id, not {mapping.method}")
    shared = isinstance(profile, ProfileShare)
    ids_profile = profile.profile if shared else profile
    weight = learned.weights[table]
    ids = torch.from_numpy(ids_profile.ids)
    counts = torch.from_numpy(ids_profile.counts).to(torch.float32)
    learned_rows = learned.learned_rows(table, ids)
    rows = mapping(ids)
    means, _ = row_means(rows, weight[learned_rows], counts, mapping.num_rows, across_ranks=shared)
    collided, reached = row_means(learned_rows, means[rows], counts, weight.shape[0], across_ranks=shared)
    return torch.where(reached[:, None], collided, weight)


def _example_losses(learned: LearnedModel, validation: CTRSource) -> torch.Tensor:
    logits, labels = learned.trainer.predict(validation)
    return F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="none")


def table_losses(
    learned: LearnedModel, validation: CTRSource, table: str, profile: Union[IdProfile, ProfileShare],
    candidates: Mapping[str, IdMapping],
) -> Dict[str, torch.Tensor]:
    """Candidate label -> per-example validation loss of the learn model with ``table``'s rows collided
    by that candidate's mapping (:func:`collided_rows`), the other tables as learned; the learned rows
    are written back afterwards."""
    out: Dict[str, torch.Tensor] = {}
    for label, mapping in candidates.items():
        learned.trainer.write_table_weights({table: collided_rows(learned, table, profile, mapping)})
        out[label] = _example_losses(learned, validation)
    learned.trainer.write_table_weights({table: learned.weights[table]})
    return out


def choose(losses: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, float]]:
    """(chosen label, mean loss of each label) among one table's candidates (the first label is the
    default): the candidate with the lowest mean among those whose paired difference to the default
    is below zero by more than :data:`SIGNIFICANCE` standard errors; the default if none is."""
    labels = list(losses)
    default = losses[labels[0]]
    means = {label: float(v.mean()) for label, v in losses.items()}
    better = []
    for label in labels[1:]:
        difference = losses[label] - default
        error = float(difference.std()) / math.sqrt(max(1, difference.numel()))
        if float(difference.mean()) + SIGNIFICANCE * error < 0:
            better.append(label)
    return (min(better, key=means.get) if better else labels[0]), means


def cheapest_within(options: Mapping[str, Mapping[Any, Tuple[int, float]]], total: int) -> Dict[str, Any]:
    """A multiple-choice knapsack: ``options`` gives each table its candidates, each (bytes, loss); the choice
    of one candidate per table with the lowest summed loss whose bytes sum to at most ``total`` (exact:
    the Pareto frontier of (bytes, loss) over the tables so far, each step keeping only the choices no
    cheaper one beats). Ties go to fewer bytes. Raises when no choice fits."""
    frontier: List[Tuple[int, float, Dict[str, Any]]] = [(0, 0.0, {})]
    for table in sorted(options):
        grown = sorted(((spent + cost, loss + more, {**choice, table: key})
                        for spent, loss, choice in frontier
                        for key, (cost, more) in options[table].items() if spent + cost <= total),
                       key=lambda entry: (entry[0], entry[1]))
        frontier = []
        for entry in grown:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
        if not frontier:
            raise ValueError(f"no choice of the tables' candidates fits {total} bytes")
    return min(frontier, key=lambda entry: (entry[1], entry[0]))[2]


def choose_budgets(
    learned: LearnedModel,
    validation: CTRSource,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, Union[IdProfile, ProfileShare]],
    split: FittedTables,
    fit: Callable[[EmbeddingBagConfig, int], IdMapping],
    optimizer: str,
) -> Tuple[Dict[str, int], Dict[str, str]]:
    """(each table to compress and its bytes, each compressed table's label: ``"x2 bytes"``, ``"full size"``):
    the bytes of ``split`` (the default setting fitted at the split's budgets) moved across its tables
    where the learn model's proxy says so (module docstring), within their total.

    ``fit(table, budget)`` fits the default setting on one table at a budget. A table's candidates are
    :data:`BYTES_MULTIPLES` of its budget under its full size that can hold the method at all, and its
    full size (the learned rows unchanged, what the proxy loses nothing on). The knapsack's choice
    (:func:`cheapest_within`, on mean losses) is kept only when its summed per-example loss differences to
    the split's budgets are below zero by more than :data:`SIGNIFICANCE` standard errors; else the split's
    budgets stay."""
    if not split.budgets:  # every table stays full size: no bytes to move
        return {}, {}
    configs = {t.name: t for t in tables}
    unchanged = _example_losses(learned, validation)
    losses: Dict[str, Dict[Optional[float], torch.Tensor]] = {}
    options: Dict[str, Dict[Optional[float], Tuple[int, float]]] = {}
    full = {n: full_size_bytes(_summary(profiles[n]), configs[n], optimizer) for n in split.budgets}
    for name in sorted(split.budgets):
        budgets = {m: int(m * split.budgets[name]) for m in BYTES_MULTIPLES
                   if int(m * split.budgets[name]) < full[name]}
        budgets[1.0] = split.budgets[name]
        candidates = {}
        for multiple, budget in sorted(budgets.items()):
            try:
                candidates[multiple] = split.compression.mappings[name] if multiple == 1.0 else fit(configs[name], budget)
            except BudgetTooSmall as e:
                logger.info("not a candidate: %s", e)
        losses[name] = {**table_losses(learned, validation, name, profiles[name], candidates), None: unchanged}
        options[name] = {m: (budgets[m] if m is not None else full[name], float(losses[name][m].mean()))
                         for m in losses[name]}
    total = sum(split.budgets.values())
    chosen = cheapest_within(options, total)
    difference = sum(losses[n][chosen[n]] - losses[n][1.0] for n in chosen)
    error = float(difference.std()) / math.sqrt(max(1, difference.numel()))
    if float(difference.mean()) + SIGNIFICANCE * error >= 0:
        chosen = {n: 1.0 for n in chosen}
    for name, multiple in chosen.items():
        logger.info("table '%s': %s (validation loss with its rows collided at each multiple of its budget: %s)",
                    name, _bytes_label(multiple), ", ".join(
                        f"{_bytes_label(m)} {loss:.5f}" for m, (_, loss) in options[name].items()))
    budgets = {n: options[n][m][0] for n, m in chosen.items() if m is not None}
    left = total - sum(options[n][m][0] for n, m in chosen.items())
    return spread_leftover(budgets, left, full), {n: _bytes_label(m) for n, m in chosen.items()}


def _bytes_label(multiple: Optional[float]) -> str:
    return "full size" if multiple is None else f"x{multiple:g} bytes"


def _summary(profile: Union[IdProfile, ProfileShare]) -> Union[IdProfile, ProfileSummary]:
    return profile.summary if isinstance(profile, ProfileShare) else profile


def fit_per_table(
    learned: LearnedModel,
    validation: CTRSource,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, Union[IdProfile, ProfileShare]],
    method: str = "combination",
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    budget_split: str = "table",
    settings: Mapping[str, Mapping[str, Any]] = TABLE_SETTINGS,
    **hyperparams,
) -> Tuple[FittedTables, Dict[str, str]]:
    """``method`` fitted within the bytes of ``1 / compression`` of the tables (split by ``budget_split``)
    with each table's bytes (:func:`choose_budgets`) and then its setting chosen among ``settings``
    (label -> the fit's settings, the first the default) on ``validation`` by the learn model's proxy
    loss (module docstring), and each compressed table's choice (``"x2 bytes, tail 10%, floor 10"``, or
    ``"full size"`` where it took its full size).

    Each setting is fitted on every table (as :func:`~lhf_torchrec.pipeline.steps.fit_mappings`,
    with ``hyperparams`` too) at the chosen budgets, so every table keeps within its own bytes whichever
    setting it chooses, and the total within the split's. ``profiles``: whole, or each rank's shares (a
    bucketed fit across ranks, :func:`~lhf_torchrec.pipeline.steps.share_tables`)."""
    fit = functools.partial(fit_mappings, profiles=profiles, method=method, compression=compression,
                            optimizer=optimizer, embeddings=learned.embeddings, seed=seed, budget_split=budget_split)
    default_setting = next(iter(settings.values()))
    split = fit(tables, **{**hyperparams, **default_setting})

    def fit_default(table: EmbeddingBagConfig, budget: int) -> IdMapping:
        return fit([table], budgets={table.name: budget}, **{**hyperparams, **default_setting}).compression.mappings[
            table.name]

    budgets, bytes_chosen = choose_budgets(learned, validation, tables, profiles, split, fit_default, optimizer)
    fits = {label: split if setting is default_setting and budgets == split.budgets
            else fit(tables, budgets=budgets, **{**hyperparams, **setting}) for label, setting in settings.items()}
    default = next(iter(fits.values()))
    setting_of: Dict[str, str] = {}
    for name in sorted(budgets):  # one table's losses at a time: candidates x validation examples
        setting_of[name], means = choose(table_losses(
            learned, validation, name, profiles[name], {label: f.compression.mappings[name] for label, f in fits.items()}))
        logger.info("table '%s' at %gx, %s: %s (validation loss with its rows collided: %s)", name, compression,
                    bytes_chosen[name], setting_of[name], ", ".join(f"{label} {v:.5f}" for label, v in means.items()))
    mappings = {**default.compression.mappings,
                **{name: fits[label].compression.mappings[name] for name, label in setting_of.items()}}
    chosen = {name: f"{label}, {setting_of[name]}" if name in setting_of else label
              for name, label in bytes_chosen.items()}
    summaries = {name: _summary(p) for name, p in profiles.items()}
    return fitted_tables(method, tables, summaries, mappings, optimizer, default.budgets), chosen


__all__ = [
    "BYTES_MULTIPLES",
    "SIGNIFICANCE",
    "TABLE_SETTINGS",
    "cheapest_within",
    "choose",
    "choose_budgets",
    "collided_rows",
    "fit_per_table",
    "table_losses",
]
