import numpy as np
import torch

from lhf_torchrec.mapping import IdEmbeddings, IdProfile, fit_mapping
from lhf_torchrec.pipeline.steps import fit_mappings, profile_tables, warm_start_rows
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.trainer import TrainConfig, Trainer


def test_rows_start_at_the_weighted_mean_of_their_ids():
    profile = IdProfile(np.array([1, 2, 3, 9]), np.array([30, 10, 1, 5]), 46)
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [2.0, 2.0]])
    mapping = fit_mapping(profile, method="frequency", num_rows=20, hot_fraction=0.1)  # ids 1 and 2 are hot
    rows = warm_start_rows(mapping, profile, IdEmbeddings(profile.ids, vectors))
    assert torch.equal(rows[0], vectors[0]) and torch.equal(rows[1], vectors[1])
    r3, r9 = mapping(torch.tensor([3, 9])).tolist()
    if r3 == r9:
        assert torch.allclose(rows[r3], (vectors[2] * 1 + vectors[3] * 5) / 6)
    else:
        assert torch.equal(rows[r3], vectors[2]) and torch.equal(rows[r9], vectors[3])
    untouched = [r for r in range(20) if r not in (0, 1, r3, r9)]
    assert rows[untouched].abs().max() <= 20 ** -0.5


def test_trainer_starts_from_the_initial_weights(tiny_split):
    profiles = profile_tables(tiny_split.train, tiny_split.tables)
    mappings = fit_mappings(tiny_split.tables, profiles, "frequency", compression=4).compression.mappings
    initial = {name: torch.randn(m.num_rows, 8, generator=torch.Generator().manual_seed(1)) for name, m in mappings.items()}
    model = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16], over_arch_layer_sizes=[16, 1])
    trainer = Trainer(model, TrainConfig(batch_size=128, progress=False), tiny_split.tables,
                      len(tiny_split.train.dense_names), LearnedHashing(mappings, initial))
    weights = trainer.table_weights()
    for name, w in initial.items():
        assert torch.equal(weights[name], w)
