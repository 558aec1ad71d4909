"""Each table's rare tail and clustering floor chosen on validation loss, at fit time (issue 12, item 5).

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

Only the validation split takes part; the test split is never read here.
"""

import logging
import math
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.fit import ProfileShare
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile
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
    """``method`` fitted at ``1 / compression`` of each table's bytes with each table's setting chosen
    among ``settings`` (label -> the fit's settings, the first the default) on ``validation`` by the
    learn model's proxy loss (module docstring), and the label each compressed table chose.

    Each setting is fitted on every table (as :func:`~lhf_torchrec.pipeline.steps.fit_mappings`,
    with ``hyperparams`` too); a table's budget does not depend on the setting, so every table keeps
    within its own bytes whichever it chooses. ``profiles``: whole, or each rank's shares (a bucketed fit
    across ranks, :func:`~lhf_torchrec.pipeline.steps.share_tables`)."""
    fits = {label: fit_mappings(tables, profiles, method, compression=compression, optimizer=optimizer,
                                embeddings=learned.embeddings, seed=seed, budget_split=budget_split,
                                **{**hyperparams, **setting})
            for label, setting in settings.items()}
    default = next(iter(fits.values()))
    compressed = [t.name for t in tables if t.name in default.budgets]
    chosen: Dict[str, str] = {}
    for name in compressed:  # one table's losses at a time: candidates x validation examples
        chosen[name], means = choose(table_losses(learned, validation, name, profiles[name],
                                                  {label: fit.compression.mappings[name] for label, fit in fits.items()}))
        logger.info("table '%s' at %gx: %s (validation loss with its rows collided: %s)", name, compression,
                    chosen[name], ", ".join(f"{label} {v:.5f}" for label, v in means.items()))
    mappings = {**default.compression.mappings,
                **{name: fits[label].compression.mappings[name] for name, label in chosen.items()}}
    summaries = {name: p.summary if isinstance(p, ProfileShare) else p for name, p in profiles.items()}
    return fitted_tables(method, tables, summaries, mappings, optimizer, default.budgets), chosen


__all__ = ["SIGNIFICANCE", "TABLE_SETTINGS", "choose", "collided_rows", "fit_per_table", "table_losses"]
