"""TorchRec's managed-collision hashing (MCH), profiled on the training stream, then frozen.

TorchRec's ``MCHManagedCollisionModule`` (``torchrec.modules.mc_modules``) keeps ``zch`` slots: a
sorted array of the raw ids that own a slot and the table row of each. In train mode every batch
is recorded and, every ``eviction_interval`` batches, its eviction policy (LFU: access counts; LRU:
last access) lets the incoming ids that beat resident ones take their slots. Its remap sends an
id that owns a slot to that slot's row and every other id to the last row (``zch - 1``, reserved).

Here the MCH is *profiled, then frozen*:

1. **Profile** (TorchRec's code): a ``ManagedCollisionCollection`` of ``MCHManagedCollisionModule``
   (one per compressed table, TorchRec's LFU or LRU policy) is run in train mode over one pass of
   the training stream, in data order, in batches of the global training batch size.
2. **Freeze** (re-expressed here): the learned state (the sorted raw ids and their rows, 16 bytes
   per slot) is copied into :class:`MCHRemap`, whose remap is TorchRec's (``searchsorted`` of the
   id among the slot ids; a hit takes the slot's row, a miss row ``zch - 1``). It stops profiling:
   no eviction counters, no history buffer, no resharding metadata are kept. Tests check that the
   frozen remap equals TorchRec's module's ``remap`` on every id, and that the pooled output equals
   TorchRec's ``ManagedCollisionEmbeddingBagCollection`` in eval mode with the same weights.
3. **Train**: the remap runs replicated in ``input_dist`` in front of a stock EBC of ``zch`` rows
   (:class:`~lhf_torchrec.distributed.sharder.ShardedRemappedEBC`), instead of TorchRec's row-wise
   co-sharded MC-EBC (whose sharder offers no sharding type on CPU, and whose per-shard modules
   would have to be profiled after sharding): any sharding type of the EBC works, and every rank
   holds the same remap because every rank profiles the same full stream. A table planned
   table-wise keeps its frozen state on the rank that owns it only, which remaps its ids after the
   input all-to-all (:class:`~lhf_torchrec.modules.remapped_ebc.PerFeatureRemap`).

Budget: ``zch = floor(budget / (row bytes + 16))`` slots (the frozen state costs 16 bytes per slot:
an int64 raw id and an int64 row, as TorchRec stores them), at most the table's full rows. A live,
still-profiling TorchRec MCH would also keep an int64 counter per slot and 8,224 fixed bytes
(a 1,025-entry resharding segment tensor and scalars): 24 bytes per slot + 8 KB per table.
"""

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)

from lhf_torchrec.baselines.budget import account
from lhf_torchrec.modules.remapped_ebc import PerFeatureRemap
from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.mapping.tables import table_budgets
from lhf_torchrec.training.compression import FittedTables, RemapCompression

logger = logging.getLogger(__name__)

EVICTION_POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}
FROZEN_BYTES_PER_SLOT = 16  # int64 raw id + int64 row


class FrozenMCH(nn.Module):
    """One table's frozen MCH state: sorted slot ids and their rows; misses go to row ``zch - 1``."""

    def __init__(self, sorted_raw_ids: torch.Tensor, remapped_ids: torch.Tensor) -> None:
        super().__init__()
        if sorted_raw_ids.shape != remapped_ids.shape or sorted_raw_ids.numel() < 2:
            raise ValueError(f"an MCH needs >= 2 slots and one row per slot id, got {tuple(sorted_raw_ids.shape)} "
                             f"ids and {tuple(remapped_ids.shape)} rows")
        self.register_buffer("sorted_raw_ids", sorted_raw_ids.to(torch.int64).clone())
        self.register_buffer("remapped_ids", remapped_ids.to(torch.int64).clone())

    @classmethod
    def of(cls, module: MCHManagedCollisionModule) -> "FrozenMCH":
        """The frozen state of a (profiled) TorchRec MCH module."""
        return cls(module._mch_sorted_raw_ids, module._mch_remapped_ids_mapping)

    @property
    def zch_size(self) -> int:
        return self.sorted_raw_ids.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # TorchRec's MCH remap (torchrec.modules.mc_modules._mch_remap): the last slot id is the
        # int64-max sentinel, so the search runs over all but it.
        ids = ids.to(torch.int64)
        position = torch.searchsorted(self.sorted_raw_ids[:-1], ids)
        hit = self.sorted_raw_ids.index_select(0, position) == ids
        return torch.where(hit, self.remapped_ids.index_select(0, position),
                           torch.full_like(ids, self.zch_size - 1))


