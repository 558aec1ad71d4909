"""Learned hash functions: access profiles, fitting methods, budgets and the ``IdMapping`` they produce.

The budget rules every method shares live here too: bytes per row per optimizer
(:mod:`~lhf_torchrec.mapping.budget`), full rows, vocabularies and per-table budgets
(:mod:`~lhf_torchrec.mapping.tables`)."""

from lhf_torchrec.mapping.budget import OPTIMIZERS, BudgetPlan, plan_budget, row_bytes
from lhf_torchrec.mapping.embeddings import IdEmbeddings, embeddings_from_table
from lhf_torchrec.mapping.fit import fit_mapping
from lhf_torchrec.mapping.hashing import hash_ids
from lhf_torchrec.mapping.id_mapping import IdMapping, load_mappings, save_mappings
from lhf_torchrec.mapping.methods import (
    METHODS,
    CombinedLearnedHashing,
    DoubleHashing,
    FrequencyHashing,
    HashingTrick,
    LearnedClustering,
    MappingEstimator,
    RowSplit,
    make_estimator,
)
from lhf_torchrec.mapping.profile import FeatureProfiler, IdProfile, SpillingProfiler, merge_profiles, profile_batches

__all__ = [
    "BudgetPlan",
    "CombinedLearnedHashing",
    "DoubleHashing",
    "FeatureProfiler",
    "FrequencyHashing",
    "HashingTrick",
    "IdEmbeddings",
    "IdMapping",
    "IdProfile",
    "LearnedClustering",
    "METHODS",
    "MappingEstimator",
    "OPTIMIZERS",
    "RowSplit",
    "SpillingProfiler",
    "embeddings_from_table",
    "fit_mapping",
    "hash_ids",
    "load_mappings",
    "make_estimator",
    "merge_profiles",
    "plan_budget",
    "profile_batches",
    "row_bytes",
    "save_mappings",
]
