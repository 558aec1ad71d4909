"""Table-level budget rules every method shares: full rows, vocabularies, which tables to compress.

"Full table" means one row per id the model can be asked about: for a dense id space (ids in
``[0, num_embeddings)``, all of them profiled or not) the table itself; for a sparse one (e.g. raw
32-bit Criteo hashes, where ``num_embeddings`` is the size of the hash space) a *vocabulary*: every
profiled id gets a row, and one extra row takes every id never seen.

A compressed table's budget is its full rows x :func:`~lhf_torchrec.mapping.budget.row_bytes`
(fp32 weights + the table optimizer's state) divided by the compression, whatever the method; tables
with fewer than ``MIN_COMPRESSED_ROWS`` full rows (or no profiled id) stay full size for every method.
With ``budget_split="access"`` the same total is split across the compressed tables by the accesses an
id's row takes (:func:`split_by_access`), again the same for every method.

The learn step (:func:`lhf_torchrec.pipeline.steps.learn_model`) does not train full tables:
:func:`learn_mappings` gives it a row for each id seen at least ``min_count`` times (the ids the
learned methods can cluster) and a small hashed region for every other id.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.id_mapping import IdMapping, storage_cost
from lhf_torchrec.mapping.profile import IdProfile, ProfileSummary

# Tables smaller than this stay full size for every method: compressing a table of a few rows
# saves nothing and only adds noise to comparisons.
MIN_COMPRESSED_ROWS = 100

# How a compression's bytes go to the tables it compresses (every method gets the same budgets):
# "table": each table 1 / compression of its full bytes; "access": their total, split by the share of
# a table's accesses an id's row takes (split_by_access).
BUDGET_SPLITS = ("table", "access")

# Under the "access" split no table gets less than this share of its own "table" budget, so the large
# tables of rarely seen ids keep rows for their hashed tail and their unseen ids. Chosen on validation
# (docs/results.md, "Splitting the budget across tables").
ACCESS_SPLIT_FLOOR = 0.5


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
    seed: int = 0, budget_split: str = "table", budgets: Optional[Mapping[str, int]] = None,
) -> Tuple[Dict[str, TableBudget], Dict[str, IdMapping]]:
    """(budgets of the tables to compress, vocabularies of the full-size tables that need one).

    ``budgets``: each table to compress and its bytes, given (the others stay full size), in place of
    the compression's (:func:`compressed_budgets`)."""
    if compression < 1:
        raise ValueError(f"compression must be >= 1, got {compression}")
    if budgets is None:
        budgets = compressed_budgets(tables, profiles, profiles, compression=compression, optimizer=optimizer,
                                     budget_split=budget_split)
    kept = {t.name: TableBudget(t, profiles[t.name], full_rows(profiles[t.name], t), budgets[t.name],
                                dense_ids=not needs_vocabulary(profiles[t.name], t))
            for t in tables if t.name in budgets}
    return kept, vocabulary_mappings(profiles, [t for t in tables if t.name not in budgets], seed)


