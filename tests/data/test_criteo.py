import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchrec.datasets.criteo as torchrec_criteo
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.data import (
    CAT_NAMES,
    INT_NAMES,
    CriteoNpyDays,
    CriteoTSV,
    DataFormatError,
    SyntheticCriteo,
    criteo_dense_transform,
    read_criteo_tsv,
    time_split,
    write_criteo_npy_days,
    write_criteo_tsv,
)

GOOD_LINE = "1\t5\t-3\t\t0" + "\t1" * 9 + "\t0000abcd\t\tFFFFFFFF" + "\t00000001" * 23


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parse_one_line_by_hand(tmp_path: Path) -> None:
    data = read_criteo_tsv(_write(tmp_path / "a.tsv", GOOD_LINE + "\n"))
    assert data.labels.tolist() == [1.0]
    np.testing.assert_array_equal(data.dense[0, :4], criteo_dense_transform(np.array([5.0, -3.0, np.nan, 0.0])))
    assert data.dense[0, 2] == 0.0 and data.dense[0, 1] == 0.0  # missing and negative counts
    assert data.sparse[0, :4].tolist() == [0xABCD, -1, 0xFFFFFFFF, 1]
    assert data.dense_names == INT_NAMES and data.sparse_names == CAT_NAMES


def test_synthetic_tsv_round_trip(tmp_path: Path, synthetic: SyntheticCriteo) -> None:
    s = synthetic
    path = tmp_path / "day_0.tsv"
    write_criteo_tsv(path, s.data.labels, s.raw_dense, s.data.sparse)
    first = path.read_text().split("\n", 1)[0].split("\t")
    assert len(first) == 40 and all(len(x) in (0, 8) for x in first[14:])
    back = read_criteo_tsv(path)
    np.testing.assert_array_equal(back.dense, s.data.dense)
    np.testing.assert_array_equal(back.sparse, s.data.sparse)
    np.testing.assert_array_equal(back.labels, s.data.labels)


_counts = st.one_of(st.just(np.nan), st.integers(-(10**15), 10**15).map(float))
_ids = st.integers(-1, 2**32 - 1)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.booleans(), st.lists(_counts, min_size=13, max_size=13), st.lists(_ids, min_size=26, max_size=26)),
        min_size=1,
        max_size=8,
    ),
    block_bytes=st.integers(1, 2000),
)
def test_tsv_round_trip_any_values(tmp_path_factory, rows, block_bytes: int) -> None:
    labels = np.array([r[0] for r in rows], dtype=np.float32)
    counts = np.array([r[1] for r in rows], dtype=np.float64)
    ids = np.array([r[2] for r in rows], dtype=np.int64)
    path = tmp_path_factory.mktemp("rt") / "x.tsv"
    write_criteo_tsv(path, labels, counts, ids)
    for line, c in zip(path.read_text().splitlines(), counts):  # the text is plain Criteo
        fields = line.split("\t")
        assert fields[1:14] == ["" if np.isnan(x) else str(int(x)) for x in c]
    back = read_criteo_tsv(path) if block_bytes > 1000 else CriteoTSV(path, block_bytes=block_bytes).load()
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.sparse, ids)
    np.testing.assert_array_equal(back.dense, criteo_dense_transform(counts))


def test_crlf_no_final_newline_gzip_and_several_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.tsv", GOOD_LINE + "\r\n" + GOOD_LINE.replace("0000abcd", "0000ABCD"))
    with gzip.open(tmp_path / "b.tsv.gz", "wt") as f:
        f.write(GOOD_LINE + "\n")
    source = CriteoTSV([a, tmp_path / "b.tsv.gz"])
    assert len(source) == 3 and source.line_counts() == [2, 1]
    data = source.load()
    assert data.sparse[:, 0].tolist() == [0xABCD] * 3


