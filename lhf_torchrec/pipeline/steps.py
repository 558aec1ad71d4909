"""The steps from data to compressed tables: profile, learn embeddings, fit mappings at a budget.

Each step is a function over TorchRec table configs and a :class:`CTRSource`; the CLI (``lhf``)
and the demo chain them (through the method registry, :mod:`lhf_torchrec.pipeline.methods`), and
:mod:`lhf_torchrec.pipeline.artifacts` stores what they produce. Full tables, vocabularies and
budgets follow :mod:`lhf_torchrec.mapping.tables`.
"""

import dataclasses
import functools
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.fit import fit_owned_buckets, gather_mapping, merge_across_ranks
from lhf_torchrec.mapping.buckets import TooFewRowsForBuckets
from lhf_torchrec.mapping.budget import MAPPING_SHARE, row_bytes
from lhf_torchrec.mapping.embeddings import IdEmbeddings, embeddings_of
from lhf_torchrec.mapping.fit import fit_mapping, record_entry_share, resolve_rows
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.methods import MIN_COUNT
from lhf_torchrec.mapping.profile import FeatureProfiler, IdProfile, SpillingProfiler, merge_profiles
from lhf_torchrec.mapping.tables import TableBudget, full_rows, learn_mappings, table_budgets, vocabulary_mappings
from lhf_torchrec.training.compression import FittedTables, LearnedHashing
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import Runtime
from lhf_torchrec.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)


