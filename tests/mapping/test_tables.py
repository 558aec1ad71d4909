"""How a compression's bytes go to the tables: each table's own budget, or their total split by access."""

import numpy as np
import pytest
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping import IdProfile, row_bytes
from lhf_torchrec.mapping.tables import (
    ACCESS_SPLIT_FLOOR,
    compressed_budget,
    full_size_bytes,
    split_by_access,
    table_budgets,
)
from lhf_torchrec.pipeline.methods import FitInputs, fit_method

DIM, OPTIMIZER = 8, "rowwise_adagrad"


def _table(name: str, num_embeddings: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=num_embeddings, feature_names=[name])


def _accesses(num_ids: int, exponent: float, rows: int, seed: int, sparse: bool) -> np.ndarray:
    """``rows`` accesses (one per example, as a feature of a CTR row) of ``num_ids`` ids, Zipf-like."""
    weights = np.arange(1, num_ids + 1, dtype=np.float64) ** -exponent
    ids = np.random.default_rng(seed).choice(num_ids, rows, p=weights / weights.sum())
    return ids * (7919 << 24) + 5 if sparse else ids


@pytest.fixture(scope="module")
def tables_and_profiles():
    """A small table of often seen ids (sparse: behind a vocabulary), two large Zipf tables of mostly
    rare ids and a middle one, every table seen once per example of 100,000."""
    sizes = {"small": (150, 0.3, True), "middle": (2_000, 0.8, False), "large": (40_000, 1.05, False),
             "large_sparse": (60_000, 1.1, True)}
    tables, profiles = [], {}
    for seed, (name, (num_ids, exponent, sparse)) in enumerate(sizes.items()):
        tables.append(_table(name, 1 << 62 if sparse else num_ids))
        profiles[name] = IdProfile.from_ids(_accesses(num_ids, exponent, 100_000, seed, sparse))
    return tables, profiles


def _spent(split, tables, profiles):
    return sum(full_size_bytes(profiles[t.name], t, OPTIMIZER) if split[t.name] is None else split[t.name]
               for t in tables)


@pytest.mark.parametrize("compression", [4, 10, 50])
def test_the_access_split_keeps_the_total_and_moves_bytes_to_the_table_of_often_seen_ids(tables_and_profiles,
                                                                                       compression):
    tables, profiles = tables_and_profiles
    budgets = {t.name: compressed_budget(profiles[t.name], t, compression, OPTIMIZER) for t in tables}
    configs = {t.name: t for t in tables}
    split = split_by_access(budgets, configs, profiles, {n: p.summary() for n, p in profiles.items()}, OPTIMIZER)
    total = sum(budgets.values())
    spent = _spent(split, tables, profiles)
    # The same total: within the bytes the ties leave (one row of each compressed table at most).
    assert total - len(tables) * row_bytes(DIM, OPTIMIZER) <= spent <= total
    # The small table of often seen ids grows (to full size: its vocabulary's bytes counted), the large
    # tables of mostly rare ids give bytes up, never below the floor.
    assert split["small"] is None or split["small"] > budgets["small"]
    assert split["large"] < budgets["large"] and split["large_sparse"] < budgets["large_sparse"]
    for name in ("large", "large_sparse"):
        assert split[name] >= int(ACCESS_SPLIT_FLOOR * budgets[name])
    if compression == 50:
        assert split["small"] is None


def test_a_budget_at_full_size_keeps_every_table_full(tables_and_profiles):
    tables, profiles = tables_and_profiles
    budgets = {t.name: full_size_bytes(profiles[t.name], t, OPTIMIZER) for t in tables}
    split = split_by_access(budgets, {t.name: t for t in tables}, profiles,
                            {n: p.summary() for n, p in profiles.items()}, OPTIMIZER)
    assert all(b is None for b in split.values())


def test_table_budgets_split_by_access_give_full_tables_a_vocabulary(tables_and_profiles):
    tables, profiles = tables_and_profiles
    per_table, _ = table_budgets(tables, profiles, compression=50, optimizer=OPTIMIZER)
    by_access, vocabularies = table_budgets(tables, profiles, compression=50, optimizer=OPTIMIZER,
                                            budget_split="access")
    assert set(per_table) == {t.name for t in tables}
    assert "small" not in by_access and set(vocabularies) == {"small"}
    assert vocabularies["small"].num_rows == profiles["small"].num_ids + 1
    # Nothing to split where every table is too small to compress.
    small = [_table("tiny", 50)]
    assert table_budgets(small, {"tiny": IdProfile.from_ids(np.arange(50))}, compression=50, optimizer=OPTIMIZER,
                         budget_split="access")[0] == {}
    with pytest.raises(ValueError, match="budget_split must be one of 'table', 'access', got 'rows'"):
        table_budgets(tables, profiles, compression=50, optimizer=OPTIMIZER, budget_split="rows")


@pytest.mark.parametrize("method", ["hash", "frequency", "double_hash", "qr", "cce"])
def test_every_method_gets_the_same_tables_bytes_and_keeps_the_total(tables_and_profiles, method):
    tables, profiles = tables_and_profiles
    by_access = fit_method(method, tables, profiles, FitInputs(), compression=50, optimizer=OPTIMIZER,
                           budget_split="access")
    per_table = fit_method(method, tables, profiles, FitInputs(), compression=50, optimizer=OPTIMIZER)
    split, _ = table_budgets(tables, profiles, compression=50, optimizer=OPTIMIZER, budget_split="access")
    assert by_access.budgets == {n: b.budget_bytes for n, b in split.items()}
    assert by_access.rows["small"] == profiles["small"].num_ids + 1  # full size
    # Equal total bytes: what the per-table budgets allow in all (a method spends up to its budgets).
    allowed = sum(per_table.budgets.values())
    assert by_access.total_bytes <= allowed and per_table.total_bytes <= allowed
