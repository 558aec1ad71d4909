import hashlib
import os
import re
import shutil

import pytest
import torch

from lhf_torchrec.pipeline.steps import fit_mappings, profile_tables
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.trainer import (
    CHECKPOINT_META,
    CheckpointCorruptError,
    CheckpointMismatchError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
)

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


def _tree_digest(directory: str) -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def two_checkpoints(tiny_split, mappings, tmp_path_factory):
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    ckpt = str(tmp_path_factory.mktemp("two") / "ckpt")
    _trainer(tiny_split, mappings, checkpoint_dir=ckpt, checkpoint_every_steps=2, max_steps=4).fit(tiny_split.train)
    return ckpt


@pytest.mark.parametrize("setting, value", [("batch_size", 64), ("sparse_lr", 0.1), ("seed", 1)])
def test_resume_with_other_settings_is_refused_naming_the_setting(tiny_split, mappings, two_checkpoints, setting, value):
    before = _tree_digest(two_checkpoints)
    with pytest.raises(CheckpointMismatchError, match=rf"step_000000004 \(step 4\) was written with other settings: "
                                                      rf"'settings.{setting}'"):
        _trainer(tiny_split, mappings, checkpoint_dir=two_checkpoints, resume=True, **{setting: value}).fit(
            tiny_split.train)
    assert _tree_digest(two_checkpoints) == before


def test_resume_on_other_data_is_refused(tiny_split, mappings, two_checkpoints):
    with pytest.raises(CheckpointMismatchError, match=r"'settings.data.rows' is 4800 in the checkpoint but 4000"):
        _trainer(tiny_split, mappings, checkpoint_dir=two_checkpoints, resume=True).fit(tiny_split.train.slice(0, 4000))


def _truncate_shard(step_dir: str) -> None:
    shard = next(os.path.join(step_dir, n) for n in os.listdir(step_dir) if n.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)


def _garble_meta(step_dir: str) -> None:
    with open(os.path.join(step_dir, CHECKPOINT_META), "r+b") as f:
        f.truncate(100)


@pytest.mark.parametrize("damage, problem", [(_truncate_shard, r"file __0_0.distcp has [\d,]+ bytes"),
                                             (_garble_meta, "lhf_checkpoint.json is not readable JSON")])
def test_corrupted_checkpoint_is_named_and_resume_falls_back(tiny_split, mappings, two_checkpoints, tmp_path, caplog,
                                                             damage, problem):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(two_checkpoints, ckpt)
    damage(os.path.join(ckpt, "step_000000004"))
    trainer = _trainer(tiny_split, mappings, checkpoint_dir=ckpt, checkpoint_every_steps=2, max_steps=6, resume=True)
    assert trainer.fit(tiny_split.train).resumed_from_step == 2
    assert re.search(rf"step_000000004 \(step 4\)[^\n]*{problem}[^\n]*falling back", caplog.text)
    damage(os.path.join(ckpt, "step_000000002"))
    damage(os.path.join(ckpt, "step_000000004"))
    damage(os.path.join(ckpt, "step_000000006"))
    with pytest.raises(CheckpointCorruptError, match="no intact checkpoint under"):
        _trainer(tiny_split, mappings, checkpoint_dir=ckpt, resume=True).fit(tiny_split.train)


def test_existing_checkpoints_need_resume_or_overwrite(tiny_split, mappings, two_checkpoints, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(two_checkpoints, ckpt)
    before = _tree_digest(ckpt)
    with pytest.raises(ValueError, match=r"already holds 2 checkpoint\(s\) of an earlier run \(latest: step_000000004\)"):
        _trainer(tiny_split, mappings, checkpoint_dir=ckpt, max_steps=1).fit(tiny_split.train)
    assert _tree_digest(ckpt) == before
    _trainer(tiny_split, mappings, checkpoint_dir=ckpt, max_steps=1, overwrite=True).fit(tiny_split.train)
    assert sorted(os.listdir(ckpt)) == ["step_000000001"]


def test_unseen_ids_replace_a_share_of_the_learned_hash_features_ids_only(tiny_split, mappings):
    from lhf_torchrec.training.trainer import with_unseen_ids

    batches = list(tiny_split.train.batches(128))
    mapped = [t for t in tiny_split.tables if t.name in mappings][:2]
    features = frozenset(f for t in mapped for f in t.feature_names)
    replaced = list(with_unseen_ids(iter(batches), features, 0.2, torch.Generator().manual_seed(3)))
    again = list(with_unseen_ids(iter(batches), features, 0.2, torch.Generator().manual_seed(3)))
    changed, total = 0, 0
    for before, after, same in zip(batches, replaced, again):
        assert torch.equal(after.sparse_features.values(), same.sparse_features.values())  # deterministic
        assert torch.equal(after.labels, before.labels) and torch.equal(after.dense_features, before.dense_features)
        for key in before.sparse_features.keys():
            old, new = before.sparse_features[key], after.sparse_features[key]
            assert torch.equal(old.lengths(), new.lengths())
            differs = old.values() != new.values()
            if key not in features:
                assert not differs.any(), key
                continue
            assert (new.values()[differs] >= 1 << 62).all()  # ids no profile holds
            changed, total = changed + int(differs.sum()), total + differs.numel()
    assert 0.15 < changed / total < 0.25
    # They have no entry: each table's mapping hashes them into its hash region.
    mapping = mappings[mapped[0].name]
    rows = mapping(torch.tensor([1 << 62, (1 << 62) + 12345, (1 << 63) - 2]))
    assert ((rows >= mapping.hash_offset) & (rows < mapping.hash_offset + mapping.hash_rows)).all()


def test_unseen_ids_train_a_learned_hash_model_and_need_one(tiny_split, mappings):
    with_rate = _trainer(tiny_split, mappings, epochs=1, unseen_id_rate=0.05)
    without = _trainer(tiny_split, mappings, epochs=1)
    with_rate.fit(tiny_split.train)
    without.fit(tiny_split.train)
    assert with_rate.evaluate(tiny_split.test) != without.evaluate(tiny_split.test)
    full = Trainer(MODEL, TrainConfig(batch_size=128, progress=False, unseen_id_rate=0.05), tiny_split.tables,
                   len(tiny_split.train.dense_names))
    with pytest.raises(ValueError, match="unseen_id_rate=0.05 replaces ids of learned-hash tables, and this model has "
                                         "none"):
        full.fit(tiny_split.train)
    with pytest.raises(ValueError, match=r"unseen_id_rate must lie in \[0, 1\), got 1.0"):
        TrainConfig(unseen_id_rate=1.0)
