import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import lzma
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.data import CSVSource, CSVSpec, DataFormatError, categorical_id, read_csv, time_split
from lhf_torchrec.data.files import MAX_REPORTED_LINES

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
        # Finite as a float64, infinite as the model's float32 input.
        ("7,-1e39,1,red,3,", "column 'price': '-1e39' is beyond float32's range (3.4e38), the model's dense inputs; "
                             "declare \"log1p\" in the spec's transforms for 'price'"),
        ("7,1,,red,3,", "column 'click': expected a number, got ''"),
        ("7,1,3,red,3,",
         "column 'click': label must lie in [0, 1], got '3' (for ratings, set the spec's label_threshold)"),
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


def test_a_value_beyond_float32_is_well_formed_under_log1p(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.csv", HEADER + "7,1e308,1,red,3,\n8,2,0,red,3e38,\n")
    logged = dataclasses.replace(SPEC, transforms={"price": "log1p"})
    logged_source = CSVSource(path, logged)
    logged_source.cache(tmp_path / "cache", progress=False)
    data = logged_source.load()
    np.testing.assert_allclose(data.dense[:, 0], np.log1p([1e308, 2]), rtol=1e-6)
    assert data.dense[1, 1] == np.float32(3e38)  # within float32: kept as it is
    # Without log1p the record is malformed: the parse cache built with it is not reused.
    with pytest.raises(DataFormatError, match=r"big.csv:2: column 'price': '1e308' is beyond float32's range"):
        CSVSource(path, SPEC).cache(tmp_path / "cache", progress=False)


def test_a_column_name_the_spec_uses_twice_in_the_header_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "dup.csv", "user,price,click,color,hour,user\n7,1,1,red,3,8\n")
    with pytest.raises(DataFormatError, match=r"dup.csv:1: column names used by the spec occur more than once: "
                                              r"'user' at fields \[1, 6\]; rename them"):
        read_csv(path, SPEC)
    # A repeated name the spec does not use is no ambiguity.
    other = _write(tmp_path / "other.csv", "user,price,click,color,hour,x,x\n7,1,1,red,3,a,b\n")
    assert read_csv(other, SPEC).sparse[0, 0] == 7


