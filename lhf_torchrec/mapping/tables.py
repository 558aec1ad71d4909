"""Table-level budget rules every method shares: full rows, vocabularies, which tables to compress.

"Full table" means one row per id the model can be asked about: for a dense id space (ids in
``[0, num_embeddings)``, all of them profiled or not) the table itself; for a sparse one (e.g. raw
32-bit Criteo hashes, where ``num_embeddings`` is the size of the hash space) a *vocabulary*: every
profiled id gets a row, and one extra row takes every id never seen.

A compressed table's budget is its full rows x :func:`~lhf_torchrec.mapping.budget.row_bytes`
(fp32 weights + the table optimizer's state) divided by the compression, whatever the method; tables
with fewer than ``MIN_COMPRESSED_ROWS`` full rows (or no profiled id) stay full size for every method.

The learn step (:func:`lhf_torchrec.pipeline.steps.learn_model`) does not train full tables:
:func:`learn_mappings` gives it a row for each id seen at least ``min_count`` times (the ids the
learned methods can cluster) and a small hashed region for every other id.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile, ProfileSummary

# Tables smaller than this stay full size for every method: compressing a table of a few rows
# saves nothing and only adds noise to comparisons.
MIN_COMPRESSED_ROWS = 100


def needs_vocabulary(profile: Union[IdProfile, ProfileSummary], table: EmbeddingBagConfig) -> bool:
    """True when the table's id space is too sparse to hold as a table (a vocabulary is smaller)."""
    return profile.num_ids + 1 < table.num_embeddings or (
        profile.num_ids > 0 and (profile.min_id < 0 or profile.max_id >= table.num_embeddings)
    )


def full_rows(profile: Union[IdProfile, ProfileSummary], table: EmbeddingBagConfig) -> int:
    """Rows of the full (uncompressed) table: the table, or the vocabulary plus one unseen-id row."""
    return profile.num_ids + 1 if needs_vocabulary(profile, table) else table.num_embeddings


def vocabulary_mappings(
    profiles: Mapping[str, IdProfile], tables: List[EmbeddingBagConfig], seed: int = 0
) -> Dict[str, IdMapping]:
    """The full-table baseline's mappings: a vocabulary for sparse id spaces, nothing for dense ones."""
    out = {}
    for t in tables:
        profile = profiles[t.name]
        if not needs_vocabulary(profile, t):
            continue
        if profile.num_ids > 0:
            out[t.name] = fit_mapping(profile, method="frequency", num_rows=profile.num_ids + 1,
                                      hot_fraction=1.0, seed=seed, table=t.name)
        else:  # no id in the training split (a column filled in later): every id is unseen, one row
            out[t.name] = fit_mapping(None, method="hash", num_rows=1, seed=seed, table=t.name)
    return out


# The learn step's hashed region, as a share of its kept rows (rows of ids seen >= min_count times):
# combination's default share of hash rows (hashed_fraction=0.1), so the learn model sees the rarely
# seen ids as the compressed models do (many to a shared row), and its tables stay within 1.1x of
# what the kept ids need. The region's rows are never read back (no fit uses a rare id's embedding).
LEARN_HASH_SHARE = 0.1


def learn_mappings(
    profiles: Mapping[str, IdProfile], tables: List[EmbeddingBagConfig], min_count: int, seed: int = 0,
    summaries: Optional[Mapping[str, ProfileSummary]] = None,
) -> Dict[str, IdMapping]:
    """The learn step's mappings: a ``frequency`` mapping per table whose entries (one row each) are
    the ids seen at least ``min_count`` times; every other id (rarer, unseen) is hashed into
    ``ceil(LEARN_HASH_SHARE x kept)`` rows (at least 1, at most one per rarer profiled id). A table
    of dense ids with no more rows than that keeps no mapping (its ids are its rows).

    ``summaries``: the whole profiles' summaries when ``profiles`` hold only the ids seen at least
    ``min_count`` times (and the whole ``total``), as a distributed learn step gathers them."""
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    out = {}
    for t in tables:
        profile = profiles[t.name]
        whole = (summaries or {}).get(t.name, profile)
        kept = int((profile.counts >= min_count).sum())
        hashed = max(1, min(math.ceil(LEARN_HASH_SHARE * kept), whole.num_ids - kept))
        if not needs_vocabulary(whole, t) and t.num_embeddings <= kept + hashed:
            continue
        if kept == 0:  # nothing to keep: every id is hashed
            out[t.name] = fit_mapping(None, method="hash", num_rows=hashed, seed=seed, table=t.name)
        else:  # the kept ids are the first `kept` by access count: frequency's hot ids
            out[t.name] = fit_mapping(profile, method="frequency", num_rows=kept + hashed,
                                      hot_fraction=kept / (kept + hashed), seed=seed, table=t.name)
    return out


def full_table_bytes(
    tables: List[EmbeddingBagConfig], profiles: Mapping[str, Union[IdProfile, ProfileSummary]], optimizer: str = "sgd"
) -> int:
    """Bytes of the uncompressed tables (weights and optimizer state)."""
    return int(sum(full_rows(profiles[t.name], t) * row_bytes(t.embedding_dim, optimizer) for t in tables))


@dataclass(frozen=True)
class TableBudget:
    """A table to compress: its profile, full size and budget (bytes, all state counted)."""

    config: EmbeddingBagConfig
    profile: IdProfile
    full_rows: int
    budget_bytes: int
    dense_ids: bool  # ids are rows of the full table (no vocabulary needed)


def table_budgets(
    tables: List[EmbeddingBagConfig], profiles: Mapping[str, IdProfile], *, compression: float, optimizer: str,
    seed: int = 0,
) -> Tuple[Dict[str, TableBudget], Dict[str, IdMapping]]:
    """(budgets of the tables to compress, vocabularies of the full-size tables that need one)."""
    if compression < 1:
        raise ValueError(f"compression must be >= 1, got {compression}")
    vocabularies = vocabulary_mappings(profiles, tables, seed)
    budgets: Dict[str, TableBudget] = {}
    for t in tables:
        profile = profiles[t.name]
        budget = compressed_budget(profile, t, compression, optimizer)
        if budget is None:
            continue
        vocabularies.pop(t.name, None)
        budgets[t.name] = TableBudget(t, profile, full_rows(profile, t), budget,
                                      dense_ids=not needs_vocabulary(profile, t))
    return budgets, vocabularies


def compressed_budget(
    profile: Union[IdProfile, ProfileSummary], table: EmbeddingBagConfig, compression: float, optimizer: str
) -> Optional[int]:
    """The table's budget in bytes (full bytes / ``compression``), or None when it stays full size."""
    n_full = full_rows(profile, table)
    if n_full < MIN_COMPRESSED_ROWS or profile.num_ids == 0:
        return None
    return int(n_full * row_bytes(table.embedding_dim, optimizer) / compression)