def compressed_budgets(
    tables: List[EmbeddingBagConfig], profiles: Mapping[str, IdProfile],
    summaries: Mapping[str, Union[IdProfile, ProfileSummary]], *, compression: float, optimizer: str,
    budget_split: str, sum_across: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Dict[str, int]:
    """The bytes of each table to compress (the others stay full size): :func:`compressed_budget` of each
    table, split by :func:`split_by_access` for ``budget_split="access"`` (its ``profiles``, ``summaries`` and
    ``sum_across``; ``summaries`` may be the ``profiles`` themselves when they are whole)."""
    check_budget_split(budget_split)
    budgets = {t.name: compressed_budget(summaries[t.name], t, compression, optimizer) for t in tables}
    budgets = {name: b for name, b in budgets.items() if b is not None}
    if budget_split == "access" and budgets:  # nothing to split when every table stays full size
        split = split_by_access(budgets, {t.name: t for t in tables}, profiles, summaries, optimizer, sum_across)
        budgets = {name: b for name, b in split.items() if b is not None}
    return budgets


def check_budget_split(budget_split: str) -> None:
    if budget_split not in BUDGET_SPLITS:
        raise ValueError(f"budget_split must be one of {', '.join(map(repr, BUDGET_SPLITS))}, got {budget_split!r}")


def full_size_bytes(profile: Union[IdProfile, ProfileSummary], table: EmbeddingBagConfig, optimizer: str) -> int:
    """What the table costs at full size: its full rows and, for sparse ids, its vocabulary's entries."""
    rows = full_rows(profile, table)
    vocabulary = storage_cost(profile.num_ids, profile.max_id - profile.min_id + 1, rows)[1] \
        if needs_vocabulary(profile, table) and profile.num_ids else 0
    return rows * row_bytes(table.embedding_dim, optimizer) + vocabulary


def split_by_access(
    budgets: Mapping[str, int],
    tables: Mapping[str, EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    summaries: Mapping[str, Union[IdProfile, ProfileSummary]],
    optimizer: str,
    sum_across: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Dict[str, Optional[int]]:
    """The total of the per-table ``budgets`` (bytes) split across their tables by access; ``None`` for
    a table that gets its full size (it then stays full, as tables too small to compress do).

    A row of its own is worth, to an id, the share of its table's accesses the id takes, per byte of the
    table's row. One threshold on that worth, the same for every table, gives each table the bytes of the
    rows of its ids above it: a table whose few ids each take a large share of its accesses (the small
    tables, which a uniform compression leaves with a handful of rows) grows, up to its full size (with
    its vocabulary's bytes where its ids are sparse), and the large tables of rarely seen ids give bytes
    up, down to ``ACCESS_SPLIT_FLOOR`` of their own budget. The threshold is the lowest whose bytes fit
    the total; what its ties leave over goes to the compressed tables in proportion to their bytes.

    ``profiles`` hold this process's ids (every id, or a rank's share of them: then ``sum_across`` sums
    the tables' counts of ids over the ranks, and ``summaries`` describe the whole profiles; without it the
    counts are this process's)."""
    total = sum(budgets.values())
    names = sorted(budgets)
    rb = {n: row_bytes(tables[n].embedding_dim, optimizer) for n in names}
    full = {n: full_size_bytes(summaries[n], tables[n], optimizer) for n in names}
    floor = {n: int(ACCESS_SPLIT_FLOOR * budgets[n]) for n in names}
    counts = {n: np.sort(profiles[n].counts) for n in names}  # ascending

    def split_at(worth: float) -> Dict[str, Optional[int]]:
        # Ids whose count / (table's accesses x row bytes) >= worth, in every table (summed over ranks).
        above = np.array([len(counts[n]) - np.searchsorted(
            counts[n], worth * summaries[n].total * rb[n], side="left") for n in names], dtype=np.int64)
        above = above if sum_across is None else sum_across(above)
        return {n: None if rows >= summaries[n].num_ids else max(floor[n], min(int(rows) * rb[n], full[n]))
                for n, rows in zip(names, above)}

    def spent(split: Dict[str, Optional[int]]) -> int:
        return sum(full[n] if b is None else b for n, b in split.items())

    low, high = 0.0, 2.0 / min(rb.values())  # every table full size; no id above (a count <= its total)
    for _ in range(100):  # bisection to the float's precision
        middle = (low + high) / 2
        low, high = (middle, high) if spent(split_at(middle)) > total else (low, middle)
    split = split_at(high)
    compressed = {n: b for n, b in split.items() if b is not None}
    split.update(spread_leftover(compressed, total - spent(split), full))
    return split


def spread_leftover(budgets: Mapping[str, int], left: int, full: Mapping[str, int]) -> Dict[str, int]:
    """``budgets`` with ``left`` bytes more spread over them in proportion to their bytes, each table
    staying under its ``full`` size (so it stays compressed): a split that left bytes unspent gives
    them to the tables it compressed."""
    if not budgets or left <= 0:
        return dict(budgets)
    scale = 1 + left / sum(budgets.values())
    return {n: min(int(b * scale), full[n] - 1) for n, b in budgets.items()}


def compressed_budget(
    profile: Union[IdProfile, ProfileSummary], table: EmbeddingBagConfig, compression: float, optimizer: str
) -> Optional[int]:
    """The table's budget in bytes (full bytes / ``compression``), or None when it stays full size."""
    n_full = full_rows(profile, table)
    if n_full < MIN_COMPRESSED_ROWS or profile.num_ids == 0:
        return None
    return int(n_full * row_bytes(table.embedding_dim, optimizer) / compression)
