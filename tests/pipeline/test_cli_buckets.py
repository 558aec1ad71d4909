"""`lhf fit --num-buckets`: bucketed mappings from the command line."""

import pytest
import torch

from lhf_torchrec.cli import main
from lhf_torchrec.mapping import load_mappings
from lhf_torchrec.mapping.hashing import bucket_of

DATA = ["--rows", "6000", "--scale", "0.0005", "--data-seed", "3"]


def test_fit_with_buckets_writes_bucketed_mappings(tmp_path, capsys):
    p, m = str(tmp_path / "profiles.safetensors"), str(tmp_path / "mappings.safetensors")
    assert main(["profile", *DATA, "--out", p]) == 0
    assert main(["fit", "--profiles", p, "--method", "frequency", "--compression", "2", "--embedding-dim", "8",
                 "--num-buckets", "4", "--out", m]) == 0
    out = capsys.readouterr().out
    assert "buckets" in out
    mappings = load_mappings(m)
    bucketed = [mp for mp in mappings.values() if mp.num_buckets == 4]
    assert bucketed, out
    for mapping in bucketed:
        assert mapping.num_rows % 4 == 0
        ids = torch.arange(-50, 5000)
        rows = mapping(ids)
        assert torch.equal(rows // mapping.rows_per_bucket, bucket_of(ids, 4, mapping.seed))
    # Tables too small for 4 buckets of 2 rows stay unbucketed; no table is silently something else.
    assert all(mp.num_buckets in (None, 4) for mp in mappings.values())


def test_fit_with_buckets_refuses_full_and_bad_counts(tmp_path, capsys):
    p = str(tmp_path / "profiles.safetensors")
    assert main(["profile", *DATA, "--out", p]) == 0
    assert main(["fit", "--profiles", p, "--method", "full", "--num-buckets", "4", "--out",
                 str(tmp_path / "m.safetensors")]) == 2
    assert "--num-buckets applies to the compressed mapping methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--profiles", p, "--method", "hash", "--num-buckets", "0", "--out", str(tmp_path / "m2")])


def test_train_co_shards_bucketed_mappings_and_evaluates_its_checkpoint(tmp_path, capsys):
    import json

    p, m = str(tmp_path / "profiles.safetensors"), str(tmp_path / "mappings.safetensors")
    assert main(["profile", *DATA, "--out", p]) == 0
    assert main(["fit", "--profiles", p, "--method", "frequency", "--compression", "2", "--embedding-dim", "8",
                 "--num-buckets", "4", "--out", m]) == 0
    bucketed = sorted(name for name, mp in load_mappings(m).items() if mp.num_buckets == 4)
    model = ["--embedding-dim", "8", "--dense-arch-layer-sizes", "16", "--over-arch-layer-sizes", "16,1"]
    train = ["--batch-size", "128", "--no-progress"]
    ckpt, results, evaluated = str(tmp_path / "ckpt"), str(tmp_path / "train.json"), str(tmp_path / "eval.json")
    assert main(["train", *DATA, *model, *train, "--epochs", "2", "--mappings", m, "--checkpoint-dir", ckpt,
                 "--results", results]) == 0
    trained = json.load(open(results))
    assert trained["cosharded_tables"] == bucketed and bucketed  # one rank divides every bucket count
    assert trained["validation"][-1]["auc"] > 0.6
    assert main(["evaluate", *DATA, *model, *train, "--mappings", m, "--checkpoint-dir", ckpt,
                 "--results", evaluated]) == 0
    assert json.load(open(evaluated))["test"] == trained["test"]
    assert main(["train", *DATA, *model, *train, "--mappings", m, "--num-buckets", "4"]) == 2
    assert "--num-buckets applies to a compressed --method fitted here" in capsys.readouterr().err
