"""Synthetic mappings for capacity planning: the shape of a fitted mapping without data."""

import math
from typing import Dict, Sequence

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.distributed.planner.memory import format_bytes
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping, storage_cost


# Synthetic mappings leave smaller tables at full size: they are a negligible share of the memory.
MIN_COMPRESSED_IDS = 10_000


def synthetic_mappings(
    tables: Sequence[EmbeddingBagConfig],
    compression: float,
    *,
    optimizer: str = "sgd",
    entry_fraction: float = 0.1,
    min_ids: int = MIN_COMPRESSED_IDS,
) -> Dict[str, IdMapping]:
    """Mappings with the byte cost and row count of a fitted mapping, for planning without data.

    Assumption: a fitted mapping stores an entry for ``entry_fraction`` of a table's ids (hot and
    well-observed ids; every other id is hashed and costs nothing), in the cheaper of sorted
    storage (int32 key + int32 row, 8 bytes per entry) and dense storage (4 bytes per id). The
    table keeps as many rows as fit in ``1 / compression`` of its full training bytes (weights and
    optimizer state) once the mapping is paid for. Tables with fewer than ``min_ids`` ids stay full
    size. The entries are zeros: these mappings are for the planner, never for lookups.
    """
    if not compression > 1:
        raise ValueError(f"compression must be > 1 (full bytes / compressed bytes), got {compression}")
    if not 0.0 <= entry_fraction <= 1.0:
        raise ValueError(f"entry_fraction must be in [0, 1], got {entry_fraction}")
    mappings: Dict[str, IdMapping] = {}
    for table in tables:
        ids = table.num_embeddings
        if ids < min_ids:
            continue
        per_row = row_bytes(table.embedding_dim, optimizer)
        entries = math.ceil(entry_fraction * ids)
        storage, nbytes = storage_cost(entries, ids)
        rows = int((ids * per_row / compression - nbytes) // per_row)
        if rows < 1:
            raise ValueError(
                f"table '{table.name}': {compression}x leaves {format_bytes(ids * per_row / compression)} for "
                f"this table, but its mapping alone needs {format_bytes(nbytes)} ({entries} entries, {storage} "
                "storage); lower the compression or the entry fraction"
            )
        if storage == "dense":
            tensors = {"table": torch.zeros(ids, dtype=torch.int32)}
        elif storage == "sorted":
            key_dtype = torch.int32 if nbytes == 8 * entries else torch.int64
            tensors = {"keys": torch.zeros(entries, dtype=key_dtype), "values": torch.zeros(entries, dtype=torch.int32)}
        else:
            tensors = {}
        mappings[table.name] = IdMapping(
            rows, storage=storage, tensors=tensors, num_entries=entries if tensors else 0, method="synthetic",
            params={"compression": compression, "entry_fraction": entry_fraction}, table_name=table.name,
        )
    return mappings
