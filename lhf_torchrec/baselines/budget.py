"""What a fitted baseline costs: rows and bytes per table, all state counted.

Budgets follow the rules every method shares (:mod:`lhf_torchrec.mapping.tables`): a compressed
table gets its full bytes / compression, small tables stay full size behind the full-table
baseline's vocabulary. Whatever a baseline keeps besides its tables (MCH's per-slot ids and
counters, CCE's pointers) is counted in ``mapping_bytes``, as a mapping is.
"""

from typing import Dict, Mapping

from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.tables import TableBudget
from lhf_torchrec.training.compression import FittedTables, RemapCompression


def account(compression: RemapCompression, optimizer: str, budgets: Mapping[str, TableBudget]) -> FittedTables:
    """What the fitted baseline costs: rows and bytes per table, summed."""
    remap = compression.remapper
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
    return FittedTables(remap.method, compression, rows, int(table_bytes), int(mapping_bytes),
                        {name: b.budget_bytes for name, b in budgets.items()}, per_table)
