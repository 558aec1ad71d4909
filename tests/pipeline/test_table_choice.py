"""Each table's tail and clustering floor chosen on validation by the learn model (pipeline/table_choice.py)."""

import numpy as np
import pytest
import torch

from lhf_torchrec.mapping import IdMapping, IdProfile
from lhf_torchrec.pipeline.compare import MethodSpec, compare_methods
from lhf_torchrec.pipeline.steps import LearnedModel, fit_mappings, learn_model, profile_tables
from lhf_torchrec.pipeline.table_choice import SIGNIFICANCE, TABLE_SETTINGS, choose, collided_rows, fit_per_table
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


def test_a_per_table_fit_chooses_each_table_a_setting_within_its_budget(tiny_split):
    profiles = profile_tables(tiny_split.train, tiny_split.tables)
    learned = learn_model(tiny_split.train, tiny_split.tables, profiles, dim=4,
                          train_config=TrainConfig(batch_size=256, progress=False))
    before = {name: w.clone() for name, w in learned.trainer.table_weights().items()}

    fitted, chosen = fit_per_table(learned, tiny_split.validation, tiny_split.tables, profiles, compression=4,
                                   optimizer="rowwise_adagrad")

    assert chosen and set(chosen) == set(fitted.budgets)
    assert set(chosen.values()) <= set(TABLE_SETTINGS)
    for name, label in chosen.items():
        alone = fit_mappings(tiny_split.tables, profiles, "combination", compression=4, optimizer="rowwise_adagrad",
                             embeddings=learned.embeddings, **TABLE_SETTINGS[label])
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
    assert record.table_settings and set(record.table_settings.values()) <= set(TABLE_SETTINGS)
