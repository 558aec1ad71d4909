"""The steps from data to compressed tables: profile, learn embeddings, fit mappings at a budget.

Each step is a function over TorchRec table configs and a :class:`CTRSource`; the CLI (``lhf``)
and the demo chain them (through the method registry, :mod:`lhf_torchrec.pipeline.methods`), and
:mod:`lhf_torchrec.pipeline.artifacts` stores what they produce. Full tables, vocabularies and
budgets follow :mod:`lhf_torchrec.mapping.tables`.
"""

import dataclasses
import functools
import logging
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.fit import (
    ProfileShare,
    RankBudgetStatistics,
    gather_keyed_fits,
    gather_profile,
    merge_across_ranks,
    own_share,
    record_entry_share_across_ranks,
    share_profile,
    sum_across_ranks,
)
from lhf_torchrec.mapping.buckets import TooFewRowsForBuckets, assemble_keyed, fit_bucket_range
from lhf_torchrec.mapping.budget import plan_budget, row_bytes
from lhf_torchrec.mapping.embeddings import IdEmbeddings, embeddings_of
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.methods import MIN_COUNT
from lhf_torchrec.mapping.profile import (
    FeatureProfiler,
    IdProfile,
    ProfileSummary,
    SpillingProfiler,
    merge_profiles,
)
from lhf_torchrec.mapping.tables import (
    compressed_budgets,
    full_rows,
    learn_mappings,
    needs_vocabulary,
    table_budgets,
    vocabulary_mappings,
)
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
    equal one process's). A bucketed fit needs only each rank's share: :func:`share_tables`.
    """
    profiles = _rank_profiles(source, tables, capacity, chunk_rows, spill_dir)
    if _world()[0] > 1:
        profiles = {name: merge_across_ranks(p, table=name) for name, p in profiles.items()}
    return profiles


def share_tables(
    source: CTRSource,
    tables: List[EmbeddingBagConfig],
    num_buckets: int,
    seed: int = 0,
    chunk_rows: int = 1 << 16,
    spill_dir: Optional[str] = None,
) -> Dict[str, ProfileShare]:
    """Under a process group whose world size divides ``num_buckets``: each rank profiles its 1/W of
    the rows and keeps the exact merged counts of its own buckets' ids (:func:`share_profile`), never
    the whole profile: what :func:`fit_mappings` needs to fit bucketed mappings across the ranks."""
    local = _rank_profiles(source, tables, None, chunk_rows, spill_dir)
    # Each table's local profile is dropped once shared: the rank holds its shares and the profiles still to share.
    return {name: share_profile(local.pop(name), num_buckets, seed, table=name) for name in list(local)}


def _rank_profiles(
    source: CTRSource, tables: List[EmbeddingBagConfig], capacity: Optional[int], chunk_rows: int,
    spill_dir: Optional[str],
) -> Dict[str, IdProfile]:
    """Each table's profile of this rank's 1/W of the rows (all of them in one process)."""
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
    return out


def _world() -> Tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


@dataclasses.dataclass
class LearnedModel:
    """What the learn step produced, on every rank: the embeddings of the ids it kept (the input of the
    learned methods), and the small model that learned them, which scores candidate mappings on
    validation (:mod:`lhf_torchrec.pipeline.table_choice`): its tables (``weights``, full, on every
    rank) and the mappings of its ids to their rows (``mappings``; a table without one reads its ids
    as rows)."""

    embeddings: Dict[str, IdEmbeddings]
    trainer: Trainer
    weights: Dict[str, torch.Tensor]
    mappings: Dict[str, IdMapping]

    def learned_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the learn model's table that ``ids`` read."""
        mapping = self.mappings.get(table)
        return ids if mapping is None else mapping(ids)