def profile_tables(
    source: CTRSource,
    tables: List[EmbeddingBagConfig],
    capacity: Optional[int] = None,
    chunk_rows: int = 1 << 16,
    spill_dir: Optional[str] = None,
) -> Dict[str, IdProfile]:
    """Access counts per table (the features of a table are merged), in one pass over ``source``.

    ``capacity``: heavy-hitter summaries of at most that many ids. ``spill_dir``: exact counts
    through bounded memory, spilled to a temporary directory there (removed afterwards; see
    :class:`~lhf_torchrec.mapping.profile.SpillingProfiler` for the bound); the profiles returned
    are still whole (16 bytes per distinct id).

    Under a process group of W > 1 ranks every rank profiles its 1/W of the rows and every rank
    gets the merged profiles (:func:`~lhf_torchrec.distributed.fit.merge_across_ranks`: exact ones
    equal one process's).
    """
    if spill_dir is not None and capacity is not None:
        raise ValueError("spilling is for exact profiles; heavy-hitter summaries (capacity) are bounded already")
    world_size, rank = _world()
    if world_size > 1:
        source = source.slice(rank * len(source) // world_size, (rank + 1) * len(source) // world_size)
    profiler = SpillingProfiler(directory=spill_dir) if spill_dir is not None else FeatureProfiler(capacity=capacity)
    try:
        for batch in source.batches(chunk_rows):
            profiler.update_kjt(batch.sparse_features)
        per_feature = profiler.profiles()
    finally:
        if spill_dir is not None:
            profiler.close()
    out = {}
    for t in tables:
        seen = [per_feature[f] for f in t.feature_names if f in per_feature]
        out[t.name] = merge_profiles(seen) if seen else IdProfile.empty(capacity)
        if world_size > 1:
            out[t.name] = merge_across_ranks(out[t.name], table=t.name)
    return out


def _world() -> Tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def learn_embeddings(
    train: CTRSource,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    *,
    dim: int = 8,
    epochs: int = 1,
    min_count: int = MIN_COUNT,
    train_config: Optional[TrainConfig] = None,
    runtime: Optional[Runtime] = None,
) -> Dict[str, IdEmbeddings]:
    """Low-dimensional embeddings of the ids seen at least ``min_count`` times, from a short training
    run of a DLRM with ``dim``-wide tables (the paper's "learned" signal). Returned on every rank.

    Only those ids can be clustered (the learned methods' ``min_count``, a floor the budget may only
    raise), so only they get a row of their own (:func:`~lhf_torchrec.mapping.tables.learn_mappings`):
    every other id shares a small hashed region, and the model's memory follows the well-observed
    ids, not the id space. ``min_count`` must be at most the ``min_count`` of every fit that uses
    the result: a clustered id without an embedding is hashed (with a warning)."""
    config = dataclasses.replace(train_config or TrainConfig(), epochs=epochs, checkpoint_dir=None, resume=False)
    mappings = learn_mappings(profiles, tables, min_count, config.seed)
    small = [EmbeddingBagConfig(name=t.name, embedding_dim=dim, feature_names=list(t.feature_names), pooling=t.pooling,
                                num_embeddings=mappings[t.name].num_rows if t.name in mappings else t.num_embeddings)
             for t in tables]
    trainer = Trainer(ModelConfig(embedding_dim=dim), config, small, len(train.dense_names), LearnedHashing(mappings),
                      runtime)
    trainer.fit(train)
    weights = trainer.table_weights()
    payload = [None]
    if trainer.runtime.is_main:
        payload = [{t.name: _kept_embeddings(weights[t.name], profiles[t.name], mappings.get(t.name), min_count)
                    for t in small}]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def _kept_embeddings(
    weight: torch.Tensor, profile: IdProfile, mapping: Optional[IdMapping], min_count: int
) -> IdEmbeddings:
    ids = profile.ids[profile.counts >= min_count]
    rows = torch.from_numpy(ids) if mapping is None else mapping(torch.from_numpy(ids))
    return IdEmbeddings(ids, weight.index_select(0, rows).float())


def warm_start_rows(mapping: IdMapping, profile: IdProfile, embeddings: IdEmbeddings, seed: int = 0) -> torch.Tensor:
    """Initial rows for a compressed table: each row the access-weighted mean of the learned
    embeddings of the profiled ids that map to it (hot rows: their id's embedding; cluster rows:
    the cluster's centroid). Rows that no profiled id with an embedding reaches (e.g. reached only by
    ids under the learn step's ``min_count``) keep a small random init, as TorchRec's default
    (uniform in +-1/sqrt(rows)). ``embeddings`` must have the table's dim."""
    if mapping.probes != 1:
        raise ValueError(f"table '{mapping.table_name}': warm start needs one row per id, not {mapping.method}")
    has, vectors = embeddings_of(embeddings, profile.ids, mapping.table_name)
    rows = mapping(torch.from_numpy(profile.ids[has]))
    weights = torch.from_numpy(profile.counts[has]).to(torch.float32)
    sums = torch.zeros(mapping.num_rows, vectors.shape[1]).index_add_(0, rows, vectors * weights[:, None])
    mass = torch.zeros(mapping.num_rows).index_add_(0, rows, weights)
    bound = mapping.num_rows ** -0.5
    init = torch.empty(mapping.num_rows, vectors.shape[1]).uniform_(
        -bound, bound, generator=torch.Generator().manual_seed(seed))
    reached = mass > 0
    init[reached] = sums[reached] / mass[reached, None]
    return init


def fit_mappings(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    method: str,
    *,
    compression: float,
    optimizer: str = "sgd",
    embeddings: Optional[Mapping[str, IdEmbeddings]] = None,
    seed: int = 0,
    num_buckets: Optional[int] = None,
    **hyperparams,
) -> FittedTables:
    """Fits mapping ``method`` on every table at ``1 / compression`` of its full bytes, mapping counted.

    Tables with fewer than ``MIN_COMPRESSED_ROWS`` full rows stay full size (behind a vocabulary
    where ids are sparse). Bytes count the fp32 weights, the ``optimizer``'s state and the mappings.
    ``hyperparams`` go to :func:`~lhf_torchrec.mapping.fit.fit_mapping` (the estimator's, and
    ``mapping_share``).

    ``num_buckets``: every mapping is bucketed (the foundation of co-sharding it row-wise with its
    table), except those of tables whose budget holds fewer than 2 rows per bucket: such a table is
    too small to shard row-wise, so it keeps one unbucketed mapping (logged), as a table-wise table would.

    Under a process group of W > 1 ranks whose W divides ``num_buckets``, each rank fits only the
    buckets it owns (:func:`~lhf_torchrec.distributed.fit.fit_owned_buckets`) and the mappings are
    gathered on every rank, equal to one process's; the budget (rows) is planned from the whole
    profile on every rank. Unbucketed mappings (and a W that does not divide ``num_buckets``) are
    fitted on every rank, as in one process.
    """
    budgets, mappings = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed)
    world_size, _ = _world()
    if num_buckets is not None and world_size > 1 and num_buckets % world_size:
        logger.info("%d buckets do not split over %d ranks: every rank fits every bucket", num_buckets, world_size)
    for name, budget in budgets.items():
        fit = functools.partial(
            fit_mapping,
            budget.profile,
            method=method,
            total_bytes=budget.budget_bytes,
            embedding_dim=budget.config.embedding_dim,
            optimizer=optimizer,
            embeddings=(embeddings or {}).get(name),
            seed=seed,
            table=name,
            **hyperparams,
        )
        try:
            if num_buckets is not None and world_size > 1 and num_buckets % world_size == 0:
                mappings[name] = _fit_across_ranks(budget, method, num_buckets, (embeddings or {}).get(name),
                                                   optimizer=optimizer, seed=seed, **hyperparams)
            else:
                mappings[name] = fit(num_buckets=num_buckets)
        except TooFewRowsForBuckets as e:
            logger.info("%s: fitted without buckets", e)
            mappings[name] = fit()
    return _fitted(method, tables, profiles, mappings, optimizer, {n: b.budget_bytes for n, b in budgets.items()})


