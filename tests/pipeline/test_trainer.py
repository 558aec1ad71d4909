import os

import pytest
import torch

from lhf_torchrec.pipeline.steps import fit_mappings, profile_tables
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.trainer import CheckpointMismatchError, TrainConfig, Trainer, latest_checkpoint

MODEL = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16], over_arch_layer_sizes=[16, 1])


def _trainer(split, mappings, **config):
    defaults = dict(batch_size=128, epochs=2, progress=False, sparse_lr=0.05, dense_lr=3e-3)
    return Trainer(MODEL, TrainConfig(**{**defaults, **config}), split.tables, len(split.train.dense_names),
                   LearnedHashing(mappings))


@pytest.fixture(scope="module")
def mappings(tiny_split):
    profiles = profile_tables(tiny_split.train, tiny_split.tables)
    return fit_mappings(tiny_split.tables, profiles, "frequency", compression=4).compression.mappings


def test_training_learns_and_validates(tiny_split, mappings):
    trainer = _trainer(tiny_split, mappings, eval_every_steps=20)
    before = trainer.evaluate(tiny_split.validation)
    result = trainer.fit(tiny_split.train, tiny_split.validation)
    per_epoch = len(tiny_split.train) // 128
    assert result.steps == 2 * per_epoch
    assert [v["step"] for v in result.validation] == sorted({*range(20, 2 * per_epoch, 20), per_epoch, 2 * per_epoch})
    after = result.validation[-1]
    assert after["logloss"] < before["logloss"] - 0.01
    assert after["auc"] > 0.6


def test_resume_after_a_stop_equals_an_uninterrupted_run(tiny_split, mappings, tmp_path):
    full = _trainer(tiny_split, mappings)
    full.fit(tiny_split.train)
    expected = full.evaluate(tiny_split.test)

    ckpt = str(tmp_path / "ckpt")
    first = _trainer(tiny_split, mappings, checkpoint_dir=ckpt, checkpoint_every_steps=7, max_steps=30)
    assert first.fit(tiny_split.train).steps == 30
    # The run stopped at step 30; its last periodic checkpoint was at 28, the forced one at 30.
    assert os.path.basename(latest_checkpoint(ckpt)) == "step_000000030"
    # Resume from step 28, as a run killed between 28 and 30 would.
    os.rename(os.path.join(ckpt, "step_000000030"), os.path.join(ckpt, "step_000000030.partial"))
    second = _trainer(tiny_split, mappings, checkpoint_dir=ckpt, checkpoint_every_steps=7, resume=True)
    result = second.fit(tiny_split.train)
    assert result.resumed_from_step == 28
    got = second.evaluate(tiny_split.test)
    assert got["logloss"] == pytest.approx(expected["logloss"], abs=1e-6)
    assert got["auc"] == pytest.approx(expected["auc"], abs=1e-6)


def test_checkpoint_of_another_model_is_rejected(tiny_split, mappings, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _trainer(tiny_split, mappings, checkpoint_dir=ckpt, max_steps=3).fit(tiny_split.train)
    other = dict(mappings)
    name = sorted(other)[0]
    other.pop(name)
    with pytest.raises(CheckpointMismatchError, match=f"ckpt/step_000000003 was written by another model: 'compression.{name}'"):
        _trainer(tiny_split, other, checkpoint_dir=ckpt, resume=True).fit(tiny_split.train)


def test_table_weights_gather_full_tables(tiny_split, mappings):
    trainer = _trainer(tiny_split, mappings, max_steps=1)
    weights = trainer.table_weights()
    for t in tiny_split.tables:
        rows = mappings[t.name].num_rows if t.name in mappings else t.num_embeddings
        assert weights[t.name].shape == (rows, 8)
        assert torch.isfinite(weights[t.name]).all()
