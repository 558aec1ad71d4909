"""Each table's bytes, tail and clustering floor chosen on validation by the learn model (pipeline/table_choice.py)."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping import IdMapping, IdProfile
from lhf_torchrec.pipeline.compare import MethodSpec, compare_methods
from lhf_torchrec.pipeline.steps import LearnedModel, fit_mappings, learn_model, profile_tables
from lhf_torchrec.mapping.budget import BudgetTooSmall
from lhf_torchrec.mapping.tables import full_size_bytes
from lhf_torchrec.pipeline import table_choice
from lhf_torchrec.pipeline.table_choice import (
    BYTES_MULTIPLES,
    SIGNIFICANCE,
    TABLE_SETTINGS,
    cheapest_within,
    choose,
    choose_budgets,
    collided_rows,
    fit_per_table,
)
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.trainer import TrainConfig


def test_collided_rows_give_every_id_the_access_weighted_mean_of_the_ids_sharing_its_row():
    # The learn model: ids 10..14 read rows 0..3 (ids 13 and 14 share the learn step's hashed row 3).
    learn_mapping = IdMapping.from_entries(np.array([10, 11, 12]), np.array([0, 1, 2]), 4, hash_offset=3, hash_rows=1)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [5.0, -5.0]])
    learned = LearnedModel(embeddings={}, trainer=None, weights={"t": weight}, mappings={"t": learn_mapping})
    profile = IdProfile(np.array([10, 11, 12, 13, 14]), np.array([3, 1, 2, 1, 1]), 8)
    # The candidate: 10 and 11 share row 0, 12 owns row 1, the rest (13, 14, unseen) hash into row 2.
    candidate = IdMapping.from_entries(np.array([10, 11, 12]), np.array([0, 0, 1]), 3, hash_offset=2, hash_rows=1)

    rows = collided_rows(learned, "t", profile, candidate)

    shared = (3 * weight[0] + 1 * weight[1]) / 4
    assert torch.allclose(rows[0], shared) and torch.allclose(rows[1], shared)
    assert torch.allclose(rows[2], weight[2])  # alone in its row: its own embedding
    assert torch.allclose(rows[3], weight[3])  # 13 and 14 share row 2 and read learned row 3: unchanged


def test_collided_rows_of_a_learned_row_whose_ids_part_take_their_access_weighted_mean():
    # Identity learn rows (a small dense table); the candidate sends id 0 to row 0 with id 1, id 2 alone.
    weight = torch.tensor([[2.0], [4.0], [8.0]])
    learned = LearnedModel(embeddings={}, trainer=None, weights={"t": weight}, mappings={})
    profile = IdProfile(np.array([0, 1, 2]), np.array([1, 3, 5]), 9)
    candidate = IdMapping.from_entries(np.array([0, 1, 2]), np.array([0, 0, 1]), 3, hash_offset=2, hash_rows=1)
    rows = collided_rows(learned, "t", profile, candidate)
    assert rows[:, 0].tolist() == pytest.approx([3.5, 3.5, 8.0])


def test_the_default_stays_unless_a_candidate_is_better_by_more_than_the_noise():
    generator = torch.Generator().manual_seed(0)
    default = 0.5 + 0.2 * torch.rand(10_000, generator=generator, dtype=torch.float64)
    noise = 0.01 * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(5_000)  # mean 0, std 0.01
    # 0.0001 better on average, with 0.01 of per-example noise: 1 standard error, not enough.
    slightly = default - 1e-4 + noise
    assert choose({"default": default, "slightly": slightly})[0] == "default"
    # 0.001 better: 10 standard errors; of two such candidates the lower mean wins.
    better, best = default - 1e-3 + noise, default - 2e-3 + noise
    chosen, means = choose({"default": default, "better": better, "best": best, "worse": default + 1e-3})
    assert chosen == "best"
    assert means["best"] == pytest.approx(float(default.mean()) - 2e-3, abs=3e-4)
    assert SIGNIFICANCE > 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 100)), min_size=1, max_size=4), min_size=1,
                max_size=4), st.integers(0, 120))
def test_the_knapsack_finds_the_least_loss_within_the_total(tables, total):
    options = {f"t{i}": {k: (cost, loss / 7) for k, (cost, loss) in enumerate(candidates)}
               for i, candidates in enumerate(tables)}
    feasible = [dict(zip(options, keys)) for keys in itertools.product(*(list(o) for o in options.values()))
                if sum(options[t][k][0] for t, k in zip(options, keys)) <= total]
    if not feasible:
        with pytest.raises(ValueError, match="fits"):
            cheapest_within(options, total)
        return
    chosen = cheapest_within(options, total)
    assert sum(options[t][k][0] for t, k in chosen.items()) <= total
    best = min(sum(options[t][k][1] for t, k in choice.items()) for choice in feasible)
    assert sum(options[t][k][1] for t, k in chosen.items()) == pytest.approx(best)


def _budget_choice(monkeypatch, loss_of):
    """choose_budgets on two tables of 1,000 dense ids (16,000 bytes full) given 1,000 and 2,000 bytes by
    their split, whose proxy losses are ``loss_of(table, bytes)`` (per-example vectors; the table's full
    size is the learned rows: ``loss_of(None, None)``)."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=1000, feature_names=[n]) for n in "ab"]
    profiles = {n: IdProfile(np.arange(1000), np.ones(1000, dtype=np.int64), 1000) for n in "ab"}

    def fit(table, budget):  # a stand-in mapping that says its budget; under 300 bytes nothing fits
        if budget < 300:
            raise BudgetTooSmall(f"table '{table.name}': {budget} bytes")
        return ("mapping", budget)

    split = SimpleNamespace(budgets={"a": 1000, "b": 2000}, compression=SimpleNamespace(
        mappings={"a": ("mapping", 1000), "b": ("mapping", 2000)}))
    monkeypatch.setattr(table_choice, "_example_losses", lambda learned, validation: loss_of(None, None))
    monkeypatch.setattr(table_choice, "table_losses", lambda learned, validation, name, profile, candidates: {
        key: loss_of(name, mapping[1]) for key, mapping in candidates.items()})
    return choose_budgets(None, None, tables, profiles, split, fit, "sgd")


