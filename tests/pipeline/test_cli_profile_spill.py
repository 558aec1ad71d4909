"""`lhf profile --spill-dir`: exact profiles through bounded memory, equal to the in-memory ones."""

import os

import numpy as np
import pytest

from lhf_torchrec.cli import main
from lhf_torchrec.pipeline.artifacts import load_profiles

DATA = ["--rows", "6000", "--scale", "0.0005", "--data-seed", "3"]


def test_spilled_profiles_equal_in_memory_and_leave_no_files(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    plain, spilled = str(tmp_path / "p.safetensors"), str(tmp_path / "s.safetensors")
    assert main(["profile", *DATA, "--out", plain]) == 0
    assert main(["profile", *DATA, "--spill-dir", str(spill), "--out", spilled]) == 0
    want, _ = load_profiles(plain, 8)
    got, _ = load_profiles(spilled, 8)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name].ids, got[name].ids) and np.array_equal(want[name].counts, got[name].counts)
        assert want[name].total == got[name].total
    assert os.listdir(spill) == []


def test_spill_dir_is_for_exact_profiles(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["profile", *DATA, "--capacity", "10", "--spill-dir", str(tmp_path), "--out", str(tmp_path / "p")])
    assert "not allowed with argument" in capsys.readouterr().err