def _fit_across_ranks(budget: TableBudget, method: str, num_buckets: int, embeddings: Optional[IdEmbeddings], *,
                      optimizer: str, seed: int, mapping_share: float = MAPPING_SHARE, **hyperparams) -> IdMapping:
    """``fit_mapping`` of one bucketed table at its budget, each rank fitting its own buckets."""
    name, profile = budget.config.name, budget.profile
    num_rows, hyperparams = resolve_rows(profile, method, num_rows=None, total_bytes=budget.budget_bytes,
                                         embedding_dim=budget.config.embedding_dim, optimizer=optimizer, table=name,
                                         mapping_share=mapping_share, num_buckets=num_buckets, seed=seed,
                                         **hyperparams)
    fits = fit_owned_buckets(method, num_rows, num_buckets, profile, embeddings, seed=seed, table=name, **hyperparams)
    mapping = gather_mapping(method, num_rows, num_buckets, fits, seed=seed, table=name, **hyperparams)
    record_entry_share(mapping, profile)
    return mapping


def fit_full(
    tables: List[EmbeddingBagConfig], profiles: Mapping[str, IdProfile], *, optimizer: str = "sgd", seed: int = 0
) -> FittedTables:
    """The uncompressed baseline: every table full size, behind a vocabulary where ids are sparse."""
    return _fitted("full", tables, profiles, vocabulary_mappings(profiles, tables, seed), optimizer, {})


def _fitted(
    method: str,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    mappings: Dict[str, IdMapping],
    optimizer: str,
    budgets: Dict[str, int],
) -> FittedTables:
    rows = {t.name: mappings[t.name].num_rows if t.name in budgets else full_rows(profiles[t.name], t) for t in tables}
    per_table = {t.name: rows[t.name] * row_bytes(t.embedding_dim, optimizer)
                 + (mappings[t.name].nbytes if t.name in mappings else 0) for t in tables}
    table_bytes = sum(rows[t.name] * row_bytes(t.embedding_dim, optimizer) for t in tables)
    mapping_bytes = sum(m.nbytes for m in mappings.values())
    return FittedTables(method, LearnedHashing(mappings), rows, int(table_bytes), int(mapping_bytes), budgets,
                        per_table)


__all__ = [
    "fit_full",
    "fit_mappings",
    "learn_embeddings",
    "profile_tables",
    "warm_start_rows",
]
