"""Criteo formats: raw Kaggle/Terabyte TSV and TorchRec's preprocessed npy day files.

Raw TSV lines are ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer counts (possibly
negative, empty when missing) and 26 categorical values written as 8 hex digits (empty when
missing). They become :class:`CTRData` with TorchRec's column names (``int_0..int_12``,
``cat_0..cat_25``): dense = :func:`criteo_dense_transform` of the counts (missing counts as 0),
sparse = ``int(hex, 16)`` and ``-1`` (an empty bag) for a missing value.

Parsing is vectorized with numpy over blocks of whole lines (no Python work per line): a few
hundred thousand lines per second on one core, holding one block (``block_bytes``) in memory.

The npy day files are TorchRec's layout (read by its ``InMemoryBinaryCriteoIterDataPipe``):
``day_{i}_dense.npy`` float32 (N, 13) already transformed, ``day_{i}_sparse.npy`` int64 (N, 26),
``day_{i}_labels.npy`` int32 (N, 1). Missing ids are stored as ``-1``; TorchRec's own datapipe
keeps them as values, so give it ``hashes=`` (``-1 % h`` is the last row) when you read these
files with it.
"""

import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, INT_FEATURE_COUNT

from lhf_torchrec.data.ctr_data import CTRData
from lhf_torchrec.files import atomic_write
from lhf_torchrec.data.files import (
    MAX_REPORTED_LINES,
    DataFormatError,
    OnError,
    ParseReport,
    PathLike,
    check_on_error,
    check_readable,
    line_blocks,
    open_npy,
)
from lhf_torchrec.data.source import StreamingSource

INT_NAMES: list[str] = list(DEFAULT_INT_NAMES)
CAT_NAMES: list[str] = list(DEFAULT_CAT_NAMES)
NUM_FIELDS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT

#: Distinct values per categorical feature in Criteo Kaggle (train), C1..C26 (also the shape of the
#: synthetic data, :mod:`lhf_torchrec.data.synthetic`).
CRITEO_KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
#: Distinct values per categorical feature in Criteo 1TB, C1..C26.
CRITEO_TERABYTE_CARDINALITIES: tuple[int, ...] = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
)  # fmt: skip

_MAX_DIGITS = 18  # any 18-digit integer fits in int64
_DAY_FILE = re.compile(r"day_(\d+)_dense\.npy$")


