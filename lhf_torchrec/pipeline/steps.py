"""The steps from data to compressed tables: profile, learn embeddings, fit mappings at a budget.

Each step is a function over TorchRec table configs and a :class:`CTRSource`; the CLI (``lhf``)
and the demo chain them, and :mod:`lhf_torchrec.pipeline.artifacts` stores what they produce.

"Full table" means one row per id the model can be asked about: for a dense id space (ids in
``[0, num_embeddings)``, all of them profiled or not) the table itself; for a sparse one (e.g. raw
32-bit Criteo hashes, where ``num_embeddings`` is the size of the hash space) a *vocabulary*: every
profiled id gets a row, and one extra row takes every id never seen.
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.embeddings import IdEmbeddings, embeddings_of
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import FeatureProfiler, IdProfile, merge_profiles
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import Runtime
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

# At a budget, the learned methods let the budget choose which ids are clustered (see plan_budget).
BUDGET_DEFAULTS: Dict[str, Dict] = {"learned": {"min_count": "auto"}, "combination": {"min_count": "auto"}}
# Tables smaller than this stay full size for every method: compressing a table of a few rows
# saves nothing and only adds noise to comparisons.
MIN_COMPRESSED_ROWS = 100


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


def needs_vocabulary(profile: IdProfile, table: EmbeddingBagConfig) -> bool:
    """True when the table's id space is too sparse to hold as a table (a vocabulary is smaller)."""
    return profile.num_ids + 1 < table.num_embeddings or (
        profile.num_ids > 0 and (profile.ids[0] < 0 or profile.ids[-1] >= table.num_embeddings)
    )


def full_rows(profile: IdProfile, table: EmbeddingBagConfig) -> int:
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


def learn_embeddings(
    train: CTRSource,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    *,
    dim: int = 8,
    epochs: int = 1,
    train_config: Optional[TrainConfig] = None,
    runtime: Optional[Runtime] = None,
) -> Dict[str, IdEmbeddings]:
    """Low-dimensional embeddings of every profiled id, from a short training run of a DLRM with
    full-size ``dim``-wide tables (the paper's "learned" signal). Returned on every rank."""
    small = [EmbeddingBagConfig(name=t.name, embedding_dim=dim, num_embeddings=t.num_embeddings,
                                feature_names=list(t.feature_names), pooling=t.pooling) for t in tables]
    vocab = vocabulary_mappings(profiles, small)
    config = dataclasses.replace(train_config or TrainConfig(), epochs=epochs, checkpoint_dir=None, resume=False)
    trainer = Trainer(ModelConfig(embedding_dim=dim), config, small, len(train.dense_names), LearnedHashing(vocab),
                      runtime)
    trainer.fit(train)
    weights = trainer.table_weights()
    payload = [None]
    if trainer.runtime.is_main:
        payload = [{name: _weights_to_ids(weights[name], profiles[name], vocab.get(name)) for name in profiles}]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def _weights_to_ids(weight: torch.Tensor, profile: IdProfile, vocab: Optional[IdMapping]) -> IdEmbeddings:
    ids = torch.from_numpy(profile.ids)
    rows = vocab(ids) if vocab is not None else ids
    return IdEmbeddings(profile.ids, weight.index_select(0, rows).float())


def warm_start_rows(mapping: IdMapping, profile: IdProfile, embeddings: IdEmbeddings, seed: int = 0) -> torch.Tensor:
    """Initial rows for a compressed table: each row the access-weighted mean of the learned
    embeddings of the profiled ids that map to it (hot rows: their id's embedding; cluster rows:
    the cluster's centroid). Rows no profiled id reaches keep a small random init, as TorchRec's
    default (uniform in +-1/sqrt(rows)). ``embeddings`` must have the table's dim."""
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


@dataclass(frozen=True)
class FittedTables:
    """The mappings of one method and what every table costs (rows, bytes), full tables included."""

    method: str
    mappings: Dict[str, IdMapping]
    rows: Dict[str, int]
    table_bytes: int
    mapping_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.mapping_bytes


def fit_mappings(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    method: str,
    *,
    compression: float,
    optimizer: str = "sgd",
    embeddings: Optional[Mapping[str, IdEmbeddings]] = None,
    seed: int = 0,
    **hyperparams,
) -> FittedTables:
    """Fits ``method`` on every table at ``1 / compression`` of its full bytes, mapping counted.

    ``method="full"`` gives the uncompressed baseline (vocabularies where ids are sparse). Tables
    with fewer than ``MIN_COMPRESSED_ROWS`` full rows stay full size for every method. Bytes count
    the fp32 weights, the ``optimizer``'s state and the mappings.
    """
    if compression < 1:
        raise ValueError(f"compression must be >= 1, got {compression}")
    mappings: Dict[str, IdMapping] = {}
    rows: Dict[str, int] = {}
    vocab = vocabulary_mappings(profiles, tables, seed)
    for t in tables:
        profile = profiles[t.name]
        n_full = full_rows(profile, t)
        per_row = row_bytes(t.embedding_dim, optimizer)
        if method == "full" or n_full < MIN_COMPRESSED_ROWS or profile.num_ids == 0:
            if t.name in vocab:
                mappings[t.name] = vocab[t.name]
            rows[t.name] = n_full
            continue
        mapping = fit_mapping(
            profile,
            method=method,
            total_bytes=int(n_full * per_row / compression),
            embedding_dim=t.embedding_dim,
            optimizer=optimizer,
            embeddings=(embeddings or {}).get(t.name),
            seed=seed,
            table=t.name,
            **{**BUDGET_DEFAULTS.get(method, {}), **hyperparams},
        )
        mappings[t.name] = mapping
        rows[t.name] = mapping.num_rows
    by_name = {t.name: t for t in tables}
    table_bytes = sum(rows[name] * row_bytes(by_name[name].embedding_dim, optimizer) for name in rows)
    mapping_bytes = sum(m.nbytes for m in mappings.values())
    return FittedTables(method, mappings, rows, int(table_bytes), int(mapping_bytes))


def full_table_bytes(tables: List[EmbeddingBagConfig], profiles: Mapping[str, IdProfile], optimizer: str = "sgd") -> int:
    """Bytes of the uncompressed tables (weights and optimizer state)."""
    return int(sum(full_rows(profiles[t.name], t) * row_bytes(t.embedding_dim, optimizer) for t in tables))


__all__ = [
    "FittedTables",
    "MIN_COMPRESSED_ROWS",
    "fit_mappings",
    "full_rows",
    "full_table_bytes",
    "learn_embeddings",
    "needs_vocabulary",
    "profile_tables",
    "vocabulary_mappings",
]
