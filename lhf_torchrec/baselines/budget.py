"""Budgets of the baselines: which tables they compress, into how many bytes, and what it all costs.

The rules are the ones :func:`lhf_torchrec.pipeline.steps.fit_mappings` applies to every mapping
method, so that all methods are compared at equal total bytes: a table's budget is its full rows x
:func:`~lhf_torchrec.mapping.budget.row_bytes` (fp32 weights + the table optimizer's state) divided
by the compression; tables with fewer than ``MIN_COMPRESSED_ROWS`` full rows (or no profiled id)
stay full size, behind the same vocabulary the full-table baseline uses for sparse id spaces.
Whatever a baseline keeps besides its tables (MCH's per-slot ids and counters, CCE's pointers) is
counted in ``mapping_bytes``, as a mapping is.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

from torchrec import EmbeddingBagConfig

from lhf_torchrec.baselines.composed import EmbeddingRemap
from lhf_torchrec.baselines.compression import BaselineCompression
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.pipeline.steps import MIN_COMPRESSED_ROWS, full_rows, needs_vocabulary, vocabulary_mappings


@dataclass(frozen=True)
class TableBudget:
    """A table a baseline compresses: its profile, full size and budget (bytes, all state counted)."""

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
        n_full = full_rows(profile, t)
        if n_full < MIN_COMPRESSED_ROWS or profile.num_ids == 0:
            continue
        vocabularies.pop(t.name, None)
        budget = int(n_full * row_bytes(t.embedding_dim, optimizer) / compression)
        budgets[t.name] = TableBudget(t, profile, n_full, budget, dense_ids=not needs_vocabulary(profile, t))
    return budgets, vocabularies


@dataclass(frozen=True)
class BaselineFit:
    """A fitted baseline: the compression to train with and what every table costs.

    ``rows``: rows of every table (a compressed table: the rows of all the tables that replace it);
    ``table_bytes``: weights + optimizer state; ``mapping_bytes``: vocabularies and the baseline's
    own state (:meth:`EmbeddingRemap.state_bytes`); ``budgets``: the byte budget of each compressed
    table; ``per_table_bytes``: everything a table costs (tables + state).
    """

    method: str
    compression: BaselineCompression
    rows: Dict[str, int]
    table_bytes: int
    mapping_bytes: int
    budgets: Dict[str, int]
    per_table_bytes: Dict[str, int]

    @property
    def remap(self) -> EmbeddingRemap:
        return self.compression.remap

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.mapping_bytes


def account(compression: BaselineCompression, optimizer: str, budgets: Mapping[str, TableBudget]) -> BaselineFit:
    """What the fitted baseline costs: rows and bytes per table, summed."""
    remap = compression.remap
    rows: Dict[str, int] = {}
    per_table: Dict[str, int] = {}
    table_bytes = mapping_bytes = 0
    for name in remap.configs:
        inner = remap.tables_of(name)
        rows[name] = sum(c.num_embeddings for c in inner)
        weights = sum(c.num_embeddings * row_bytes(c.embedding_dim, optimizer) for c in inner)
        state = remap.state_bytes(name) if name in budgets else (
            remap.vocabularies[name].nbytes if name in remap.vocabularies else 0)
        per_table[name] = weights + state
        table_bytes += weights
        mapping_bytes += state
    return BaselineFit(remap.method, compression, rows, int(table_bytes), int(mapping_bytes),
                       {name: b.budget_bytes for name, b in budgets.items()}, per_table)