def learn_model(
    train: CTRSource,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, Union[IdProfile, ProfileShare]],
    *,
    dim: int = 8,
    epochs: int = 1,
    min_count: int = MIN_COUNT,
    train_config: Optional[TrainConfig] = None,
    runtime: Optional[Runtime] = None,
) -> LearnedModel:
    """Low-dimensional embeddings of the ids seen at least ``min_count`` times, from a short training
    run of a DLRM with ``dim``-wide tables (the paper's "learned" signal), and that model.

    Only those ids can be clustered (the learned methods' ``min_count``, a floor the budget may only
    raise), so only they get a row of their own (:func:`~lhf_torchrec.mapping.tables.learn_mappings`):
    every other id shares a small hashed region, and the model's memory follows the well-observed
    ids, not the id space. ``min_count`` must be at most the ``min_count`` of every fit that uses
    the result: a clustered id without an embedding is hashed (with a warning).

    ``profiles`` may be each rank's shares (:func:`share_tables`): then only the ids seen at least
    ``min_count`` times are gathered on every rank (the ids the learn step keeps), not whole profiles."""
    config = dataclasses.replace(train_config or TrainConfig(), epochs=epochs, checkpoint_dir=None, resume=False)
    summaries = None
    if any(isinstance(p, ProfileShare) for p in profiles.values()):
        summaries = {name: share.summary for name, share in profiles.items()}
        profiles = {name: gather_profile(share, min_count) for name, share in profiles.items()}
    mappings = learn_mappings(profiles, tables, min_count, config.seed, summaries)
    small = [EmbeddingBagConfig(name=t.name, embedding_dim=dim, feature_names=list(t.feature_names), pooling=t.pooling,
                                num_embeddings=mappings[t.name].num_rows if t.name in mappings else t.num_embeddings)
             for t in tables]
    trainer = Trainer(ModelConfig(embedding_dim=dim), config, small, len(train.dense_names), LearnedHashing(mappings),
                      runtime)
    trainer.fit(train)
    payload = [trainer.table_weights()]  # every rank gathers, rank 0 receives: it sends them to the others
    torch.distributed.broadcast_object_list(payload, src=0)
    weights = payload[0]
    embeddings = {t.name: _kept_embeddings(weights[t.name], profiles[t.name], mappings.get(t.name), min_count)
                  for t in small}
    return LearnedModel(embeddings, trainer, weights, mappings)


def _kept_embeddings(
    weight: torch.Tensor, profile: IdProfile, mapping: Optional[IdMapping], min_count: int
) -> IdEmbeddings:
    ids = profile.ids[profile.counts >= min_count]
    rows = torch.from_numpy(ids) if mapping is None else mapping(torch.from_numpy(ids))
    return IdEmbeddings(ids, weight.index_select(0, rows).float())