class MCHRemap(PerFeatureRemap):
    """Frozen MCH remaps in front of tables of ``zch`` rows; other tables pass through."""

    method = "mch"

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        remaps: Mapping[str, FrozenMCH],
        vocabularies: Optional[Mapping[str, IdMapping]] = None,
        settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(tables, vocabularies or {})
        unknown = sorted(set(remaps) - set(self.configs))
        if unknown:
            raise ValueError(f"MCH remaps given for tables {unknown}, which are not among {sorted(self.configs)}")
        self.mch = nn.ModuleDict(dict(remaps))
        self.settings = dict(settings or {})

    @property
    def compressed_tables(self) -> List[str]:
        return sorted(self.mch)

    def config(self) -> Dict[str, Any]:
        return {"settings": self.settings, "zch": {t: m.zch_size for t, m in sorted(self.mch.items())}}

    def state_bytes(self, table: str) -> int:
        return sum(b.numel() * b.element_size() for b in self.mch[table].buffers())

    def tables_of(self, table: str) -> List[EmbeddingBagConfig]:
        config = self.full_table_config(table)
        if table in self.mch:
            config.num_embeddings = self.mch[table].zch_size
        return [config]

    def check_input(self, features: KeyedJaggedTensor) -> None:
        self.check_plain_features(features)

    def remap_feature(
        self, table: str, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        return (self.mch[table](values) if table in self.mch else self.full_ids(table, values)), lengths, weights


def profile_mch(
    train: CTRSource,
    tables: Sequence[EmbeddingBagConfig],
    zch_sizes: Mapping[str, int],
    *,
    batch_size: int,
    eviction_policy: str = "lfu",
    eviction_interval: int = 1,
) -> Dict[str, MCHManagedCollisionModule]:
    """TorchRec MCH modules (``zch_sizes``: table -> slots) after one train-mode pass over ``train``."""
    if eviction_policy not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy '{eviction_policy}'; choose one of {sorted(EVICTION_POLICIES)}")
    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=zch_sizes[t.name],
                                  feature_names=list(t.feature_names)) for t in tables if t.name in zch_sizes]
    modules = {
        c.name: MCHManagedCollisionModule(
            zch_size=c.num_embeddings, device=torch.device("cpu"), eviction_policy=EVICTION_POLICIES[eviction_policy](),
            eviction_interval=eviction_interval, name=c.name,
        )
        for c in configs
    }
    collection = ManagedCollisionCollection(modules, configs)
    collection.train()
    with torch.no_grad():
        for batch in train.batches(batch_size):
            collection(batch.sparse_features)
    return modules


def fit_mch(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    train: CTRSource,
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    batch_size: int = 1024,
    eviction_policy: str = "lfu",
    eviction_interval: int = 1,
    budget_split: str = "table",
) -> FittedTables:
    """TorchRec's MCH for every table at ``1 / compression`` of its full bytes (see the module doc;
    ``budget_split``: :func:`~lhf_torchrec.mapping.tables.table_budgets`').

    ``train`` is profiled in data order in batches of ``batch_size``: the global training batch
    (per-rank batch x ranks), what one training step shows a TorchRec MCH whose shards see every
    rank's ids. ``seed`` only seeds the vocabularies of full-size tables (MCH is deterministic).
    """
    budgets, vocabularies = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed,
                                        budget_split=budget_split)
    zch_sizes = {}
    for name, budget in budgets.items():
        slots = budget.budget_bytes // (row_bytes(budget.config.embedding_dim, optimizer) + FROZEN_BYTES_PER_SLOT)
        if slots < 2:
            raise ValueError(f"table '{name}': a budget of {budget.budget_bytes} bytes holds {slots} MCH slots; "
                             "MCH needs 2 (one for ids, one for misses)")
        zch_sizes[name] = min(slots, budget.full_rows)
    modules = profile_mch(train, tables, zch_sizes, batch_size=batch_size, eviction_policy=eviction_policy,
                          eviction_interval=eviction_interval)
    settings = {"eviction_policy": eviction_policy, "eviction_interval": eviction_interval, "batch_size": batch_size}
    remap = MCHRemap(tables, {name: FrozenMCH.of(m) for name, m in modules.items()}, vocabularies, settings)
    return account(RemapCompression(remap), optimizer, budgets)
