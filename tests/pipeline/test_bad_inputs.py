"""Every class of bad input to ``lhf`` gets a clear error naming the thing, and nothing is lost.

Run in-process (``main([...])``) on tiny data; commands that are refused must be refused before
they start working, so most cases here take milliseconds.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lhf_torchrec import fit_mapping, save_mappings
from lhf_torchrec.cli import main
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.pipeline.artifacts import load_embeddings, load_profiles, save_embeddings, save_profiles
from lhf_torchrec.training.model import make_tables

DATA = ["--rows", "2000", "--scale", "0.0005", "--data-seed", "3"]
SPEC = {"label": "click", "dense": ["price"], "categorical": ["user", "item"]}


def _digest(path: Path) -> str:
    """sha256 of a file, or of every file under a directory (names included)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


def _fails(argv, capsys, *needles: str) -> str:
    """Runs ``lhf argv``: it must exit 2 with an error mentioning every needle."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


@pytest.fixture
def csv_files(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    data = tmp_path / "victim.csv"
    data.write_text("user,item,price,click\n" + "".join(f"u{i % 7},i{i % 5},{i},{i % 2}\n" for i in range(50)))
    return spec, data


# ------------------------------------------------------------------ outputs: nothing is written over


def _mapping_file(path: Path) -> Path:
    save_mappings(str(path), {"t": fit_mapping(None, method="hash", num_rows=10)})
    return path


@pytest.mark.parametrize("case", ["input", "foreign file", "other artifact", "directory", "parent is a file"])
def test_output_guard_refuses_before_work_and_keeps_the_file(case, tmp_path, csv_files, capsys):
    spec, data = csv_files
    victim = {"input": data, "foreign file": tmp_path / "notes.txt", "other artifact": tmp_path / "m.safetensors",
              "directory": tmp_path / "outdir", "parent is a file": tmp_path / "notes.txt" / "p.safetensors"}[case]
    (tmp_path / "notes.txt").write_text("my notes\n")
    _mapping_file(tmp_path / "m.safetensors")
    (tmp_path / "outdir").mkdir()
    before = {p: _digest(p) for p in (data, tmp_path / "notes.txt", tmp_path / "m.safetensors", tmp_path / "outdir")}
    needle = {"input": "is also an input", "foreign file": "not an lhf_torchrec artifact",
              "other artifact": "'lhf_torchrec.mapping' artifact", "directory": "is a directory",
              "parent is a file": "is a file, not a directory"}[case]
    _fails(["profile", "--data", "csv", "--data-path", data, "--csv-spec", spec, "--out", victim], capsys,
           "--out", str(victim), needle)
    assert before == {p: _digest(p) for p in before}


def test_own_kind_of_artifact_is_replaced(tmp_path, csv_files, capsys):
    spec, data = csv_files
    out = tmp_path / "p.safetensors"
    for _ in range(2):
        assert main(["profile", "--data", "csv", "--data-path", str(data), "--csv-spec", str(spec), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out


def test_checkpoint_dir_holding_checkpoints_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_000000040").mkdir(parents=True)
    (ckpt / "step_000000040" / "__0_0.distcp").write_bytes(b"weights of an earlier run")
    before = _digest(ckpt)
    _fails(["train", *DATA, "--batch-size", "64", "--checkpoint-dir", ckpt, "--no-progress"], capsys,
           str(ckpt), "1 checkpoint(s)", "step_000000040", "--resume", "--overwrite")
    assert _digest(ckpt) == before


@pytest.mark.parametrize("command", ["train", "learn"])
def test_checkpoint_dir_that_is_a_file_is_refused_before_work(command, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.write_text("not a directory")
    extra = ["--profiles", "p", "--out", tmp_path / "e.safetensors"] if command == "learn" else []
    _fails([command, *DATA, "--checkpoint-dir", ckpt, *extra], capsys, "--checkpoint-dir", str(ckpt), "is a file")
    assert ckpt.read_text() == "not a directory"


# ------------------------------------------------------------------ corrupted artifacts


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x5A  # in the tensor data, after the header
    path.write_bytes(bytes(raw))


def _write_artifact(kind: str, path: Path):
    ids = np.array([3, 5, 9], np.int64)
    if kind == "profiles":
        tables = make_tables(["f"], [10], 4)
        save_profiles(str(path), {tables[0].name: IdProfile(ids, np.array([7, 2, 1], np.int64), 10)}, tables)
        return lambda: load_profiles(str(path), 4)
    if kind == "embeddings":
        save_embeddings(str(path), {"t_f": IdEmbeddings(ids, torch.arange(12.0).view(3, 4))})
        return lambda: load_embeddings(str(path))
    from lhf_torchrec import load_mappings

    save_mappings(str(path), {"t_f": fit_mapping(np.repeat(ids, [7, 2, 1]), method="frequency", num_rows=4)})
    return lambda: load_mappings(str(path))


@pytest.mark.parametrize("kind", ["profiles", "embeddings", "mappings"])
def test_flipped_byte_in_an_artifact_names_file_and_table(kind, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    load = _write_artifact(kind, path)
    load()
    _flip_last_byte(path)
    # A mapping whose flipped row no longer fits its table is refused as malformed before the checksum.
    with pytest.raises(ValueError, match=rf"{kind}.safetensors: (checksum mismatch for|mapping of) table 't_f'"):
        load()


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("case", ["header-only csv", "empty tsv", "rows 0"])
def test_empty_input_says_the_data_is_empty(case, tmp_path, csv_files, capsys):
    spec, data = csv_files
    out = tmp_path / "p.safetensors"
    if case == "header-only csv":
        data.write_text("user,item,price,click\n")
        _fails(["profile", "--data", "csv", "--data-path", data, "--csv-spec", spec, "--out", out], capsys,
               str(data), "no data rows")
    elif case == "empty tsv":
        tsv = tmp_path / "day_0.tsv"
        tsv.write_text("")
        _fails(["profile", "--data", "criteo-tsv", "--data-path", tsv, "--out", out], capsys, str(tsv), "no data rows")
    else:
        _fails(["profile", "--rows", "0", "--out", out], capsys, "--rows", "expected an integer >= 1, got 0")
    assert not out.exists()


def test_directory_as_tsv_path_and_garbage_npy_name_the_file(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    _fails(["profile", "--data", "criteo-tsv", "--data-path", tmp_path, "--out", out], capsys, str(tmp_path),
           "not a regular file")
    days = tmp_path / "npy"
    days.mkdir()
    for part in ("dense", "sparse", "labels"):
        (days / f"day_0_{part}.npy").write_bytes(b"\x80\x04garbage that is no npy array")
    _fails(["profile", "--data", "criteo-npy", "--data-path", days, "--out", out], capsys, "day_0_dense.npy",
           "not a numpy .npy array file")


def test_table_sizes_are_checked(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    _fails(["profile", *DATA, "--num-embeddings-per-feature", "0,-5", "--out", out], capsys,
           "--num-embeddings-per-feature", "expected an integer >= 1, got 0")
    _fails(["profile", *DATA, "--num-embeddings-per-feature", ",".join(["2"] * 26), "--out", out], capsys,
           "tables smaller than the ids of the data", "cat_0 has ids up to")


def test_csv_spec_with_a_string_for_a_list(tmp_path, csv_files, capsys):
    spec, data = csv_files
    spec.write_text(json.dumps({**SPEC, "categorical": "user"}))
    _fails(["profile", "--data", "csv", "--data-path", data, "--csv-spec", spec, "--out", tmp_path / "p"], capsys,
           str(spec), "categorical must be a list of column names, got the string 'user'")


def test_csv_spec_with_torchrec_words_for_fields(tmp_path, csv_files, capsys):
    # A TorchRec user writes "sparse" for the id columns: the error names the field and the right one.
    spec, data = csv_files
    fields = {**SPEC, "sparse": SPEC["categorical"]}
    del fields["categorical"]
    spec.write_text(json.dumps(fields))
    _fails(["profile", "--data", "csv", "--data-path", data, "--csv-spec", spec, "--out", tmp_path / "p"], capsys,
           str(spec), "unknown field(s) ['sparse']", "'categorical'")


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["plan", "--preset", "criteo-kaggle", "--compression", "10", "--world-size", "8", "--reserve", "1.5"],
         ["--reserve", "[0, 1)", "1.5"]),
        (["plan", "--preset", "criteo-kaggle", "--compression", "10", "--world-size", "8", "--hbm-gb", "-1"],
         ["--hbm-gb", "-1"]),
        (["plan", "--preset", "criteo-kaggle", "--compression", "10", "--world-size", "100000"],
         ["--world-size", "[1, 1024]", "100000"]),
        (["plan", "--preset", "criteo-kaggle", "--compression", "0.5", "--world-size", "8"], ["--compression", "0.5"]),
        (["learn", "--profiles", "p", "--out", "e", "--dim", "0"], ["--dim", "[4, 16]", "got 0"]),
        (["learn", "--profiles", "p", "--out", "e", "--dim", "100"], ["--dim", "[4, 16]", "got 100"]),
        (["demo", "--compression", "0"], ["--compression", ">= 1", "got 0"]),
        (["train", "--batch-size", "0"], ["--batch-size", "got 0"]),
        (["train", "--split", "0.8,-0.1,0.3"], ["--split", "-0.1"]),
        (["train", "--seed", "-1"], ["--seed", "got -1"]),
        (["train", "--unseen-id-rate", "1"], ["--unseen-id-rate", "[0, 1)", "got 1"]),
        (["profile", "--split", "0.5,0.5", "--out", "p"], ["split needs 3 fractions", "[0.5, 0.5]"]),
    ],
)
def test_out_of_range_arguments_name_the_flag(argv, needles, capsys):
    _fails(argv, capsys, *needles)


# ------------------------------------------------------------------ embeddings that do not fit the profiles


def test_embeddings_covering_some_ids_hash_the_rest_and_none_is_an_error(caplog):
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, 20_000) % 2000
    embeddings = torch.randn(2000, 4)
    mapping = fit_mapping(ids, method="combination", num_rows=200, embeddings=embeddings[:500], min_count=2,
                          table="t_c")
    assert "table 't_c'" in caplog.text and "have no embedding; they are hashed" in caplog.text
    assert mapping(torch.from_numpy(ids)).max() < 200
    with pytest.raises(ValueError, match="table 't_c': none of the .* ids to cluster has an embedding"):
        fit_mapping(ids, method="combination", num_rows=200, embeddings=embeddings[:0], min_count=2, table="t_c")


# ------------------------------------------------------------------ a mapping fitted on other data


def test_mapping_fitted_on_other_data_warns_with_the_share_of_unseen_ids(tiny_split, caplog):
    from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
    from lhf_torchrec.pipeline.run import warn_unseen_ids
    from lhf_torchrec.pipeline.steps import fit_mappings, profile_tables

    mappings = fit_mappings(tiny_split.tables, profile_tables(tiny_split.train, tiny_split.tables), "frequency",
                            compression=4).compression.mappings
    table = sorted(mappings)[0]
    same = warn_unseen_ids("m.safetensors", mappings, tiny_split.train, tiny_split.tables, 128)
    assert same[table] == pytest.approx(1 - mappings[table].entry_share, abs=0.1)
    assert "fitted on other data" not in caplog.text
    other = load_split(DatasetSpec("synthetic", rows=3000, scale=0.002, seed=3), embedding_dim=8, progress=False)
    unseen = warn_unseen_ids("m.safetensors", mappings, other.train, other.tables, 128)
    assert unseen[table] > 0.8
    assert re.search(rf"m.safetensors: table '{table}': \d+% of the id accesses in a sample of the training data "
                     rf"\(\d+\) have no entry in its mapping, against \d+% on the data the mapping was fitted on: "
                     rf"it was fitted on other data", caplog.text)


def test_demo_config_refuses_no_compression():
    from lhf_torchrec.pipeline.demo import DemoConfig

    with pytest.raises(ValueError, match="DemoConfig: compression must be >= 1"):
        DemoConfig(compression=0)


def test_every_output_goes_through_the_atomic_writer():
    """A plain open(..., "w") or write_text in the package could leave a half-written file."""
    package = Path(__file__).resolve().parents[2] / "lhf_torchrec"
    plain = re.compile(r"""(?<!fd)open\(.*["'][wax]b?\+?["']\s*\)|\.write_(text|bytes)\(|\bsavefig\(\s*[^f]""")
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if plain.search(line)]
    assert offenders == []


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    import errno

    from lhf_torchrec.files import atomic_write

    path = tmp_path / "results.json"
    path.write_bytes(b"previous")
    with pytest.raises(OSError, match=r"results.json: not written \(No space left on device\); the previous file"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind

