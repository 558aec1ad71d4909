"""The steps from data to compressed tables: profile, learn embeddings, fit mappings at a budget.

Each step is a function over TorchRec table configs and a :class:`CTRSource`; the CLI (``lhf``)
and the demo chain them (through the method registry, :mod:`lhf_torchrec.pipeline.methods`), and
:mod:`lhf_torchrec.pipeline.artifacts` stores what they produce. Full tables, vocabularies and
budgets follow :mod:`lhf_torchrec.mapping.tables`.
"""

import dataclasses
import functools
import logging
from typing import Dict, List, Mapping, Optional

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.mapping.buckets import TooFewRowsForBuckets
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.embeddings import IdEmbeddings, embeddings_of
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import FeatureProfiler, IdProfile, merge_profiles
from lhf_torchrec.mapping.methods import MIN_COUNT
from lhf_torchrec.mapping.tables import full_rows, learn_mappings, table_budgets, vocabulary_mappings
from lhf_torchrec.training.compression import FittedTables, LearnedHashing
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import Runtime
from lhf_torchrec.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)


def profile_tables(
    source: CTRSource, tables: List[EmbeddingBagConfig], capacity: Optional[int] = None, chunk_rows: int = 1 << 16
) -> Dict[str, IdProfile]:
    """Access counts per table (the features of a table are merged), in one pass over ``source``."""
    profiler = FeatureProfiler(capacity=capacity)
    for batch in source.batches(chunk_rows):
        profiler.update_kjt(batch.sparse_features)
    per_feature = profiler.profiles()
    out = {}
    for t in tables:
        seen = [per_feature[f] for f in t.feature_names if f in per_feature]
        out[t.name] = merge_profiles(seen) if seen else IdProfile.empty(capacity)
    return out


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
    """
    budgets, mappings = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed)
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
            mappings[name] = fit(num_buckets=num_buckets)
        except TooFewRowsForBuckets as e:
            logger.info("%s: fitted without buckets", e)
            mappings[name] = fit()
    return _fitted(method, tables, profiles, mappings, optimizer, {n: b.budget_bytes for n, b in budgets.items()})


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