def criteo_dense_transform(counts: np.ndarray) -> np.ndarray:
    """float32 ``log(1 + max(x, 0))`` of Criteo integer counts; NaN (missing) counts as 0.

    Example::

        >>> criteo_dense_transform(np.array([[0.0, 1.0, -2.0, np.nan]])) == np.log([1, 2, 1, 1], dtype=np.float32)
        array([[ True,  True,  True,  True]])
    """
    # fmax(NaN, 0) is 0: missing and negative counts both become log(1) = 0.
    return np.log1p(np.fmax(np.asarray(counts, dtype=np.float64), 0.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# TSV writing


def _int_field_bytes(values: np.ndarray) -> np.ndarray:
    """(n, width) uint8: each integer right-aligned as decimal text, 0 bytes as padding (NaN: all 0)."""
    missing = np.isnan(values)
    v = np.where(missing, 0, values).astype(np.int64)
    q = np.abs(v)
    width = len(str(int(q.max(initial=0)))) + 1
    out = np.zeros((len(v), width), dtype=np.uint8)
    left = np.zeros(len(v), dtype=np.int64)  # column of the leading digit
    for p in range(width - 1):
        has_digit = (q > 0) | (p == 0)  # the number has a digit at position p
        q, digit = np.divmod(q, 10)
        col = width - 1 - p
        out[:, col] = np.where(has_digit, 48 + digit, 0)
        left = np.where(has_digit, col, left)
    rows = np.flatnonzero(v < 0)
    out[rows, left[rows] - 1] = ord("-")
    out[missing] = 0
    return out


# Two hex characters per byte value, in memory order: _HEX_PAIRS[b] viewed as bytes is "%02x" % b.
_HEX_PAIRS = np.frombuffer("".join(f"{b:02x}" for b in range(256)).encode(), dtype=np.uint16)


def _format_tsv(labels: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> bytes:
    n = len(labels)
    tab = np.full((n, 1), ord("\t"), dtype=np.uint8)
    pieces = [(48 + labels.astype(np.uint8)).reshape(n, 1)]
    for j in range(INT_FEATURE_COUNT):
        pieces += [tab, _int_field_bytes(counts[:, j])]
    id_bytes = ids.astype(">u4").view(np.uint8).reshape(n, CAT_FEATURE_COUNT, 4)
    hexed = np.empty((n, CAT_FEATURE_COUNT, 9), dtype=np.uint8)
    hexed[:, :, 0] = ord("\t")
    hexed[:, :, 1:] = _HEX_PAIRS[id_bytes].view(np.uint8).reshape(n, CAT_FEATURE_COUNT, 8)
    hexed[:, :, 1:][ids < 0] = 0
    pieces += [hexed.reshape(n, -1), np.full((n, 1), ord("\n"), dtype=np.uint8)]
    matrix = np.concatenate(pieces, axis=1)
    return matrix[matrix != 0].tobytes()


def write_criteo_tsv(
    path: PathLike, labels: np.ndarray, int_counts: np.ndarray, cat_ids: np.ndarray, *, chunk_rows: int = 1 << 16
) -> None:
    """Writes rows as a raw Criteo TSV file, atomically.

    ``labels`` are 0/1 (N,); ``int_counts`` (N, 13) are integral floats with NaN for missing
    (written as an empty field); ``cat_ids`` (N, 26) are ids in ``[0, 2**32)`` (written as 8
    lowercase hex digits) or ``-1`` (empty field).

    Example::

        s = make_synthetic_criteo(10_000)
        write_criteo_tsv("day_0.tsv", s.data.labels, s.raw_dense, s.data.sparse)
    """
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(int_counts, dtype=np.float64)
    ids = np.asarray(cat_ids, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, INT_FEATURE_COUNT) or ids.shape != (n, CAT_FEATURE_COUNT):
        raise ValueError(f"need int_counts ({n}, 13) and cat_ids ({n}, 26), got {counts.shape} and {ids.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    finite = counts[~np.isnan(counts)]
    if (finite != np.round(finite)).any() or (np.abs(finite) > 2**53).any():
        raise ValueError("int_counts must be integers of magnitude <= 2**53 (or NaN for missing)")
    if ((ids < -1) | (ids >= 1 << 32)).any():
        raise ValueError("cat_ids must lie in [0, 2**32) or be -1 (missing)")
    with atomic_write(path) as f:
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            f.write(_format_tsv(labels[rows], counts[rows], ids[rows]))


# ---------------------------------------------------------------------------------------------
# TSV reading


def _parse_lines(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Parses whole lines (``block`` ends with a newline) into labels, counts (NaN = missing), ids.

    Returns the good lines' (labels, counts, ids), the indices of the bad lines (sorted) and the
    reasons of the first :data:`MAX_REPORTED_LINES` of them.
    """
    buf = np.concatenate([block, np.zeros(8 * 3, dtype=np.uint8)])
    # Row i of `windows` is bytes i..i+7: one gather per field instead of one per byte.
    windows = sliding_window_view(buf, 8)
    ends = np.flatnonzero(block == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    has_cr = (ends > starts) & (np.take(buf, ends - 1) == ord("\r"))
    ends = ends - has_cr
    tabs = np.flatnonzero(block == ord("\t"))
    first_tab = np.searchsorted(tabs, starts)
    num_tabs = np.searchsorted(tabs, ends) - first_tab
    shaped = np.flatnonzero(num_tabs == NUM_FIELDS - 1)

    # Field f of a line spans (bounds[f], bounds[f + 1]) exclusive: bounds are its tabs, with a
    # virtual tab before the line and the line end after it.
    bounds = np.empty((len(shaped), NUM_FIELDS + 1), dtype=np.int64)
    bounds[:, 0] = starts[shaped] - 1
    bounds[:, 1:-1] = np.take(tabs, first_tab[shaped][:, None] + np.arange(NUM_FIELDS - 1))
    bounds[:, -1] = ends[shaped]
    fs = bounds[:, :-1] + 1
    flen = np.diff(bounds, axis=1) - 1
    bad = np.zeros(flen.shape, dtype=bool)

    label_char = np.take(buf, fs[:, 0])
    bad[:, 0] = (flen[:, 0] != 1) | ((label_char != ord("0")) & (label_char != ord("1")))
    labels = (label_char == ord("1")).astype(np.float32)

    # Dense: optional '-', then up to 18 decimal digits, read 8 bytes at a time (Horner's rule).
    dense = slice(1, 1 + INT_FEATURE_COUNT)
    s, length = fs[:, dense], flen[:, dense]
    neg = (length > 0) & (np.take(buf, s) == ord("-"))
    s, length = s + neg, length - neg
    bad_dense = (neg & (length == 0)) | (length > _MAX_DIGITS)
    value = np.zeros(s.shape, dtype=np.int64)
    max_length = min(int(length.max(initial=0)), _MAX_DIGITS)
    for w in range(0, max_length, 8):
        digits = windows[s + w] - np.uint8(ord("0"))  # non-digits wrap around to >= 10
        for k in range(min(8, max_length - w)):
            active = w + k < length
            bad_dense |= active & (digits[..., k] > 9)
            value = np.where(active, value * 10 + digits[..., k], value)
    counts = np.where(flen[:, dense] == 0, np.nan, np.where(neg, -value, value).astype(np.float64))
    bad[:, dense] = bad_dense

    # Categorical: exactly 8 hex digits, or empty. Decoded with uint8 arithmetic (a lookup table
    # would first widen every byte to a 64-bit index).
    cat = slice(1 + INT_FEATURE_COUNT, NUM_FIELDS)
    length = flen[:, cat]
    chars = windows[fs[:, cat]]
    digit = chars - np.uint8(ord("0"))
    letter = (chars | np.uint8(0x20)) - np.uint8(ord("a"))  # 'A'-'F' and 'a'-'f' -> 0..5
    is_digit = digit < 10
    nibbles = np.where(is_digit, digit, letter + np.uint8(10))
    invalid = ~(is_digit | (letter < 6))
    present = length == 8
    bad[:, cat] = ((length != 0) & ~present) | (present & (invalid.view(np.uint64)[..., 0] != 0))
    packed = np.ascontiguousarray((nibbles[:, :, 0::2] << 4) | nibbles[:, :, 1::2])
    ids = np.where(present, packed.view(">u4")[:, :, 0].astype(np.int64), -1)

    row_bad = bad.any(axis=1)
    bad_lines = np.sort(np.concatenate([np.flatnonzero(num_tabs != NUM_FIELDS - 1), shaped[row_bad]]))
    reasons = []
    names = ["label"] + INT_NAMES + CAT_NAMES
    for line in bad_lines[:MAX_REPORTED_LINES]:
        if num_tabs[line] != NUM_FIELDS - 1:
            reasons.append(f"expected {NUM_FIELDS} tab-separated fields, got {num_tabs[line] + 1}")
            continue
        row = int(np.searchsorted(shaped, line))
        col = int(np.argmax(bad[row]))
        text = block[fs[row, col] : fs[row, col] + flen[row, col]].tobytes().decode("utf-8", "replace")[:40]
        kind = "0 or 1" if col == 0 else "an integer" if col <= INT_FEATURE_COUNT else "an 8-digit hex id"
        reasons.append(f"field {col + 1} ({names[col]}): expected {kind}, got {text!r}")
    good = ~row_bad
    return labels[good], counts[good], ids[good], bad_lines, reasons


def _count_lines(path: Path, block_bytes: int) -> int:
    return sum(data.count(b"\n", 0, end) for data, end in line_blocks(path, block_bytes))


class CriteoTSV(StreamingSource):
    """Raw Criteo TSV files (compressed too: :func:`~lhf_torchrec.data.files.open_binary`) read as one
    stream of rows, in file order.

    Rows are lines: ``len``, ``slice`` and :func:`time_split` count lines, and with
    ``on_error="skip"`` a malformed line is dropped from its range (see :attr:`report`).

    Example::

        source = CriteoTSV([f"day_{d}" for d in range(24)], on_error="skip")
        train, val, test = time_split(source, (0.9, 0.05, 0.05))
        for batch in train.batches(2048, rank=rank, world_size=world_size):
            ...
        print(train.report)  # lines read and skipped by this source's last pass
    """

    def __init__(
        self, paths: PathLike | Sequence[PathLike], *, on_error: OnError = "raise", block_bytes: int = 16 << 20
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("CriteoTSV needs at least one file")
        self.paths = [check_readable(p) for p in paths]
        self.on_error = on_error
        self.block_bytes = block_bytes
        self.dense_names = list(INT_NAMES)
        self.sparse_names = list(CAT_NAMES)
        self.multi_valued = {}
        self.report = ParseReport()
        self._line_counts: list[int] | None = None

    def __repr__(self) -> str:
        return f"CriteoTSV({[str(p) for p in self.paths]}, rows={self._range})"

    def line_counts(self) -> list[int]:
        """Lines per file (counted once, then cached)."""
        if self._line_counts is None:
            self._line_counts = [_count_lines(p, self.block_bytes) for p in self.paths]
        return self._line_counts

    def _total_rows(self) -> int:
        return sum(self.line_counts())

    def _read(self, start: int, stop: int) -> Iterator[CTRData]:
        report = self.report = ParseReport()
        offset = 0
        for i, path in enumerate(self.paths):
            if offset >= stop:
                break
            if self._line_counts is not None and offset + self._line_counts[i] <= start:
                offset += self._line_counts[i]
                continue
            line = 0
            for data, end in line_blocks(path, self.block_bytes):
                num_lines = data.count(b"\n", 0, end)
                lo, hi = max(start - offset - line, 0), min(stop - offset - line, num_lines)
                if lo < hi:
                    buf = np.frombuffer(data, dtype=np.uint8, count=end)
                    if (lo, hi) != (0, num_lines):  # the block straddles the range: cut whole lines
                        ends = np.flatnonzero(buf == ord("\n"))
                        buf = buf[ends[lo - 1] + 1 if lo else 0 : ends[hi - 1] + 1]
                    yield from self._parse(buf, path, line + lo, report)
                line += num_lines
                if offset + line >= stop:
                    break
            offset += line
        self._log_skipped(report, start, stop)

    def _parse(self, buf: np.ndarray, path: Path, first_line: int, report: ParseReport) -> Iterator[CTRData]:
        labels, counts, ids, bad_lines, reasons = _parse_lines(buf)
        report.lines_read += len(labels) + len(bad_lines)
        if len(bad_lines) and self.on_error == "raise":
            raise DataFormatError(path, first_line + int(bad_lines[0]) + 1, reasons[0])
        report.add_bad_lines(path, first_line + 1 + bad_lines, reasons)
        if len(labels):
            yield CTRData(criteo_dense_transform(counts), ids, labels, self.dense_names, self.sparse_names)


def read_criteo_tsv(paths: PathLike | Sequence[PathLike], *, on_error: OnError = "raise") -> CTRData:
    """All rows of raw Criteo TSV files in memory; see :class:`CriteoTSV`.

    Example::

        data = read_criteo_tsv("train.txt")
    """
    return CriteoTSV(paths, on_error=on_error).load()


# ---------------------------------------------------------------------------------------------
# TorchRec npy day files


def criteo_npy_paths(directory: PathLike, day: int) -> tuple[Path, Path, Path]:
    """(dense, sparse, labels) paths of one day, named as TorchRec's preprocessing names them."""
    d = Path(directory)
    return d / f"day_{day}_dense.npy", d / f"day_{day}_sparse.npy", d / f"day_{day}_labels.npy"


def write_criteo_npy_days(directory: PathLike, data: CTRData, num_days: int = 1) -> list[tuple[Path, Path, Path]]:
    """Writes ``data`` as TorchRec npy day files ``day_0 .. day_{num_days-1}``, atomically.

    Rows are cut into ``num_days`` contiguous, near-equal days. ``data`` must have Criteo's 13
    dense and 26 single-valued sparse columns and 0/1 labels.

    Example::

        paths = write_criteo_npy_days("criteo_npy", make_synthetic_criteo(100_000).data, num_days=2)
    """
    if data.dense.shape[1] != INT_FEATURE_COUNT or data.sparse.shape[1] != CAT_FEATURE_COUNT or data.multi_valued:
        raise ValueError("npy day files need 13 dense and 26 single-valued sparse columns")
    if not np.isin(data.labels, (0, 1)).all():
        raise ValueError("npy day files need 0/1 labels")
    if not 1 <= num_days <= max(len(data), 1):
        raise ValueError(f"num_days must be in [1, {max(len(data), 1)}], got {num_days}")
    Path(directory).mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(data), num_days + 1).round().astype(int)
    written = []
    for day in range(num_days):
        part = data.slice(cuts[day], cuts[day + 1])
        paths = criteo_npy_paths(directory, day)
        arrays = (part.dense, part.sparse, part.labels.astype(np.int32).reshape(-1, 1))
        for path, array in zip(paths, arrays):
            with atomic_write(path) as f:
                np.save(f, array)
        written.append(paths)
    return written


class CriteoNpyDays(StreamingSource):
    """TorchRec's preprocessed Criteo npy day files, read in chunks through memory maps.

    ``days`` selects ``day_{i}`` files of ``directory`` in that order (default: all, by day).
    Numpy reads the files directly: TorchRec's own npy helpers need iopath, an optional
    dependency.

    Example::

        source = CriteoNpyDays("criteo_npy", days=range(23))
        for batch in source.batches(2048, rank=rank, world_size=world_size):
            ...
    """

    def __init__(self, directory: PathLike, days: Sequence[int] | None = None, *, chunk_rows: int = 1 << 18) -> None:
        super().__init__()
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory")
        if days is None:
            days = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _DAY_FILE.match(p.name)))
        if not days:
            raise FileNotFoundError(f"{directory}: no day_*_dense.npy files")
        self.paths = [criteo_npy_paths(directory, d) for d in days]
        self.rows_per_day: list[int] = []
        for paths in self.paths:
            shapes = [open_npy(p).shape for p in paths]
            n = shapes[0][0] if shapes[0] else 0
            expected = [(n, INT_FEATURE_COUNT), (n, CAT_FEATURE_COUNT), (n, 1)]
            if shapes != expected:
                raise DataFormatError(
                    paths[0].parent, None, f"{paths[0].name} and siblings have shapes {shapes}, expected {expected}"
                )
            self.rows_per_day.append(n)
        self.chunk_rows = chunk_rows
        self.dense_names = list(INT_NAMES)
        self.sparse_names = list(CAT_NAMES)
        self.multi_valued = {}

    def __repr__(self) -> str:
        return f"CriteoNpyDays({self.paths[0][0].parent}, days={len(self.paths)}, rows={self._range})"

    def _total_rows(self) -> int:
        return sum(self.rows_per_day)

    def _read(self, start: int, stop: int) -> Iterator[CTRData]:
        offset = 0
        for paths, n in zip(self.paths, self.rows_per_day):
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                dense, sparse, labels = (open_npy(p) for p in paths)
                for a in range(lo, hi, self.chunk_rows):
                    rows = slice(a, min(a + self.chunk_rows, hi))
                    yield CTRData(dense[rows], sparse[rows], labels[rows, 0], self.dense_names, self.sparse_names)
            offset += n