def test_streaming_blocks_slices_and_batches(tmp_path: Path, synthetic: SyntheticCriteo) -> None:
    s = synthetic.data.slice(0, 3000)
    paths = []
    for i, (lo, hi) in enumerate([(0, 1000), (1000, 2500), (2500, 3000)]):
        paths.append(tmp_path / f"day_{i}.tsv")
        write_criteo_tsv(paths[-1], s.labels[lo:hi], synthetic.raw_dense[lo:hi], s.sparse[lo:hi])
    source = CriteoTSV(paths, block_bytes=10_000)
    assert len(source) == 3000
    for part, (lo, hi) in zip(time_split(source, (0.3, 0.5, 0.2)), [(0, 900), (900, 2400), (2400, 3000)]):
        assert len(part) == hi - lo
        np.testing.assert_array_equal(part.load().sparse, s.sparse[lo:hi])
    inner = source.slice(950, 2600).slice(40, 100)  # slices compose
    np.testing.assert_array_equal(inner.load().dense, s.dense[990:1050])
    assert [len(c) for c in source.chunks(1200)] == [1200, 1200, 600]
    for rank in range(2):
        streamed = list(source.batches(256, shuffle=True, seed=3, rank=rank, world_size=2))
        in_memory = list(s.batches(256, shuffle=True, seed=3, rank=rank, world_size=2))
        assert len(streamed) == len(in_memory)
        for a, b in zip(streamed, in_memory):
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.dense_features, b.dense_features)
    assert source.num_embeddings_per_feature() == s.num_embeddings_per_feature()


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("1\t2\t3", "expected 40 tab-separated fields, got 3"),
        (GOOD_LINE + "\t5", "expected 40 tab-separated fields, got 41"),
        (GOOD_LINE.replace("1\t5\t-3", "1\tfive\t-3", 1), "field 2 (int_0): expected an integer, got 'five'"),
        (GOOD_LINE.replace("1\t5\t-3", "1\t5\t-", 1), "field 3 (int_1): expected an integer, got '-'"),
        (GOOD_LINE.replace("1\t5\t-3", "1\t5\t2.5", 1), "field 3 (int_1): expected an integer, got '2.5'"),
        (GOOD_LINE.replace("0000abcd", "0000abcz"), "field 15 (cat_0): expected an 8-digit hex id, got '0000abcz'"),
        (GOOD_LINE.replace("0000abcd", "abcd"), "field 15 (cat_0): expected an 8-digit hex id, got 'abcd'"),
        (GOOD_LINE.replace("1\t5", "2\t5", 1), "field 1 (label): expected 0 or 1, got '2'"),
        ("", "expected 40 tab-separated fields, got 1"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, bad_line: str, reason: str, caplog) -> None:
    path = _write(tmp_path / "bad.tsv", "\n".join([GOOD_LINE, GOOD_LINE, bad_line, GOOD_LINE]) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_criteo_tsv(path)
    assert str(err.value) == f"{path}:3: {reason}"
    assert err.value.line == 3 and err.value.path == str(path)

    source = CriteoTSV(path, on_error="skip")
    with caplog.at_level(logging.WARNING):
        data = source.load()
    assert len(data) == 3
    assert (source.report.lines_read, source.report.lines_skipped) == (4, 1)
    assert source.report.examples == [f"{path}:3: {reason}"]
    assert "skipped 1 malformed of 4 lines" in caplog.text


def test_skip_counts_many_bad_lines_across_blocks(tmp_path: Path) -> None:
    lines = [GOOD_LINE if i % 3 else "garbage" for i in range(3000)]
    path = _write(tmp_path / "mixed.tsv", "\n".join(lines) + "\n")
    source = CriteoTSV(path, on_error="skip", block_bytes=5000)
    assert len(source.load()) == 2000
    assert source.report.lines_skipped == 1000
    assert source.report.examples[:2] == [
        f"{path}:1: expected 40 tab-separated fields, got 1",
        f"{path}:4: expected 40 tab-separated fields, got 1",
    ]
    assert len(source.report.examples) == 5
    with pytest.raises(DataFormatError, match=r"mixed.tsv:2998: "):
        CriteoTSV(path, block_bytes=5000).slice(2996, 3000).load()


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CriteoTSV(tmp_path / "nope.tsv")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        CriteoTSV(tmp_path)
    broken = tmp_path / "broken.tsv.gz"
    broken.write_bytes(b"this is not gzip")
    with pytest.raises(DataFormatError, match=f"{broken}: corrupt or truncated compressed file"):
        CriteoTSV(broken).load()
    truncated = tmp_path / "truncated.tsv.gz"
    truncated.write_bytes(gzip.compress((GOOD_LINE + "\n").encode() * 50)[:-30])
    with pytest.raises(DataFormatError, match=f"{truncated}: corrupt or truncated"):
        CriteoTSV(truncated).load()
    with pytest.raises(ValueError, match="on_error"):
        CriteoTSV(_write(tmp_path / "a.tsv", GOOD_LINE), on_error="ignore")


def test_writer_rejects_what_criteo_cannot_hold(tmp_path: Path) -> None:
    labels, counts, ids = np.zeros(1), np.zeros((1, 13)), np.zeros((1, 26), np.int64)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        write_criteo_tsv(tmp_path / "x.tsv", labels, counts, ids + 2**32)
    with pytest.raises(ValueError, match="integers"):
        write_criteo_tsv(tmp_path / "x.tsv", labels, counts + 0.5, ids)
    with pytest.raises(ValueError, match="0 or 1"):
        write_criteo_tsv(tmp_path / "x.tsv", labels + 2, counts, ids)
    assert not (tmp_path / "x.tsv").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "x.tsv", "old")
    import lhf_torchrec.data.criteo as criteo

    def explode(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(criteo, "_format_tsv", explode)
    with pytest.raises(RuntimeError):
        write_criteo_tsv(path, np.zeros(1), np.zeros((1, 13)), np.zeros((1, 26), np.int64))
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_npy_days_round_trip(tmp_path: Path, synthetic: SyntheticCriteo) -> None:
    data = synthetic.data.slice(0, 5000)
    paths = write_criteo_npy_days(tmp_path, data, num_days=3)
    assert [p[0].name for p in paths] == ["day_0_dense.npy", "day_1_dense.npy", "day_2_dense.npy"]
    dense, sparse, labels = (np.load(p) for p in paths[1])
    assert (dense.dtype, sparse.dtype, labels.dtype, labels.shape[1]) == (np.float32, np.int64, np.int32, 1)
    source = CriteoNpyDays(tmp_path, chunk_rows=700)
    assert len(source) == 5000
    back = source.load()
    np.testing.assert_array_equal(back.dense, data.dense)
    np.testing.assert_array_equal(back.sparse, data.sparse)
    np.testing.assert_array_equal(back.labels, data.labels)
    _, val, _ = time_split(source)
    np.testing.assert_array_equal(val.load().sparse, data.sparse[4000:4500])
    np.testing.assert_array_equal(CriteoNpyDays(tmp_path, days=[2]).load().labels, data.labels[3333:])


class _LocalPathManager:
    """Stands in for iopath's PathManager (an optional torchrec dependency not in our lock)."""

    def open(self, path: str, mode: str = "r"):
        return open(path, mode)


def test_npy_days_read_by_torchrec(tmp_path: Path, synthetic: SyntheticCriteo, monkeypatch) -> None:
    monkeypatch.setattr(torchrec_criteo, "_get_path_manager", lambda key: _LocalPathManager())
    data = synthetic.data.slice(0, 1000)
    paths = write_criteo_npy_days(tmp_path, data, num_days=2)
    hashes = [max(n, 1) for n in data.num_embeddings_per_feature()]
    pipe = torchrec_criteo.InMemoryBinaryCriteoIterDataPipe(
        stage="train",
        dense_paths=[str(p[0]) for p in paths],
        sparse_paths=[str(p[1]) for p in paths],
        labels_paths=[str(p[2]) for p in paths],
        batch_size=128,
        rank=0,
        world_size=1,
        hashes=hashes,
    )
    theirs = list(pipe)
    ours = list(data.batches(128))
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        assert torch.equal(t.dense_features, o.dense_features)
        assert torch.equal(t.labels.float(), o.labels)
        assert t.sparse_features.keys() == o.sparse_features.keys()
    # TorchRec keeps a missing id (-1) as a value, which its hashes= maps to the last row.
    all_values = np.concatenate([t.sparse_features.values().reshape(26, -1).T.numpy() for t in theirs])
    np.testing.assert_array_equal(all_values, np.where(data.sparse >= 0, data.sparse, np.array(hashes) - 1))


def test_npy_days_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no day_"):
        CriteoNpyDays(tmp_path)
    np.save(tmp_path / "day_0_dense.npy", np.zeros((3, 13), np.float32))
    np.save(tmp_path / "day_0_sparse.npy", np.zeros((3, 26), np.int64))
    with pytest.raises(FileNotFoundError, match="day_0_labels.npy"):
        CriteoNpyDays(tmp_path)
    np.save(tmp_path / "day_0_labels.npy", np.zeros((2, 1), np.int32))
    with pytest.raises(DataFormatError, match="shapes"):
        CriteoNpyDays(tmp_path)
