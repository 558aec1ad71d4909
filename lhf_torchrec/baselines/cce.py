"""Clustered compositional embeddings (CCE; Tsang and Ahle, "Clustering the Sketch: Dynamic
Compression for Embedding Tables", NeurIPS 2023), reimplemented from the paper.

An embedding of dim ``d`` is the concatenation of ``c`` columns of dim ``d / c``. Column ``i`` has two
tables of ``k`` rows, ``M_i`` and ``M'_i``, and two index functions: a pointer ``h_i`` and a random
hash ``h'_i``; the column of id ``x`` is ``M_i[h_i(x)] + M'_i[h'_i(x)]`` (our reading of the paper's
dense CCE). It starts as a sketch (``h_i`` is a random hash too: hashed compositional embeddings) and, every few
steps, clusters it: for every column, k-means with ``k`` centers on the current column embeddings
of the ids gives the new pointers ``h_i(x)`` (the cluster of ``x``) and the new ``M_i`` (the centers);
``h'_i`` becomes a fresh random hash and ``M'_i`` zero; training continues, and the hashed half
learns what the clustered half cannot yet tell apart.

Mapped onto TorchRec: column ``i`` of a table is one table ``<table>__cce<i>`` of ``2k`` rows x
``d / c`` (rows ``[0, k)`` are ``M_i``, rows ``[k, 2k)`` are ``M'_i``) read by a feature
``<feature>__cce<i>`` in which every id contributes its two rows to the bag; the EBC's SUM pooling
adds them (hence SUM pooling only), and ``postprocess`` concatenates the columns. Clustering is a
training callback (:meth:`CCECompression.on_callback`): rank 0 gathers the tables, clusters, and
broadcasts the new pointers, hashes and tables; every rank writes them into its shards and resets
the table optimizer's state of the rewritten tables (they are new tables; this detail is ours).

Deviations from the paper, for equal total bytes (tables + optimizer state + mappings):

* **Pointers are counted**, and so not every id can have one: the ``E`` most accessed ids of the
  profile get pointers (sorted int32/int64 keys + ``c`` int32 pointers each), taking at most
  ``pointer_share`` of the table's budget; every other id keeps a fixed random hash ``h_i``. Only
  ids with pointers are clustered. With a pointer for every id the pointers alone cap the
  compression at ``row bytes / (4c + 4)`` (3x for dim 8 with row-wise Adagrad).
* **Schedule** (ours, for one-epoch runs): ``rounds`` clusterings (default 3) evenly spaced in the
  first epoch, at steps ``round(j * steps_per_epoch / (rounds + 1))``, ``j = 1..rounds``, so the
  tables train as long after the last clustering as between two.
* k-means is the project's (:func:`lhf_torchrec.mapping.kmeans.cluster`, unweighted: every id
  counts once, however often it is accessed); a center without members keeps its row.

Budget of a table: ``c`` tables of ``2k`` rows x ``row_bytes(d / c)`` + pointers + 2 x ``c`` hash
coefficient rows (80 bytes per column); ``k = floor((budget - pointers - hashes) / (2 c row_bytes(d / c)))``.
``c`` = the largest of 4, 2, 1 with ``d / c`` a multiple of 4 (FBGEMM's fused kernels need it).
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec.baselines.budget import account
from lhf_torchrec.distributed.sharder import ShardedRemappedEBC
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap, RemappedEmbeddingBagCollection, split_per_key
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.hashing import hash_coefficients, hash_with_coefficients
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.kmeans import cluster, cluster_centers
from lhf_torchrec.mapping.methods import ranked_ids
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.mapping.tables import table_budgets
from lhf_torchrec.training.compression import FittedTables, RemapCompression
from lhf_torchrec.training.trainer import Trainer

logger = logging.getLogger(__name__)

_INT32_MAX = (1 << 31) - 1


def default_columns(embedding_dim: int) -> int:
    """The largest of 4, 2, 1 columns whose dim is a multiple of 4 (1 if none is)."""
    return next((c for c in (4, 2, 1) if embedding_dim % (4 * c) == 0), 1)


def _mix(*parts: int) -> int:
    """A seed for one (table, column, round) from its parts (any ints, stable across runs)."""
    state = 0
    for part in parts:
        state = hash_coefficients(state ^ (part & ((1 << 64) - 1)))[0]
    return state


def _coefficients(rows: int, seeds: Sequence[int]) -> torch.Tensor:
    return torch.tensor([[rows, *hash_coefficients(s)] for s in seeds], dtype=torch.int64)


class CCEPointers(nn.Module):
    """One table's index functions: pointers of the entry ids and the hashes of every column.

    ``keys``: sorted entry ids (int32 relative to ``offset`` when they fit, else int64);
    ``pointers``: (entries, c) int32 rows of ``M_i``; ``first_hash`` / ``second_hash``: (c, 5)
    coefficients of the fallback ``h_i`` (ids without an entry) and of ``h'_i``.
    """

    def __init__(self, entry_ids: np.ndarray, columns: int, rows: int, seed: int) -> None:
        super().__init__()
        entry_ids = np.sort(np.asarray(entry_ids, dtype=np.int64))
        self.columns, self.rows, self.seed = columns, rows, seed
        self.offset = int(entry_ids[0]) if entry_ids.size else 0
        relative = entry_ids.size == 0 or int(entry_ids[-1]) - self.offset <= _INT32_MAX
        if not relative:
            self.offset = 0
        keys = torch.from_numpy(entry_ids - self.offset)
        self.register_buffer("keys", keys.to(torch.int32 if relative else torch.int64))
        self.register_buffer("first_hash", _coefficients(rows, [_mix(seed, 1, i) for i in range(columns)]))
        self.register_buffer("second_hash", _coefficients(rows, [_mix(seed, 2, i, 0) for i in range(columns)]))
        self.register_buffer("pointers", self._hash(torch.from_numpy(entry_ids), self.first_hash).to(torch.int32))

    @staticmethod
    def _hash(ids: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        return hash_with_coefficients(ids.to(torch.int64)[:, None], coefficients)

    @staticmethod
    def bytes_for(entries: int, span: int, columns: int) -> int:
        """Bytes of a table's index functions with ``entries`` entry ids spread over ``span`` ids."""
        key_bytes = 4 if span - 1 <= _INT32_MAX else 8
        # The hash functions are not counted, for CCE as for every method here: each is a function of
        # a seed (the buffers holding their coefficients are a convenience, not state a model keeps).
        return entries * (key_bytes + 4 * columns)

    @property
    def entry_ids(self) -> torch.Tensor:
        return self.keys.to(torch.int64) + self.offset

    def forward(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows in ``M_i``, rows in ``M'_i`` offset by ``k``), each (n, c) int64."""
        ids = ids.to(torch.int64)
        first = self._hash(ids, self.first_hash)
        if self.keys.numel():
            if self.keys.dtype == torch.int32:
                clamped = ids.clamp(self.offset, self.offset + _INT32_MAX)
                query, in_range = (clamped - self.offset).to(torch.int32), clamped == ids
            else:
                query, in_range = ids, torch.ones_like(ids, dtype=torch.bool)
            position = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
            found = (self.keys.index_select(0, position) == query) & in_range
            first = torch.where(found[:, None], self.pointers.index_select(0, position).to(torch.int64), first)
        return first, self.rows + self._hash(ids, self.second_hash)


@dataclass(frozen=True)
class CCEPlan:
    """One table's CCE: ``columns`` columns of ``2 * rows`` rows; ``entries`` ids get pointers."""

    columns: int
    rows: int
    entries: int


class CCERemap(EmbeddingRemap):
    """Ids -> two rows per column (pointer, hash); columns concatenated in ``postprocess``."""

    method = "cce"

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        pointers: Mapping[str, CCEPointers],
        vocabularies: Optional[Mapping[str, IdMapping]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tables, vocabularies or {})
        for name, p in pointers.items():
            config = self.configs[name]
            if config.pooling != PoolingType.SUM:
                raise ValueError(f"table '{name}': CCE sums a pointer row and a hashed row per id and needs SUM "
                                 f"pooling, the table uses {config.pooling.name}")
            if config.embedding_dim % p.columns:
                raise ValueError(f"table '{name}': dim {config.embedding_dim} is not a multiple of {p.columns} columns")
        self.pointers = nn.ModuleDict(dict(pointers))
        self.seed = seed
        self.register_buffer("rounds_done", torch.zeros((), dtype=torch.int64))

    @property
    def compressed_tables(self) -> List[str]:
        return sorted(self.pointers)

    def config(self) -> Dict[str, Any]:
        return {"seed": self.seed, "tables": {t: {"columns": p.columns, "rows": p.rows, "entries": p.keys.numel()}
                                              for t, p in sorted(self.pointers.items())}}

    def state_bytes(self, table: str) -> int:
        p = self.pointers[table]
        return sum(b.numel() * b.element_size() for b in (p.keys, p.pointers))  # hashes: see bytes_for

    def column_name(self, table: str, column: int) -> str:
        return f"{table}__cce{column}"

    def tables_of(self, table: str) -> List[EmbeddingBagConfig]:
        if table not in self.pointers:
            return [self.full_table_config(table)]
        t, p = self.configs[table], self.pointers[table]
        return [EmbeddingBagConfig(name=self.column_name(table, i), embedding_dim=t.embedding_dim // p.columns,
                                   num_embeddings=2 * p.rows, feature_names=[f"{f}__cce{i}" for f in t.feature_names],
                                   data_type=t.data_type)
                for i in range(p.columns)]

    def preprocess(self, features: KeyedJaggedTensor, stride: Optional[int] = None) -> Tuple[KeyedJaggedTensor, None]:
        self.check_plain_features(features)
        keys: List[str] = []
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for key, ids, bag_lengths in split_per_key(features):
            table = self.feature_to_table[key]
            if table not in self.pointers:
                keys.append(key)
                values.append(self.full_ids(table, ids))
                lengths.append(bag_lengths)
                continue
            first, second = self.pointers[table](ids)
            for i in range(first.shape[1]):
                keys.append(f"{key}__cce{i}")
                values.append(torch.stack([first[:, i], second[:, i]], dim=1).reshape(-1))
                lengths.append(2 * bag_lengths)
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values) if values else features.values(),
                                 lengths=torch.cat(lengths), stride=features.stride()), None

    def postprocess(self, pooled: KeyedTensor, batch: None) -> KeyedTensor:
        columns = pooled.to_dict()
        keys, out = [], []
        for t in self.full_configs:
            for f in t.feature_names:
                keys.append(f)
                if t.name in self.pointers:
                    out.append(torch.cat([columns[f"{f}__cce{i}"] for i in range(self.pointers[t.name].columns)], 1))
                else:
                    out.append(columns[f])
        return KeyedTensor.from_tensor_list(keys, out)

    # ------------------------------------------------------------------ clustering
    @torch.no_grad()
    def cluster_round(self, weights: Mapping[str, torch.Tensor], n_iter: int = 20) -> Dict[str, Any]:
        """The next round's state from the current full tables (``weights``: inner table -> weight).

        Returns ``{"pointers": {table: (E, c) int32}, "second_hash": {table: (c, 5)},
        "weights": {inner table: (2k, d/c)}}``; :meth:`load_round` installs the first two.
        """
        round_ = int(self.rounds_done) + 1
        out: Dict[str, Dict[str, torch.Tensor]] = {"pointers": {}, "second_hash": {}, "weights": {}}
        for number, (table, p) in enumerate(sorted(self.pointers.items())):
            first, second = (rows.cpu() for rows in p(p.entry_ids))
            new_pointers = p.pointers.detach().cpu().clone()
            for i in range(p.columns):
                name = self.column_name(table, i)
                weight = weights[name].float()
                new = weight.clone()
                new[p.rows:] = 0
                if first.numel():
                    x = weight.index_select(0, first[:, i]) + weight.index_select(0, second[:, i])
                    ones = torch.ones(x.shape[0])
                    labels = cluster(x, ones, p.rows, seed=_mix(self.seed, 3, number, i, round_), n_iter=n_iter,
                                     progress=False)
                    members = torch.bincount(labels, minlength=p.rows) > 0
                    centers = cluster_centers(x, ones, labels, p.rows)
                    new[: p.rows][members] = centers[members]
                    new_pointers[:, i] = labels.to(torch.int32)
                out["weights"][name] = new.to(weights[name].dtype)
            out["pointers"][table] = new_pointers
            out["second_hash"][table] = _coefficients(p.rows, [_mix(p.seed, 2, i, round_) for i in range(p.columns)])
        return out

    @torch.no_grad()
    def load_round(self, state: Mapping[str, Any]) -> None:
        """Installs the index functions of a round computed by :meth:`cluster_round`."""
        for table, p in self.pointers.items():
            p.pointers.copy_(state["pointers"][table])
            p.second_hash.copy_(state["second_hash"][table])
        self.rounds_done += 1