def test_skipped_records_are_logged_once_per_range(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "skip.csv", HEADER + "7,x,1,red,3,\n" + "8,1,0,red,3,\n" * 9)
    source = CSVSource(path, SPEC, on_error="skip")
    source.cache(tmp_path / "cache", progress=False)
    head, tail = source.slice(0, 5), source.slice(5, 10)
    with caplog.at_level("WARNING"):
        for _ in range(3):  # three epochs
            list(head.chunks(4))
            list(tail.chunks(4))
    logged = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert logged == [f"skipped 1 malformed of 5 lines; first: {path}:2: column 'price': expected a number, got 'x'"]
    # The cache keeps the texts of the first MAX_REPORTED_LINES bad records only: a later range with none of
    # them says how many it skipped, without an empty list of examples.
    many = _write(tmp_path / "many.csv", HEADER + "7,x,1,red,3,\n" * MAX_REPORTED_LINES + "8,1,0,red,3,\n" * 4
                  + "7,x,1,red,3,\n")
    source = CSVSource(many, SPEC, on_error="skip")
    source.cache(tmp_path / "cache", progress=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        list(source.slice(MAX_REPORTED_LINES, MAX_REPORTED_LINES + 5).chunks(4))
    assert [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()] == [
        "skipped 1 malformed of 5 lines"]


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
    with pytest.raises(DataFormatError, match=f"{binary}:2: not utf-8 text \\(set the spec's encoding"):
        read_csv(binary, SPEC)
    # Read by the csv module (a quote): its decoder reads thousands of lines ahead, the error names the line.
    late = tmp_path / "late.csv"
    late.write_bytes((HEADER + '7,1,1,"red",3,\n' + "7,1,1,red,3,\n" * 3000 + "7,1,1,r\xe9d,3,\n").encode("latin-1"))
    with pytest.raises(DataFormatError, match=f"{late}:3003: not utf-8 text \\(set the spec's encoding"):
        read_csv(late, SPEC)
    latin1 = dataclasses.replace(SPEC, encoding="latin-1")
    assert read_csv(binary, latin1).sparse[0, 1] == categorical_id("r\xe9d")  # the same id as from UTF-8 text
    binary.write_bytes((HEADER + '7,1,1,"r\xe9d",3,\n').encode("cp1252"))  # quoted: read by the csv module
    assert read_csv(binary, dataclasses.replace(SPEC, encoding="cp1252")).sparse[0, 1] == categorical_id("r\xe9d")
    for bad in ("utf-16", "no-such-codec", "base64"):
        with pytest.raises(ValueError, match=f"encoding must be a text encoding that writes ASCII as ASCII .*{bad}"):
            dataclasses.replace(SPEC, encoding=bad)


TRANSFORMED = CSVSpec(label="y", dense=["views", "age", "raw"], categorical=["u"],
                      transforms={"views": ["log1p", "standardize"], "age": "standardize"})


def _transform_file(tmp_path: Path) -> Path:
    rows = [(0, 0, 10, 5), (1, 3, 20, -1), (0, 7, 30, 2), (1, "", 40, 0), (0, 99, 1000, 7)]
    return _write(tmp_path / "t.csv", "y,views,age,raw,u\n" + "".join(f"{y},{v},{a},{r},u{i}\n"
                                                                      for i, (y, v, a, r) in enumerate(rows)))


def test_dense_transforms_use_the_training_rows_statistics(tmp_path: Path) -> None:
    source = CSVSource(_transform_file(tmp_path), TRANSFORMED)
    with pytest.raises(ValueError, match=r"\['views', 'age'\] are to be standardized; call fit_standardization"):
        source.load()
    source.fit_standardization(0, 3)  # the first three rows are the training rows
    views = np.log1p([0.0, 3, 7])
    age = np.array([10.0, 20, 30])
    stats = source.standardization
    assert list(stats) == ["views", "age"]
    assert stats["views"] == pytest.approx((views.mean(), views.std()))
    assert stats["age"] == pytest.approx((age.mean(), age.std()))
    train, rest = time_split(source, (0.6, 0.4))
    np.testing.assert_allclose(train.load().dense[:, 0], (views - views.mean()) / views.std(), rtol=1e-6)
    test = rest.load()  # transformed with the training rows' statistics, not its own
    np.testing.assert_allclose(test.dense[:, 0], (np.log1p([0.0, 99]) - views.mean()) / views.std(), rtol=1e-6)
    np.testing.assert_allclose(test.dense[:, 1], ([40.0, 1000] - age.mean()) / age.std(), rtol=1e-6)
    np.testing.assert_array_equal(test.dense[:, 2], [0, 7])  # no transform declared: raw values
    everything = read_csv(source.paths, TRANSFORMED)  # read_csv standardizes with all its rows
    assert abs(everything.dense[:, :2].mean(axis=0)).max() < 1e-6
    log_only = read_csv(source.paths, CSVSpec(label="y", dense=["raw"], categorical=["u"], transforms={"raw": "log1p"}))
    np.testing.assert_allclose(log_only.dense[:, 0], np.log1p([5.0, 0, 2, 0, 7]), rtol=1e-6)  # negatives count as 0


def test_a_constant_column_is_centred_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "y,x,u\n0,3.3,a\n1,3.3,b\n0,3.3,c\n")
    data = read_csv(path, CSVSpec(label="y", dense=["x"], categorical=["u"], transforms={"x": "standardize"}))
    np.testing.assert_allclose(data.dense[:, 0], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "transforms, message",
    [
        ({"u": "log1p"}, "'u' is not a dense column"),
        ({"x": "log"}, r"transforms of 'x': \['log'\]; choose from \['log1p', 'standardize'\]"),
        ({"x": ["standardize", "log1p"]}, "each at most once, in the order"),
        ({"x": ["log1p", "log1p"]}, "each at most once, in the order"),
        ({"x": []}, "choose from"),
        (["x"], "transforms must map dense columns to transforms"),
    ],
)
def test_bad_transforms_are_named(transforms, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CSVSpec(label="y", dense=["x"], categorical=["u"], transforms=transforms)


def test_table_sizes_come_from_the_data(tmp_path: Path) -> None:
    spec = CSVSpec(label="y", categorical=["name", "code", "big", "offset", "empty"])
    lines = ["y,name,code,big,offset,empty"]
    for i in range(40):
        lines.append(f"{i % 2},n{i % 7},{i % 10 + (i == 39) * 5},{i * 10**15 + 3},{10**6 + i % 4},")
    lines.append("1,,,,,")  # every field empty: missing ids
    sizes = CSVSource(_write(tmp_path / "s.csv", "\n".join(lines) + "\n"), spec).table_sizes()
    # strings: a vocabulary (7 ids + 1 unseen); 0..9 and 14 fill most of [0, 14]: the id space;
    # sparse large integers: a vocabulary; 4 ids near 10^6: a vocabulary; no value at all: one row
    assert sizes == [8, 15, 41, 5, 1]


PLAIN = CSVSpec(label="y", dense=["views", "age", "raw"], categorical=["u"])


def _mixed_file(tmp_path: Path, rows: int = 300) -> Path:
    """Strings, integers, empty fields, a quoted comma and a malformed record every 97 rows."""
    lines = ["y,views,age,raw,u"]
    for i in range(rows):
        if i % 97 == 50:
            lines.append(f"{i % 2},x{i},1,2,u{i}")  # not a number in 'views'
        else:
            lines.append(f"{i % 2},{i % 13 if i % 11 else ''},{i},{i % 5 - 2},\"u,{i % 17}\"" if i % 3 else
                         f"{(i + 1) % 2},{i % 7},{i * 2},,{i % 29}")
    return _write(tmp_path / "mixed.csv", "\n".join(lines) + "\n")


def _tables(source: CSVSource):
    data = source.load()
    return data.labels, data.dense, data.sparse


@pytest.mark.parametrize("rows", [300, 70_000])  # one block, and blocks that straddle the bad records
def test_parse_cache_reads_what_the_text_gives(tmp_path: Path, rows: int, monkeypatch) -> None:
    monkeypatch.setattr("lhf_torchrec.data.tabular._BLOCK_ROWS", 256)
    path = _mixed_file(tmp_path, rows)
    text = CSVSource(path, TRANSFORMED, on_error="skip")
    cached = CSVSource(path, TRANSFORMED, on_error="skip")
    folder = cached.cache(tmp_path / "cache", progress=False)
    assert folder.parent == tmp_path / "cache" / "csv" and len(cached) == len(text) == rows
    for source in (text, cached):
        source.fit_standardization(0, rows // 2)
    assert cached.standardization == text.standardization
    first_bad = None  # the cache describes the files' first bad records (their counts are exact everywhere)
    for start, stop in [(0, rows), (1, rows // 3), (rows // 2, rows)]:
        got, want = cached.slice(start, stop), text.slice(start, stop)
        for a, b in zip(_tables(got), _tables(want)):
            np.testing.assert_array_equal(a, b)
        assert (got.report.lines_read, got.report.lines_skipped) == (want.report.lines_read, want.report.lines_skipped)
        assert got.report.lines_skipped > 0
        # What an epoch's steps follow: the cache knows the valid records of any slice, the text only its records.
        assert got.num_examples() == len(_tables(got)[0]) == stop - start - got.report.lines_skipped
        assert want.num_examples() == len(want) == stop - start
        first_bad = first_bad or want.report.examples
        assert got.report.examples == [e for e in want.report.examples if e in first_bad]


def test_parse_cache_is_reused_and_follows_the_files(tmp_path: Path, monkeypatch) -> None:
    path = _mixed_file(tmp_path)
    first = CSVSource(path, PLAIN, on_error="skip").cache(tmp_path / "cache", progress=False)
    # A second source of the same files and columns opens the cache: the text is not parsed again.
    monkeypatch.setattr(CSVSource, "_parse", lambda *a: pytest.fail("parsed the text again"))
    again = CSVSource(path, PLAIN, on_error="skip")
    assert again.cache(tmp_path / "cache", progress=False) == first
    monkeypatch.undo()
    other_columns = CSVSpec(label="y", dense=["age"], categorical=["u"])
    assert CSVSource(path, other_columns, on_error="skip").cache(tmp_path / "cache", progress=False) != first
    _write(path, path.read_text() + "1,2,3,4,late\n")  # an edited file is parsed again
    edited = CSVSource(path, PLAIN, on_error="skip")
    assert edited.cache(tmp_path / "cache", progress=False) != first and len(edited) == 301
    assert edited.load().sparse[-1, 0] == categorical_id("late")
    assert not list((tmp_path / "cache" / "csv").glob(".*"))  # no private folders left behind


def test_a_damaged_parse_cache_is_named(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    folder = CSVSource(path, TRANSFORMED, on_error="skip").cache(tmp_path / "cache", progress=False)
    sparse = folder / "sparse.npy"
    raw = bytearray(sparse.read_bytes())
    raw[-1] ^= 1
    sparse.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match=f"{sparse}: missing or damaged .*delete {folder}"):
        CSVSource(path, TRANSFORMED, on_error="skip").cache(tmp_path / "cache", progress=False)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(DataFormatError, match="not a readable parse cache manifest"):
        CSVSource(path, TRANSFORMED, on_error="skip").cache(tmp_path / "cache", progress=False)


def test_a_malformed_record_stops_the_cache_and_leaves_nothing(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    with pytest.raises(DataFormatError, match=r"mixed.csv:52: column 'views'"):
        CSVSource(path, TRANSFORMED).cache(tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / "csv").iterdir())


def test_a_cache_published_by_another_process_is_used(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    source = CSVSource(path, PLAIN, on_error="skip")
    folder = source.cache(tmp_path / "cache", progress=False)
    # The race: this process finishes parsing after another one published the same cache.
    source._write_cache(folder, source._cache_inputs(), progress=False, workers=1)
    assert [p.name for p in (tmp_path / "cache" / "csv").iterdir()] == [folder.name]
    reopened = CSVSource(path, PLAIN, on_error="skip")
    assert reopened.cache(tmp_path / "cache", progress=False) == folder
    for a, b in zip(_tables(reopened), _tables(source)):
        np.testing.assert_array_equal(a, b)


_FIELD_TEXT = st.text(alphabet=st.sampled_from(['a', 'Z', '7', '0', ' ', 'é', ',', '"', '\r', '\n', '\t']), max_size=4)


def _oracle(path: Path, spec: CSVSpec) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Line numbers, labels, dense values and ids of every record, by the csv module directly."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=spec.delimiter)
        names = next(reader)
        positions = [names.index(c) for c in (spec.label, *spec.dense, *spec.categorical)]
        lines, rows = [], []
        for fields in reader:
            if fields:
                if len(fields) != len(names):  # e.g. an unquoted lone CR: a line end to the csv module
                    hint = f" (the delimiter {spec.delimiter!r} does not occur in the line: is it the files' delimiter?)"
                    raise DataFormatError(path, reader.line_num, f"expected {len(names)} fields, got {len(fields)}"
                                                                 + (hint if len(fields) == 1 else ""))
                lines.append(reader.line_num)
                rows.append([fields[p] for p in positions])
    num_dense = len(spec.dense)
    labels = np.array([float(r[0]) for r in rows])
    dense = np.array([[float(t or "0") for t in r[1 : 1 + num_dense]] for r in rows]).reshape(len(rows), num_dense)
    sparse = np.array([[categorical_id(t) for t in r[1 + num_dense :]] for r in rows], dtype=np.int64)
    return lines, labels, dense, sparse.reshape(len(rows), len(spec.categorical))


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.tuples(st.sampled_from(["0", "1", "0.5"]), st.sampled_from(["", "3", "-1.5", "1e3"]),
                               _FIELD_TEXT, st.sampled_from(["12", "", "x", "007"])), max_size=40),
    line_end=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    blank_every=st.sampled_from([0, 3]),
    block_bytes=st.sampled_from([1, 16, 64, 1 << 20]),
)
def test_quote_free_blocks_read_what_the_csv_module_reads(
    tmp_path_factory, records, line_end: str, bom: bool, blank_every: int, block_bytes: int
) -> None:
    # Lines are split with str methods until the first block with a quote, NUL or lone CR; the csv
    # module reads from there on. Either way: the records, values and line numbers the csv module gives.
    spec = CSVSpec(label="y", dense=["d"], categorical=["s", "k"])

    def write(name: str, bad: int = -1) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator=line_end)
        writer.writerow(["k", "y", "d", "s"])
        for i, (label, dense, text, key) in enumerate(records):
            writer.writerow([key, "2" if i == bad else label, dense, text])
            if blank_every and i % blank_every == 0:
                buffer.write(line_end)
        path = tmp_path_factory.mktemp("csv") / name
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())
        return path

    path = write("r.csv")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lhf_torchrec.data.tabular._BLOCK_BYTES", block_bytes)
        try:
            lines, labels, dense, sparse = _oracle(path, spec)
        except DataFormatError as expected:
            with pytest.raises(DataFormatError) as got:
                CSVSource(path, spec).load()
            assert str(got.value) == str(expected)
            return
        source = CSVSource(path, spec)
        data = source.load()
        assert source.record_counts() == [len(records)]
        np.testing.assert_array_equal(data.labels, labels)
        np.testing.assert_array_equal(data.dense, dense.astype(data.dense.dtype))
        np.testing.assert_array_equal(data.sparse, sparse)
        if records:  # a malformed label is named by the line the csv module puts its record on
            bad = len(records) // 2
            with pytest.raises(DataFormatError, match=f"bad.csv:{lines[bad]}: column 'y': label must lie in"):
                CSVSource(write("bad.csv", bad), spec).load()


def test_a_line_longer_than_a_block_and_quotes_after_the_first_block(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lhf_torchrec.data.tabular._BLOCK_BYTES", 32)
    long_id = "x" * 100
    path = _write(tmp_path / "l.csv", f"y,u\n1,{long_id}\n0,b\n\n1,\"c,d\"\n0,e\n1,oops\n")
    data = CSVSource(path, CSVSpec(label="y", categorical=["u"])).load()
    np.testing.assert_array_equal(data.sparse[:, 0], [categorical_id(t) for t in [long_id, "b", "c,d", "e", "oops"]])
    _write(path, f"y,u\n1,{long_id}\n0,b\n\n1,\"c,d\"\n0,e\n2,oops\n")
    with pytest.raises(DataFormatError, match="l.csv:7: column 'y'"):
        CSVSource(path, CSVSpec(label="y", categorical=["u"])).load()


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_parse_workers_build_the_same_cache(tmp_path: Path, monkeypatch, on_error: str) -> None:
    # Blocks converted by two DataLoader workers land in the files' order, with the same reports and,
    # under on_error="raise", the same first error.
    monkeypatch.setattr("lhf_torchrec.data.tabular._BLOCK_ROWS", 64)
    path = _mixed_file(tmp_path, 1000)
    plain = path.read_text().replace('"', "")  # quote-free: the blocks split with str methods
    _write(tmp_path / "plain.csv", plain.replace("u,", "u_"))
    for name in ("mixed.csv", "plain.csv"):
        caches = []
        for workers in (0, 2):
            source = CSVSource(tmp_path / name, PLAIN, on_error=on_error)
            if on_error == "raise":
                with pytest.raises(DataFormatError, match=rf"{name}:52: column 'views'"):
                    source.cache(tmp_path / f"cache{workers}", progress=False, workers=workers)
                continue
            caches.append(source.cache(tmp_path / f"cache{workers}", progress=False, workers=workers))
            assert source.load().labels.shape == (1000 - 10,) and source.report.lines_skipped == 10
        for array in ("labels", "dense", "sparse", "valid", "manifest.json"):
            if caches:
                file = array if array.endswith(".json") else f"{array}.npy"
                assert (caches[0] / file).read_bytes() == (caches[1] / file).read_bytes(), (name, array)


GENRES = CSVSpec(label="y", dense=["d"], categorical=["user", "genres"],
                 multi_valued={"genres": {"separator": "|", "max_values": 3}})


@pytest.mark.parametrize("quoted", [False, True])  # quote-free blocks and the csv module
def test_a_multi_valued_column_is_one_feature_with_a_bag_per_record(tmp_path: Path, quoted: bool) -> None:
    note = ',"a, b"' if quoted else ",n"
    path = _write(tmp_path / "g.csv", "y,user,genres,d,note\n" + "".join(
        f"{y},{u},{g},1{note}\n" for y, u, g in [(1, 7, "Comedy|Drama"), (0, 8, ""), (1, 7, "Drama"),
                                                  (0, 9, "42||Comedy"), (1, 8, "Drama|Drama|War")]))
    source = CSVSource(path, GENRES)
    assert source.sparse_names == ["user", "genres[0]", "genres[1]", "genres[2]"]
    assert source.feature_names == ["user", "genres"]
    data = source.load()
    c, d, w = categorical_id("Comedy"), categorical_id("Drama"), categorical_id("War")
    np.testing.assert_array_equal(data.sparse[:, 1:], [[c, d, -1], [-1, -1, -1], [d, -1, -1], [42, -1, c], [d, d, w]])
    kjt = next(iter(data.batches(5))).sparse_features
    assert kjt["genres"].lengths().tolist() == [2, 0, 1, 2, 3]
    assert kjt["genres"].values().tolist() == [c, d, d, 42, c, d, d, w]
    # One table for the feature, sized from the ids of all its columns: 4 distinct strings and ints.
    assert source.table_sizes() == [4, 5]  # users 7, 8, 9: a vocabulary of 3 (+1)
    cached = CSVSource(path, GENRES)
    cached.cache(tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(cached.load().sparse, data.sparse)
    assert cached.cache(tmp_path / "cache", progress=False) != CSVSource(path, dataclasses.replace(
        GENRES, multi_valued={"genres": {"separator": "|", "max_values": 4}})).cache(tmp_path / "cache", progress=False)


def test_too_many_values_in_a_bag_is_a_malformed_record(tmp_path: Path) -> None:
    path = _write(tmp_path / "g.csv", "y,user,genres,d\n1,7,a|b,1\n0,8,a|b|c|d,2\n1,9,c,3\n")
    with pytest.raises(DataFormatError, match=r"g.csv:3: column 'genres': 4 values, more than its max_values 3"):
        read_csv(path, GENRES)
    source = CSVSource(path, GENRES, on_error="skip")
    np.testing.assert_array_equal(source.load().sparse[:, 0], [7, 9])
    assert source.report.lines_skipped == 1


@pytest.mark.parametrize(
    "multi_valued, message",
    [
        ({"d": {"separator": "|", "max_values": 2}}, "not a categorical column"),
        ({"genres": "|"}, "must be {'separator'"),
        ({"genres": {"separator": ",", "max_values": 2}}, "separator must be one character other than the delimiter"),
        ({"genres": {"separator": "|", "max_values": 0}}, r"max_values must be an integer in \[1, 1024\]"),
        ({"genres": {"separator": "|", "max_values": True}}, "max_values must be an integer"),
    ],
)
def test_bad_multi_valued_specs_are_named(multi_valued, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CSVSpec(label="y", dense=["d"], categorical=["user", "genres"], multi_valued=multi_valued)


def test_a_process_that_does_not_build_waits_for_the_cache(tmp_path: Path, monkeypatch) -> None:
    # Ranks other than the host's first wait for its cache instead of parsing the same text.
    path = _mixed_file(tmp_path)
    monkeypatch.setattr("lhf_torchrec.data.tabular._WAIT_POLL_S", 0.01)
    waiting = CSVSource(path, PLAIN, on_error="skip")
    waiting._write_cache = lambda *a: pytest.fail("a process with build=False parsed the text")
    result: list[Path] = []
    thread = threading.Thread(target=lambda: result.append(waiting.cache(tmp_path / "cache", build=False)))
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # nothing published yet
    builder = CSVSource(path, PLAIN, on_error="skip")
    folder = builder.cache(tmp_path / "cache", progress=False, workers=0)
    thread.join(timeout=30)
    assert result == [folder]
    np.testing.assert_array_equal(waiting.load().sparse, builder.load().sparse)


def _zipped(data: bytes, *names: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.mkdir("data")
        for name in names:
            archive.writestr(name, data)
    return out.getvalue()


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
               ".zip": lambda data: _zipped(data, "data/mixed.csv", "__MACOSX/._mixed.csv")}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_files_read_as_their_text(tmp_path: Path, monkeypatch, suffix: str) -> None:
    monkeypatch.setattr("lhf_torchrec.data.tabular._BLOCK_BYTES", 256)  # quote-free blocks, then the csv module
    path = _mixed_file(tmp_path, 500)
    packed = tmp_path / f"mixed.csv{suffix}"
    packed.write_bytes(COMPRESSORS[suffix](path.read_bytes()))
    plain, compressed = CSVSource(path, PLAIN, on_error="skip"), CSVSource(packed, PLAIN, on_error="skip")
    for a, b in zip(_tables(compressed), _tables(plain)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataFormatError, match=rf"mixed.csv{suffix}:52: column 'views'"):
        read_csv(packed, PLAIN)
    cut = tmp_path / f"cut.csv{suffix}"
    cut.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    damaged = "not a readable zip archive" if suffix == ".zip" else "corrupt or truncated compressed file"
    with pytest.raises(DataFormatError, match=f"cut.csv{suffix}: {damaged}"):
        read_csv(cut, PLAIN)


def test_a_zip_of_several_files_is_named(tmp_path: Path) -> None:
    path = tmp_path / "two.zip"
    path.write_bytes(_zipped(b"click,user\n1,a\n", "a.csv", "b.csv"))
    with pytest.raises(DataFormatError, match=r"two.zip: a zip archive of 2 files \(a.csv, b.csv\); give an archive "
                                              "of one file, or the files unpacked"):
        read_csv(path, CSVSpec(label="click", categorical=["user"]))


def test_a_rating_label_with_a_threshold_is_a_click(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.csv", "rating,user\n5,a\n3.5,b\n4,c\n1,a\n")
    spec = CSVSpec(label="rating", categorical=["user"], label_threshold=4)
    np.testing.assert_array_equal(read_csv(path, spec).labels, [1, 0, 1, 0])
    with pytest.raises(DataFormatError, match=r"r.csv:2: column 'rating': label must lie in \[0, 1\], got '5' "
                                              r"\(for ratings, set the spec's label_threshold\)"):
        read_csv(path, CSVSpec(label="rating", categorical=["user"]))
    _write(path, "rating,user\n5,a\nnan,b\n")
    with pytest.raises(DataFormatError, match=r"r.csv:3: column 'rating': expected a finite number"):
        read_csv(path, spec)
    with pytest.raises(ValueError, match="label_threshold must be a finite number"):
        CSVSpec(label="rating", categorical=["user"], label_threshold="4")


ORDERED = CSVSpec(label="click", dense=["price"], categorical=["user"], order_by="ts", name="log")


def _unordered_log(tmp_path: Path, bad: str = "") -> tuple[Path, list[tuple[float, int, int]]]:
    """A log sorted by user, not by time (as many rating logs are): (time, user, click) per record."""
    rng = np.random.default_rng(0)
    records = [(float(t), u, int(rng.integers(2))) for u in range(30) for t in rng.integers(0, 50, size=7)]
    lines = [f"{c},{t / 2},{u},{t:g}\n" for t, u, c in records]
    if bad:
        lines.insert(100, bad)
    return _write(tmp_path / "log.csv", "click,price,user,ts\n" + "".join(lines)), records


def test_records_come_in_the_order_of_a_time_column(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path / "cache"))
    path, records = _unordered_log(tmp_path, bad="1,2.0,5,soon\n")
    want = sorted(records, key=lambda r: r[0])  # stable: records of one time keep the file's order
    source = CSVSource(path, ORDERED, on_error="skip")
    with pytest.raises(ValueError, match="ordered by 'ts' are read from the parse cache; call cache"):
        source.load()
    folder = source.cache(progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["dense.npy", "labels.npy", "manifest.json", "sparse.npy",
                                                        "valid.npy"]
    assert len(source) == len(records) + 1  # the malformed record counts, as in file order
    data = source.load()
    np.testing.assert_array_equal(data.sparse[:, 0], [u for _, u, _ in want])
    np.testing.assert_array_equal(data.labels, [c for _, _, c in want])
    np.testing.assert_array_equal(data.dense[:, 0], [t / 2 for t, _, _ in want])
    assert source.report.lines_skipped == 1
    assert source.report.examples == [f"{path}:102: column 'ts' (order_by): expected a number or an ISO 8601 "
                                      "date/time, got 'soon'"]
    # The time split follows the times: no training record is later than a test record.
    splits = time_split(source)
    assert splits[0].load().dense.max() <= splits[2].load().dense.min()
    examples = []
    for split in splits:
        split.load()
        examples += split.report.examples
    assert len(examples) == 1  # the malformed record lies in one split (it has the time of the record before it)
    assert read_csv(path, ORDERED, on_error="skip").sparse.tolist() == data.sparse.tolist()
    # Ordered and unordered records are other caches.
    unordered = dataclasses.replace(ORDERED, order_by=None)
    assert CSVSource(path, unordered, on_error="skip").cache(progress=False) != folder
    with pytest.raises(DataFormatError, match=r"log.csv:102: column 'ts' \(order_by\): expected a number or an "
                                              r"ISO 8601 date/time, got 'soon'"):
        CSVSource(path, ORDERED).cache(progress=False)


def test_order_by_reads_iso_dates_and_the_files_order_breaks_ties(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "d.csv", "click,price,user,ts\n1,0,a,2017-11-26\n0,0,b,2017-11-25 23:30:00\n"
                                      "1,0,c,2017-11-26T01:00:00+02:00\n0,0,d,2017-11-26\n0,0,e,2017-11-24T08:00\n")
    users = [categorical_id(u) for u in "ecbad"]  # c is 2017-11-25 23:00 UTC
    assert read_csv(path, ORDERED).sparse[:, 0].tolist() == users
    spec = dataclasses.replace(ORDERED, order_by="user")
    with pytest.raises(DataFormatError, match=r"d.csv:2: column 'user' \(order_by\): expected a number or an ISO "
                                              r"8601 date/time, got 'a'"):
        read_csv(path, spec)
    with pytest.raises(DataFormatError, match=r"columns \['when'\] not found"):
        read_csv(path, dataclasses.replace(ORDERED, order_by="when"))


def test_labels_of_text_with_positive_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.csv", "user,behavior\n1,pv\n2,buy\n1,cart\n3,fav\n2,buy\n")
    spec = CSVSpec(label="behavior", categorical=["user"], positive_labels=["buy", "cart"])
    np.testing.assert_array_equal(read_csv(path, spec).labels, [0, 1, 1, 0, 1])
    _write(path, "user,behavior\n1,pv\n2,\n")
    with pytest.raises(DataFormatError, match=r"b.csv:3: column 'behavior': empty label"):
        read_csv(path, spec)
    with pytest.raises(DataFormatError, match=r"b.csv:2: column 'behavior': expected a number, got 'pv' \(for labels "
                                              r"of text, list the positive ones in the spec's positive_labels\)"):
        read_csv(path, CSVSpec(label="behavior", categorical=["user"]))
    for bad in ("buy", [], ["buy", 1], [""]):
        with pytest.raises(ValueError, match="positive_labels must be a list of label texts"):
            CSVSpec(label="behavior", categorical=["user"], positive_labels=bad)
    with pytest.raises(ValueError, match="label_threshold .* or positive_labels .*, not both"):
        CSVSpec(label="behavior", categorical=["user"], positive_labels=["buy"], label_threshold=1)
    for bad in ("", '"', "\n", ":\r:"):
        with pytest.raises(ValueError, match="delimiter must be one or more characters other than a quote or a line end"):
            CSVSpec(label="rating", categorical=["user"], delimiter=bad)
    with pytest.raises(ValueError, match="separator must be one character other than the delimiter"):
        CSVSpec(label="rating", categorical=["user"], delimiter="::", multi_valued={"user": {"separator": ":",
                                                                                           "max_values": 2}})


MOVIELENS_DAT = CSVSpec(label="rating", categorical=["user", "movie", "genres"], delimiter="::", header=False,
                        column_names=["user", "movie", "rating", "time", "genres"], label_threshold=4,
                        order_by="time", multi_valued={"genres": {"separator": "|", "max_values": 3}})


@pytest.mark.parametrize("block_bytes", [32, 1 << 20])  # records cut across blocks, and one block
def test_a_delimiter_of_several_characters_reads_plain_text(tmp_path: Path, monkeypatch, block_bytes: int) -> None:
    # MovieLens' .dat files: fields split by '::', no quoting (a quote is text), records in user order.
    # A record ending in ':' before one starting with ':' is split record by record, not across them.
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("lhf_torchrec.data.tabular._BLOCK_BYTES", block_bytes)
    records = [("1", '"Heat" (1995)', "5", "978300760", "Action|Crime"), (":2", "a:b", "3", "978300100", "Drama:"),
               (":3", "x", "4", "978300000", ""), ("10", "a,b", "1", "978300500", "Drama")]
    path = _write(tmp_path / "ratings.dat", "".join("::".join(r) + "\n" for r in records))
    data = read_csv(path, MOVIELENS_DAT)
    in_time = sorted(records, key=lambda r: int(r[3]))
    np.testing.assert_array_equal(data.labels, [float(r[2]) >= 4 for r in in_time])
    np.testing.assert_array_equal(data.sparse[:, :2], [[categorical_id(r[0]), categorical_id(r[1])] for r in in_time])
    genres = [[categorical_id(g) for g in r[4].split("|") if g] for r in in_time]
    np.testing.assert_array_equal(data.sparse[:, 2:], [g + [-1] * (3 - len(g)) for g in genres])
    _write(path, "1::a::5::1::x\n1::a::5::2::x::3\n")  # 6 fields where 5 are named
    with pytest.raises(DataFormatError, match="ratings.dat:2: expected 5 fields"):
        read_csv(path, MOVIELENS_DAT)


def test_a_delimiter_missing_from_the_lines_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.tsv", "user\titem\tclick\n1\t2\t1\n")
    spec = CSVSpec(label="click", categorical=["user", "item"], delimiter=";")
    with pytest.raises(DataFormatError, match=r"t.tsv:1: columns .* not found among \['user\\titem\\tclick'\] \(the "
                                              r"delimiter ';' does not occur in the line: is it the files' delimiter\?\)"):
        read_csv(path, spec)
    with pytest.raises(DataFormatError, match=r"the delimiter '\\\\t' does not occur in the line; a tab is \"\\t\" in a JSON"):
        read_csv(path, dataclasses.replace(spec, delimiter="\\t"))  # the two characters backslash, t
    with pytest.raises(DataFormatError, match=r"t.tsv:1: expected 3 fields, got 1 \(the delimiter ';' does not occur"):
        read_csv(path, dataclasses.replace(spec, header=False, column_names=["user", "item", "click"]))


@pytest.mark.parametrize("text, line, reason", [
    (b"1::a::x::5::1\n2::b\x00::x::5::2\n", 2, "a NUL byte"),
    (b"1::a::x::5::1\r\n2::b::x::5::2\r\n3::c\rd::x::5::3\n", 3, "a carriage return that ends no line"),
    (b"1::a::x::5::1\n2::r\xe9d::x::5::2\n", 2, "not utf-8 text"),
])
def test_what_plain_text_cannot_hold_is_named(tmp_path: Path, text: bytes, line: int, reason: str) -> None:
    path = tmp_path / "ratings.dat"
    path.write_bytes(text)
    with pytest.raises(DataFormatError, match=rf"ratings.dat:{line}: {reason}.*the delimiter '::' reads every line"):
        read_csv(path, MOVIELENS_DAT)


def test_records_grouped_by_a_feature_are_named(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 6)  # a rating log sorted by user: each user's records in one run
    times, items = rng.permutation(len(users)), rng.integers(0, 50, len(users))
    path = _write(tmp_path / "ratings.csv", "click,price,user,item,ts\n" + "".join(
        f"{k % 2},0,{u},{i},{t}\n" for k, (u, i, t) in enumerate(zip(users, items, times))))
    grouped = CSVSpec(label="click", dense=["price"], categorical=["user", "item"])
    with caplog.at_level("WARNING"):
        CSVSource(path, grouped).table_sizes()
    assert "records are grouped by user (200 ids in 200 runs of records), not in time order" in caplog.text
    assert "order_by" in caplog.text and "item" not in caplog.text.split("grouped by")[1].split("not in time")[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        source = CSVSource(path, dataclasses.replace(grouped, order_by="ts"))
        source.cache(progress=False)
        assert source.table_sizes() == [200, 50]  # integer-coded ids that fill [0, max id]
    assert "grouped" not in caplog.text


def test_markers_of_missing_values_read_as_empty_fields(tmp_path: Path) -> None:
    text = HEADER + "7,NA,1,red,3,x\n\\N,2,0,NA,NA,y\n"
    path = _write(tmp_path / "na.csv", text)
    with pytest.raises(DataFormatError, match=r"na.csv:2: column 'price': expected a number, got 'NA' \(a marker of "
                                              r"missing values\? list it in the spec's missing_values\)"):
        read_csv(path, SPEC)
    spec = dataclasses.replace(SPEC, missing_values=["NA", "\\N"])
    data = read_csv(path, spec)
    np.testing.assert_array_equal(data.dense, [[0, 3], [2, 0]])
    np.testing.assert_array_equal(data.sparse, [[7, categorical_id("red")], [-1, -1]])
    np.testing.assert_array_equal(data.labels, [1, 0])
    quoted = read_csv(_write(tmp_path / "quoted.csv", text.replace("red", '"red"')), spec)  # the csv module's path
    np.testing.assert_array_equal(quoted.sparse, data.sparse)
    with pytest.raises(DataFormatError, match=r"na.csv:2: column 'click': expected a number, got 'NA' \(for labels"):
        read_csv(_write(path, HEADER + "7,1,NA,red,3,x\n"), spec)  # a label is never missing
    for bad in ("NA", [""], [None]):
        with pytest.raises(ValueError, match="missing_values must be a list of texts"):
            dataclasses.replace(SPEC, missing_values=bad)
