import hashlib
from pathlib import Path

import numpy as np
import pytest

from lhf_torchrec.data import CSVSource, CSVSpec, DataFormatError, categorical_id, read_csv, time_split

SPEC = CSVSpec(label="click", dense=["price", "hour"], categorical=["user", "color"])
HEADER = "user,price,click,color,hour,note\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _hashed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=b"lhf_torchrec").digest(), "big") >> 1


def test_categorical_ids() -> None:
    assert categorical_id("42") == 42
    assert categorical_id("0") == 0
    assert categorical_id(str(2**63 - 1)) == 2**63 - 1
    assert categorical_id("") == -1
    for text in ["red", "007", "-3", "4.0", " 4", str(2**63), "été"]:  # not canonical integers: hashed
        assert categorical_id(text) == _hashed(text)
        assert 0 <= categorical_id(text) < 2**63
    assert categorical_id("red") != categorical_id("Red")


def test_csv_with_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", HEADER + '7,1.5,1,red,3,"x, y"\n12,,0,,4,z\n\n7,2,1,"blue",,\n')
    data = read_csv(path, SPEC)
    assert data.dense_names == ["price", "hour"] and data.sparse_names == ["user", "color"]
    np.testing.assert_array_equal(data.labels, [1, 0, 1])
    np.testing.assert_array_equal(data.dense, np.array([[1.5, 3], [0, 4], [2, 0]], np.float32))
    np.testing.assert_array_equal(data.sparse, [[7, categorical_id("red")], [12, -1], [7, categorical_id("blue")]])


def test_tsv_without_header_and_several_files(tmp_path: Path) -> None:
    spec = CSVSpec(
        label="y", dense=["x"], categorical=["a", "b"], delimiter="\t", header=False, column_names=["a", "y", "x", "b"]
    )
    a = _write(tmp_path / "a.tsv", "1\t0\t0.5\tq\n2\t1\t1.5\tr\n")
    b = _write(tmp_path / "b.tsv", "3\t1\t-2\tq\n")
    source = CSVSource([a, b], spec)
    assert len(source) == 3 and source.record_counts() == [2, 1]
    data = source.load()
    np.testing.assert_array_equal(data.sparse[:, 0], [1, 2, 3])
    assert data.sparse[0, 1] == data.sparse[2, 1] == categorical_id("q")
    np.testing.assert_array_equal(data.dense[:, 0], [0.5, 1.5, -2])
    np.testing.assert_array_equal(source.slice(1, 3).load().sparse[:, 0], [2, 3])
    train, test = time_split(source, (2 / 3, 1 / 3))
    np.testing.assert_array_equal(test.load().labels, [1])


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="used twice"):
        CSVSpec(label="a", categorical=["a"])
    with pytest.raises(ValueError, match="column_names"):
        CSVSpec(label="a", categorical=["b"], header=False)
    with pytest.raises(ValueError, match="at least one categorical"):
        CSVSpec(label="a", dense=["b"])


@pytest.mark.parametrize(
    "bad_record, reason",
    [
        ("7,1.5,1,red", "expected 6 fields, got 4"),
        ("7,cheap,1,red,3,", "column 'price': expected a number, got 'cheap'"),
        ("7,inf,1,red,3,", "column 'price': expected a finite number, got 'inf'"),
        ("7,1,,red,3,", "column 'click': expected a number, got ''"),
        ("7,1,3,red,3,", "column 'click': label must lie in [0, 1], got '3'"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, bad_record: str, reason: str) -> None:
    path = _write(tmp_path / "bad.csv", HEADER + "7,1,1,red,3,\n" + bad_record + "\n8,1,0,red,3,\n")
    with pytest.raises(DataFormatError) as err:
        read_csv(path, SPEC)
    assert str(err.value) == f"{path}:3: {reason}"
    source = CSVSource(path, SPEC, on_error="skip")
    assert len(source.load()) == 2
    assert source.report.lines_skipped == 1 and source.report.examples == [f"{path}:3: {reason}"]


def test_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.csv", HEADER + '7,1,1,red,3,"multi\nline"\n7,x,1,red,3,\n')
    with pytest.raises(DataFormatError, match=r"q.csv:4: column 'price'"):
        read_csv(path, SPEC)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        CSVSource(tmp_path / "missing.csv", SPEC)
    with pytest.raises(IsADirectoryError):
        CSVSource(tmp_path, SPEC)
    with pytest.raises(DataFormatError, match=r"cols.csv:1: columns \['price'"):
        read_csv(_write(tmp_path / "cols.csv", "user,click,color,hour\n1,1,a,2\n"), SPEC)
    with pytest.raises(DataFormatError, match="empty.csv:1: empty file"):
        read_csv(_write(tmp_path / "empty.csv", ""), SPEC)
    binary = tmp_path / "latin1.csv"
    binary.write_bytes((HEADER + "7,1,1,r\xe9d,3,\n").encode("latin-1"))
    with pytest.raises(DataFormatError, match=f"{binary}: not UTF-8 text"):
        read_csv(binary, SPEC)
