"""The `lhf` pipeline end to end on tiny synthetic data, and its errors on bad input."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from lhf_torchrec.cli import main

DATA = ["--rows", "6000", "--scale", "0.0005", "--data-seed", "3"]
MODEL = ["--embedding-dim", "8", "--dense-arch-layer-sizes", "16", "--over-arch-layer-sizes", "16,1"]
TRAIN = ["--batch-size", "128", "--no-progress"]


def test_profile_learn_fit_train_evaluate(tmp_path, capsys):
    p, e, m = (str(tmp_path / n) for n in ("profiles.safetensors", "embeddings.safetensors", "mappings.safetensors"))
    assert main(["profile", *DATA, "--out", p]) == 0
    assert "t_cat_2" in capsys.readouterr().out
    assert main(["learn", *DATA, *TRAIN, "--profiles", p, "--dim", "4", "--out", e]) == 0
    assert main(["fit", "--profiles", p, "--embeddings", e, "--method", "combination", "--compression", "4",
                 "--embedding-dim", "8", "--out", m]) == 0
    fit_out = capsys.readouterr().out
    assert "combination:" in fit_out and "smaller" in fit_out
    ratio = float(fit_out.split("bytes: ")[-1].split("x smaller")[0])
    assert 2.5 < ratio <= 4.0  # small tables stay full size, so the whole model compresses a bit less
    ckpt, results = str(tmp_path / "ckpt"), str(tmp_path / "train.json")
    assert main(["train", *DATA, *MODEL, *TRAIN, "--epochs", "2", "--mappings", m, "--checkpoint-dir", ckpt,
                 "--checkpoint-every", "10", "--results", results]) == 0
    trained = json.load(open(results))
    assert trained["steps"] == 2 * (4800 // 128)
    assert trained["validation"][-1]["auc"] > 0.6
    evaluated = str(tmp_path / "eval.json")
    assert main(["evaluate", *DATA, *MODEL, *TRAIN, "--mappings", m, "--checkpoint-dir", ckpt,
                 "--results", evaluated]) == 0
    assert json.load(open(evaluated))["test"] == trained["test"]


def _train_cmd(ckpt: str, results: str, *extra: str):
    return [sys.executable, "-m", "lhf_torchrec.cli", "train", *DATA, *MODEL, *TRAIN, "--epochs", "2",
            "--method", "frequency", "--compression", "4", "--checkpoint-dir", ckpt, "--checkpoint-every", "5",
            "--results", results, *extra]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = str(tmp_path / "reference.json")
    subprocess.run(_train_cmd(str(tmp_path / "ref_ckpt"), reference), check=True, capture_output=True, timeout=600)
    ckpt, results = str(tmp_path / "ckpt"), str(tmp_path / "resumed.json")
    victim = subprocess.Popen(_train_cmd(ckpt, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(ckpt, "step_000000015")):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    last = max(int(n.split("_")[1]) for n in os.listdir(ckpt) if not n.endswith(".partial"))
    subprocess.run(_train_cmd(ckpt, results, "--resume"), check=True, capture_output=True, timeout=600)
    resumed, expected = json.load(open(results)), json.load(open(reference))
    assert resumed["resumed_from_step"] == last >= 15  # lost only the steps after the last checkpoint
    assert resumed["steps"] == expected["steps"]
    assert resumed["test"] == pytest.approx(expected["test"], abs=1e-6)


def test_bad_inputs_name_the_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.tsv")
    assert main(["profile", "--data", "criteo-tsv", "--data-path", missing, "--out", str(tmp_path / "p")]) == 2
    assert "nope.tsv" in capsys.readouterr().err
    # a mapping file for other tables
    from lhf_torchrec import fit_mapping, save_mappings

    other = str(tmp_path / "other.safetensors")
    save_mappings(other, {"t_user": fit_mapping(None, method="hash", num_rows=10)})
    assert main(["train", *DATA, *MODEL, *TRAIN, "--mappings", other]) == 2
    err = capsys.readouterr().err
    assert "other.safetensors maps tables ['t_user']" in err
    # a mapping file where profiles are expected
    assert main(["fit", "--profiles", other, "--method", "hash", "--out", str(tmp_path / "m")]) == 2
    assert "other.safetensors: holds 'lhf_torchrec.mapping', expected 'lhf_torchrec.profiles/1'" in capsys.readouterr().err


def test_train_with_each_tables_setting_chosen_on_validation(tmp_path, capsys):
    results = str(tmp_path / "train.json")
    assert main(["train", *DATA, *MODEL, *TRAIN, "--method", "combination", "--compression", "4", "--per-table",
                 "--results", results]) == 0
    outcome = json.loads(open(results).read())
    assert outcome["table_settings"] and set(outcome["table_settings"]) <= set(outcome["table_rows"])
    printed = capsys.readouterr().out
    assert all(f"table {t}: {s} (chosen on validation)" in printed for t, s in outcome["table_settings"].items())
    assert main(["train", *DATA, *MODEL, *TRAIN, "--method", "frequency", "--per-table"]) == 2
    assert "needs a method that learns embeddings" in capsys.readouterr().err


def test_fit_settings_reach_the_fit_and_bad_ones_stop_before_any_work(tmp_path, capsys, caplog):
    from lhf_torchrec.mapping import load_mappings
    from lhf_torchrec.pipeline.artifacts import load_embeddings, load_profiles
    from lhf_torchrec.pipeline.methods import FitInputs, fit_method

    p, e = str(tmp_path / "profiles.safetensors"), str(tmp_path / "embeddings.safetensors")
    assert main(["profile", *DATA, "--out", p]) == 0
    assert main(["learn", *DATA, *TRAIN, "--profiles", p, "--dim", "4", "--out", e]) == 0
    fit = ["fit", "--profiles", p, "--embeddings", e, "--method", "combination", "--compression", "4",
           "--embedding-dim", "8"]
    default, tail = str(tmp_path / "default.safetensors"), str(tmp_path / "tail.safetensors")
    assert main([*fit, "--out", default]) == 0
    assert main([*fit, "--param", "hashed_fraction=0", "--param", "min_count=30", "--out", tail]) == 0
    assert "combination with hashed_fraction=0, min_count=30" in capsys.readouterr().out
    profiles, tables = load_profiles(p, 8)
    expected = fit_method("combination", tables, profiles, FitInputs(load_embeddings(e)), compression=4,
                          optimizer="rowwise_adagrad", hashed_fraction=0, min_count=30).compression.mappings
    written, defaults = load_mappings(tail), load_mappings(default)
    assert {n: m.fingerprint for n, m in written.items()} == {n: m.fingerprint for n, m in expected.items()}
    assert any(written[n].fingerprint != defaults[n].fingerprint for n in written)
    # A floor below the learn step's: those ids have no embedding (here none has: an error naming the fix),
    # unless the embeddings are learned from that floor too.
    assert main([*fit, "--param", "min_count=5", "--out", str(tmp_path / "low.safetensors")]) == 2
    assert "has an embedding (embeddings of another table or data, or learned only for ids seen more often than " \
           "this fit's min_count=5: lhf learn --min-count)" in capsys.readouterr().err
    e5 = str(tmp_path / "embeddings5.safetensors")
    assert main(["learn", *DATA, *TRAIN, "--profiles", p, "--dim", "4", "--min-count", "5", "--out", e5]) == 0
    fit5 = [*fit[:4], e5, *fit[5:]]
    with caplog.at_level(logging.WARNING, logger="lhf_torchrec.mapping.methods"):
        assert main([*fit5, "--param", "min_count=5", "--out", str(tmp_path / "low5.safetensors")]) == 0
        assert main(["train", *DATA, *MODEL, *TRAIN, "--max-steps", "2", "--method", "combination", "--compression",
                     "4", "--param", "min_count=5"]) == 0
    assert "have no embedding" not in caplog.text
    for argv, message in [
        ([*fit, "--param", "tail=1"], "method 'combination' has no setting 'tail'; its settings: hot_fraction, "
                                      "hashed_fraction, min_count, n_iter, mapping_share"),
        ([*fit, "--param", "hashed_fraction=1.5"], "hashed_fraction must be in [0, 1] or 'auto', got 1.5"),
        ([*fit, "--param", "min_count=2.5"], "min_count must be an integer >= 1, got 2.5"),
        ([*fit, "--param", "n_iter=0"], "n_iter must be an integer >= 1, got 0"),
        ([*fit, "--param", "min_count"], "expected NAME=VALUE"),
        ([*fit, "--param", "min_count=3", "--param", "min_count=4"], "--param min_count is given twice"),
        (["train", *DATA, "--param", "min_count=3"], "--param sets the fit of a compressed --method"),
        (["train", *DATA, "--method", "frequency", "--param", "mapping_share=0.5"],
         "method 'frequency' has no setting 'mapping_share'"),
    ]:
        try:
            code = main([*argv, "--out" if argv[0] == "fit" else "--results", str(tmp_path / "never")])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not os.path.exists(tmp_path / "never")


def test_budget_split_by_access_reaches_fit_and_train(tmp_path, capsys):
    from lhf_torchrec.mapping import load_mappings
    from lhf_torchrec.pipeline.artifacts import load_profiles
    from lhf_torchrec.pipeline.methods import FitInputs, fit_method

    p, m = str(tmp_path / "profiles.safetensors"), str(tmp_path / "split.safetensors")
    assert main(["profile", *DATA, "--out", p]) == 0
    assert main(["fit", "--profiles", p, "--method", "frequency", "--compression", "10", "--embedding-dim", "8",
                 "--budget-split", "access", "--out", m]) == 0
    profiles, tables = load_profiles(p, 8)
    want = fit_method("frequency", tables, profiles, FitInputs(), compression=10, optimizer="rowwise_adagrad",
                      budget_split="access")
    uniform = fit_method("frequency", tables, profiles, FitInputs(), compression=10, optimizer="rowwise_adagrad")
    # The uniformly compressed tables' bytes, moved among themselves, within their budgets in all.
    assert want.budgets != uniform.budgets and set(want.budgets) <= set(uniform.budgets)
    assert sum(want.per_table_bytes[n] for n in uniform.budgets) <= sum(uniform.budgets.values())
    written = load_mappings(m)
    assert {n: x.fingerprint for n, x in written.items()} == {
        n: x.fingerprint for n, x in want.compression.mappings.items()}
    assert f"frequency: {want.total_bytes:,} bytes" in capsys.readouterr().out
    results = str(tmp_path / "train.json")
    assert main(["train", *DATA, *MODEL, *TRAIN, "--max-steps", "2", "--method", "frequency", "--compression", "10",
                 "--budget-split", "access", "--results", results]) == 0
    trained = json.load(open(results))
    assert trained["budget_split"] == "access"
    assert trained["table_rows"] == {t.name: want.rows[t.name] for t in tables}
    assert main(["train", *DATA, *MODEL, *TRAIN, "--mappings", m, "--budget-split", "access"]) == 2
    assert "--budget-split splits the bytes of a compressed --method fitted here" in capsys.readouterr().err
    assert main(["fit", "--profiles", p, "--method", "full", "--budget-split", "access", "--out",
                 str(tmp_path / "never.safetensors")]) == 2
    assert "--budget-split splits the bytes of the compressed mapping methods" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never.safetensors")