def fit_cce(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    columns: Optional[int] = None,
    pointer_share: float = 0.25,
    rounds: int = 3,
    n_iter: int = 20,
    budget_split: str = "table",
) -> FittedTables:
    """CCE for every table at ``1 / compression`` of its full bytes (see the module doc;
    ``budget_split``: :func:`~lhf_torchrec.mapping.tables.table_budgets`').

    The fit sizes the tables and picks the ids with pointers; the clustering happens in training,
    through ``fitted.compression`` (a :class:`CCECompression`: ``rounds`` clusterings of ``n_iter``
    Lloyd steps at most).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 <= pointer_share < 1:
        raise ValueError(f"pointer_share must be in [0, 1), got {pointer_share}")
    budgets, vocabularies = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed,
                                        budget_split=budget_split)
    pointers = {}
    for number, (name, budget) in enumerate(sorted(budgets.items())):
        dim = budget.config.embedding_dim
        c = columns or default_columns(dim)
        if dim % c:
            raise ValueError(f"table '{name}': dim {dim} is not a multiple of {c} columns")
        if columns is None:
            # A tiny budget may not hold two rows per column: use fewer, wider columns.
            while c > 1 and budget.budget_bytes < 2 * c * row_bytes(dim // c, optimizer):
                c //= 2
        ranked = ranked_ids(budget.profile)
        low, high = np.minimum.accumulate(ranked), np.maximum.accumulate(ranked)

        def cost(entries: int) -> int:
            span = int(high[entries - 1]) - int(low[entries - 1]) + 1 if entries else 0
            return CCEPointers.bytes_for(entries, span, c)

        per_row = 2 * c * row_bytes(dim // c, optimizer)
        # The most entries whose pointers fit in pointer_share of the budget and leave room for a row.
        pointer_budget = min(pointer_share * budget.budget_bytes, budget.budget_bytes - per_row)
        lo, hi = 0, ranked.size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= pointer_budget:
                lo = mid
            else:
                hi = mid - 1
        rows = min((budget.budget_bytes - cost(lo)) // per_row, budget.full_rows)
        if rows < 1:
            raise ValueError(f"table '{name}': a budget of {budget.budget_bytes} bytes cannot hold CCE's {c} columns "
                             f"of 2 rows ({per_row} bytes)")
        pointers[name] = CCEPointers(np.sort(ranked[:lo]), c, int(rows), _mix(seed, 4, number))
    remap = CCERemap(tables, pointers, vocabularies, seed=seed)
    return account(CCECompression(remap, rounds=rounds, n_iter=n_iter), optimizer, budgets)


@dataclass
class CCECompression(RemapCompression):
    """CCE as a :class:`~lhf_torchrec.training.compression.Compression` with a training callback:
    the trainer calls :meth:`on_callback` on every rank after each of :meth:`callback_steps`, with
    the pipeline drained."""

    rounds: int = 3
    n_iter: int = 20

    def callback_steps(self, steps_per_epoch: int) -> List[int]:
        """The global steps after which to cluster: ``rounds`` evenly spaced in the first epoch."""
        return sorted({max(1, round(j * steps_per_epoch / (self.rounds + 1))) for j in range(1, self.rounds + 1)})

    def on_callback(self, trainer: Trainer) -> None:
        """One clustering round of the trainer's CCE module (all ranks call it together)."""
        remap = live_remap(trainer.model)
        weights = trainer.table_weights()
        payload: List[Optional[Dict[str, Any]]] = [None]
        if trainer.runtime.is_main:
            names = {remap.column_name(t, i) for t, p in remap.pointers.items() for i in range(p.columns)}
            payload = [remap.cluster_round({n: w for n, w in weights.items() if n in names}, self.n_iter)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0)
        state = payload[0]
        assert state is not None
        remap.load_round(state)
        trainer.write_table_weights(state["weights"])
        trainer.reset_table_optimizer_state(sorted(state["weights"]))
        logger.info("CCE clustering round %d at step %d", int(remap.rounds_done), trainer.step)


def live_remap(model: nn.Module) -> CCERemap:
    """The CCE remap inside a (sharded) model."""
    found = [m.remapper for m in model.modules()
             if isinstance(m, (ShardedRemappedEBC, RemappedEmbeddingBagCollection)) and isinstance(m.remapper, CCERemap)]
    if len(found) != 1:
        raise RuntimeError(f"expected one CCE module in the model, found {len(found)}")
    return found[0]