def row_means(rows: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor, num_rows: int, *,
              across_ranks: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(means, reached): each of ``num_rows`` rows the ``weights``-weighted mean of the ``vectors``
    mapped to it by ``rows``, and which rows any vector reached (the others' means are 0).
    ``across_ranks``: each rank holds some of the vectors; the means are of all of them (collective)."""
    sums = torch.zeros(num_rows, vectors.shape[1]).index_add_(0, rows, vectors * weights[:, None])
    mass = torch.zeros(num_rows).index_add_(0, rows, weights)
    if across_ranks:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(mass)
    reached = mass > 0
    sums[reached] /= mass[reached, None]
    return sums, reached


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
    means, reached = row_means(rows, vectors, torch.from_numpy(profile.counts[has]).to(torch.float32), mapping.num_rows)
    bound = mapping.num_rows ** -0.5
    init = torch.empty(mapping.num_rows, vectors.shape[1]).uniform_(
        -bound, bound, generator=torch.Generator().manual_seed(seed))
    init[reached] = means[reached]
    return init


def fit_mappings(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, Union[IdProfile, ProfileShare]],
    method: str,
    *,
    compression: float,
    optimizer: str = "sgd",
    embeddings: Optional[Mapping[str, IdEmbeddings]] = None,
    seed: int = 0,
    num_buckets: Optional[int] = None,
    budget_split: str = "table",
    budgets: Optional[Mapping[str, int]] = None,
    **hyperparams,
) -> FittedTables:
    """Fits mapping ``method`` on every table at ``1 / compression`` of its full bytes, mapping counted
    (``budget_split="access"``: their total split across the tables,
    :func:`~lhf_torchrec.mapping.tables.split_by_access`). ``budgets``: the bytes of each table to
    compress, given instead (a table not in it stays full size, as one too small to compress does).

    Tables with fewer than ``MIN_COMPRESSED_ROWS`` full rows stay full size (behind a vocabulary
    where ids are sparse). Bytes count the fp32 weights, the ``optimizer``'s state and the mappings.
    ``hyperparams`` go to :func:`~lhf_torchrec.mapping.fit.fit_mapping` (the estimator's, and
    ``mapping_share``).

    ``num_buckets``: every mapping is bucketed (the foundation of co-sharding it row-wise with its
    table), except those of tables whose budget holds fewer than 2 rows per bucket: such a table is
    too small to shard row-wise, so it keeps one unbucketed mapping (logged), as a table-wise table would.

    Under a process group of W > 1 ranks whose W divides ``num_buckets``, the ranks fit the mappings
    together, equal to one process's, gathered on every rank: each plans the budget from its share
    of the profile with collectives (:class:`~lhf_torchrec.distributed.fit.RankBudgetStatistics`) and
    fits only the buckets it owns. ``profiles`` are then whole (every rank keeps its share) or each
    rank's :class:`~lhf_torchrec.distributed.fit.ProfileShare` (:func:`share_tables`: no rank ever
    holds a whole profile, except the small ones of full-size tables and of tables too small for
    buckets). Unbucketed mappings (and a W that does not divide ``num_buckets``) are fitted on every
    rank from whole profiles, as in one process; ``embeddings`` must cover the ids a rank fits.
    """
    world_size, _ = _world()
    shared = num_buckets is not None and world_size > 1 and num_buckets % world_size == 0
    if num_buckets is not None and world_size > 1 and not shared:
        logger.info("%d buckets do not split over %d ranks: every rank fits every bucket", num_buckets, world_size)
    if shared:
        shares = {name: p if isinstance(p, ProfileShare) else own_share(p, num_buckets, seed, table=name)
                  for name, p in profiles.items()}
        return _fit_shares(tables, shares, method, compression=compression, optimizer=optimizer,
                           embeddings=embeddings or {}, seed=seed, num_buckets=num_buckets,
                           budget_split=budget_split, budgets=budgets, **hyperparams)
    if any(isinstance(p, ProfileShare) for p in profiles.values()):
        raise ValueError(f"shares of profiles are for bucketed fits across ranks whose world size divides the bucket "
                         f"count (num_buckets={num_buckets}, world size {world_size})")
    kept, mappings = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed,
                                   budget_split=budget_split, budgets=budgets)
    for name, budget in kept.items():
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
    return fitted_tables(method, tables, profiles, mappings, optimizer, {n: b.budget_bytes for n, b in kept.items()})


def _fit_shares(
    tables: List[EmbeddingBagConfig], shares: Mapping[str, ProfileShare], method: str, *, compression: float,
    optimizer: str, embeddings: Mapping[str, IdEmbeddings], seed: int, num_buckets: int, budget_split: str,
    budgets: Optional[Mapping[str, int]], **hyperparams,
) -> FittedTables:
    """:func:`fit_mappings` across the ranks, from each rank's share of every table's profile (collective)."""
    mappings: Dict[str, IdMapping] = {}  # vocabularies first, as table_budgets gives them
    if budgets is None:
        budgets = compressed_budgets(tables, {n: s.profile for n, s in shares.items()},
                                     {n: s.summary for n, s in shares.items()}, compression=compression,
                                     optimizer=optimizer, budget_split=budget_split, sum_across=sum_across_ranks)
    for t in tables:  # full size: fewer than MIN_COMPRESSED_ROWS ids, none, or the split's choice
        if t.name not in budgets and needs_vocabulary(shares[t.name].summary, t):
            mappings.update(vocabulary_mappings({t.name: gather_profile(shares[t.name])}, [t], seed))
    for t in tables:
        if t.name not in budgets:
            continue
        share, budget = shares[t.name], budgets[t.name]
        settings = dict(embedding_dim=t.embedding_dim, total_bytes=budget, method=method, optimizer=optimizer,
                        seed=seed, table=t.name)
        statistics = RankBudgetStatistics(share, table=t.name)
        try:
            plan = plan_budget(statistics, num_buckets=num_buckets, **settings, **hyperparams)
        except TooFewRowsForBuckets as e:
            logger.info("%s: fitted without buckets", e)
            mappings[t.name] = fit_mapping(gather_profile(share), embeddings=embeddings.get(t.name), **settings,
                                           **hyperparams)
            continue
        # The buckets' profiles the budget split are the ones to fit (fit_owned_buckets would redo them).
        fits = fit_bucket_range(method, plan.num_rows, num_buckets, statistics.own_profiles, embeddings.get(t.name),
                                first_bucket=statistics.own_buckets.start, seed=seed, table=t.name, **plan.hyperparams)
        # The replicated mapping's assembly is every rank's peak: free the buckets' profiles and the
        # rank's own entries first (they are among the gathered ones).
        del statistics
        whole = gather_keyed_fits(fits, plan.num_rows, num_buckets, seed=seed, table=t.name)
        del fits
        mappings[t.name] = assemble_keyed(method, plan.num_rows, num_buckets, whole, seed=seed, table=t.name,
                                          **plan.hyperparams)
        del whole
        record_entry_share_across_ranks(mappings[t.name], share)
    summaries = {name: share.summary for name, share in shares.items()}
    return fitted_tables(method, tables, summaries, mappings, optimizer, dict(budgets))


def fit_full(
    tables: List[EmbeddingBagConfig], profiles: Mapping[str, IdProfile], *, optimizer: str = "sgd", seed: int = 0
) -> FittedTables:
    """The uncompressed baseline: every table full size, behind a vocabulary where ids are sparse."""
    return fitted_tables("full", tables, profiles, vocabulary_mappings(profiles, tables, seed), optimizer, {})


def fitted_tables(
    method: str,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, Union[IdProfile, ProfileSummary]],
    mappings: Dict[str, IdMapping],
    optimizer: str,
    budgets: Dict[str, int],
) -> FittedTables:
    """The :class:`FittedTables` of ``mappings``: a table with a budget has its mapping's rows, the others
    their full rows (from ``profiles``); bytes are weights + ``optimizer`` state + mappings."""
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
    "fitted_tables",
    "LearnedModel",
    "learn_model",
    "row_means",
    "profile_tables",
    "share_tables",
    "warm_start_rows",
]