def test_bytes_go_where_the_proxy_loses_most_within_the_same_total(monkeypatch):
    noise = 0.01 * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(5_000)

    def loss_of(table, budget):  # "a" loses 0.01 per halving of its bytes from 4,000; "b" 0.001 from 2,000
        if table == "a":
            return 0.6 + 0.01 * np.log2(4000 / budget) + noise
        return 0.6 + 0.001 * max(0.0, np.log2(2000 / (budget or 16_000))) + noise

    budgets, labels = _budget_choice(monkeypatch, loss_of)
    # Full size (16,000) fits neither; b cannot go under 300 bytes (a at 250 is no candidate): a at 2,000 and
    # b at 1,000 lose least within the total of 3,000, and a at 3,000 would leave b nothing.
    assert budgets == {"a": 2000, "b": 1000}
    assert labels == {"a": "x2 bytes", "b": "x0.5 bytes"}


def test_the_split_stays_where_the_proxy_sees_only_noise(monkeypatch):
    def loss_of(table, budget):  # 1e-5 better with more bytes, under noise of 0.02 per example
        generator = torch.Generator().manual_seed((budget or 0) + (table == "b"))
        return 0.6 - 1e-5 * (budget or 16_000) / 1000 + 0.02 * torch.randn(10_000, generator=generator,
                                                                             dtype=torch.float64)

    budgets, labels = _budget_choice(monkeypatch, loss_of)
    assert budgets == {"a": 1000, "b": 2000} and labels == {"a": "x1 bytes", "b": "x1 bytes"}
    # The knapsack alone (no significance rule) would have moved bytes on that noise.
    monkeypatch.setattr(table_choice, "SIGNIFICANCE", 0.0)
    assert _budget_choice(monkeypatch, loss_of)[0] != {"a": 1000, "b": 2000}


def test_no_bytes_move_when_every_table_stays_full_size():
    split = SimpleNamespace(budgets={}, compression=SimpleNamespace(mappings={}))
    assert choose_budgets(None, None, [], {}, split, None, "sgd") == ({}, {})


def test_a_per_table_fit_chooses_each_table_its_bytes_and_setting_within_the_total(tiny_split):
    profiles = profile_tables(tiny_split.train, tiny_split.tables)
    learned = learn_model(tiny_split.train, tiny_split.tables, profiles, dim=4,
                          train_config=TrainConfig(batch_size=256, progress=False))
    before = {name: w.clone() for name, w in learned.trainer.table_weights().items()}
    split = fit_mappings(tiny_split.tables, profiles, "combination", compression=4, optimizer="rowwise_adagrad",
                         embeddings=learned.embeddings)

    fitted, chosen = fit_per_table(learned, tiny_split.validation, tiny_split.tables, profiles, compression=4,
                                   optimizer="rowwise_adagrad")

    assert set(chosen) == set(split.budgets) and set(fitted.budgets) <= set(split.budgets)
    assert sum(fitted.budgets.values()) <= sum(split.budgets.values())
    configs = {t.name: t for t in tiny_split.tables}
    for name, label in chosen.items():
        if label == "full size":
            assert name not in fitted.budgets
            assert fitted.per_table_bytes[name] <= full_size_bytes(profiles[name], configs[name], "rowwise_adagrad")
            continue
        multiple, setting = label.split(" bytes, ", 1)
        assert float(multiple[1:]) in BYTES_MULTIPLES and setting in TABLE_SETTINGS
        # The knapsack's bytes, and a share of what it left unspent.
        assert fitted.budgets[name] >= int(float(multiple[1:]) * split.budgets[name])
        alone = fit_mappings(tiny_split.tables, profiles, "combination", compression=4, optimizer="rowwise_adagrad",
                             embeddings=learned.embeddings, budgets=fitted.budgets, **TABLE_SETTINGS[setting])
        assert fitted.compression.mappings[name].fingerprint == alone.compression.mappings[name].fingerprint
        assert fitted.per_table_bytes[name] <= fitted.budgets[name]
    assert fitted.total_bytes == fitted.table_bytes + fitted.mapping_bytes
    # Scoring rewrote the learn model's tables one at a time and restored each.
    after = learned.trainer.table_weights()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_per_table_choice_needs_a_method_that_learns(tiny_split):
    with pytest.raises(ValueError, match="needs a method that learns embeddings"):
        compare_methods(tiny_split, [MethodSpec("f", "frequency", per_table=True)], [4], [0], ModelConfig(embedding_dim=8),
                        TrainConfig(batch_size=256, progress=False))


def test_compare_methods_records_each_tables_choice(tiny_split):
    spec = MethodSpec("combination [per table]", "combination", per_table=True)
    records = compare_methods(tiny_split, [spec], [4], [0], ModelConfig(embedding_dim=8),
                              TrainConfig(batch_size=256, progress=False))
    (record,) = records
    assert not record.error and record.learn_epochs == 1
    assert record.table_settings
    assert all(label == "full size" or label.split(" bytes, ", 1)[1] in TABLE_SETTINGS
               for label in record.table_settings.values())
