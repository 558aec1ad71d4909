"""Generic CSV/TSV files with a column spec: one label column, dense columns, categorical columns.

Values:

* label: a number in [0, 1];
* dense: a float; an empty field is 0.0 (no transform is applied);
* categorical: an empty field is missing (``-1``, an empty bag). A canonical non-negative decimal
  integer below 2**63 (``0``, ``42``, not ``007`` or ``-3``) is kept as its id, so integer-coded
  columns keep their dense id space; any other string ``s`` gets :func:`categorical_id`, the first
  63 bits of ``blake2b(s, key=b"lhf_torchrec")``: stable across runs, hosts and Python versions.

Records are parsed with Python's ``csv`` module (quoting and embedded newlines work); ``len``,
``slice`` and :func:`time_split` count records, not physical lines.
"""

import csv
import hashlib
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from lhf_torchrec.data.ctr_data import CTRData
from lhf_torchrec.data.files import (
    DataFormatError,
    OnError,
    ParseReport,
    PathLike,
    check_on_error,
    check_readable,
)
from lhf_torchrec.data.source import StreamingSource

_HASH_KEY = b"lhf_torchrec"
_MAX_ID = (1 << 63) - 1
_BLOCK_ROWS = 1 << 16
_MAX_CACHED_IDS = 1 << 20  # per column: bounds memory on huge vocabularies


def categorical_id(value: str) -> int:
    """The int64 id of a categorical string (see the module docstring; ``""`` is -1).

    Example::

        >>> categorical_id("42"), categorical_id(""), categorical_id("red") == categorical_id("red")
        (42, -1, True)
    """
    if not value:
        return -1
    if value.isascii() and value.isdigit() and (value[0] != "0" or value == "0") and int(value) <= _MAX_ID:
        return int(value)
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, key=_HASH_KEY).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class CSVSpec:
    """Which columns are what. With ``header=False`` name all columns in ``column_names``.

    Example::

        spec = CSVSpec(label="clicked", dense=["price"], categorical=["user", "ad"], delimiter="\\t")
        spec = CSVSpec(label="y", categorical=["a"], header=False, column_names=["y", "a", "note"])
    """

    label: str
    dense: Sequence[str] = ()
    categorical: Sequence[str] = ()
    delimiter: str = ","
    header: bool = True
    column_names: Sequence[str] | None = None
    _used: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("dense", "categorical", "column_names"):
            if isinstance(getattr(self, key), str):  # a string would be read as one column per character
                raise ValueError(f"{key} must be a list of column names, got the string {getattr(self, key)!r}")
        used = (self.label, *self.dense, *self.categorical)
        duplicates = sorted({c for c in used if used.count(c) > 1})
        if duplicates:
            raise ValueError(f"columns used twice in CSVSpec: {duplicates}")
        if not self.categorical:
            raise ValueError("CSVSpec needs at least one categorical column")
        if len(self.delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {self.delimiter!r}")
        if self.header == (self.column_names is not None):
            raise ValueError("give column_names exactly when the file has no header (header=False)")
        object.__setattr__(self, "_used", used)

    def column_indices(self, names: Sequence[str], path: PathLike) -> list[int]:
        """Positions of label, dense and categorical columns (in that order) among ``names``."""
        missing = [c for c in self._used if c not in names]
        if missing:
            raise DataFormatError(path, 1 if self.header else None, f"columns {missing} not found among {list(names)}")
        return [list(names).index(c) for c in self._used]


class CSVSource(StreamingSource):
    """CSV/TSV files with the same columns, read as one stream of records, in file order.

    Example::

        spec = CSVSpec(label="click", dense=["hour"], categorical=["site", "app"])
        train, val, test = time_split(CSVSource(["day1.csv", "day2.csv"], spec))
        data = train.load()
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], spec: CSVSpec, *, on_error: OnError = "raise") -> None:
        super().__init__()
        check_on_error(on_error)
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("CSVSource needs at least one file")
        self.paths = [check_readable(p) for p in paths]
        self.spec = spec
        self.on_error = on_error
        self.dense_names = list(spec.dense)
        self.sparse_names = list(spec.categorical)
        self.multi_valued = {}
        self.report = ParseReport()
        self._record_counts: list[int] | None = None

    def __repr__(self) -> str:
        return f"CSVSource({[str(p) for p in self.paths]}, rows={self._range})"

    def _records(self, path: Path) -> Iterator[tuple[int, list[str], list[int]]]:
        """(line number, fields, used column positions) of each non-blank data record of ``path``."""
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=self.spec.delimiter)
            try:
                if self.spec.header:
                    names = next(reader, None)
                    if names is None:
                        raise DataFormatError(path, 1, "empty file, expected a header line")
                else:
                    names = list(self.spec.column_names or ())
                columns = self.spec.column_indices(names, path) + [len(names)]
                for fields in reader:
                    if fields:
                        yield reader.line_num, fields, columns
            except UnicodeDecodeError as e:
                raise DataFormatError(path, None, f"not UTF-8 text after line {reader.line_num}: {e}") from e
            except csv.Error as e:
                raise DataFormatError(path, reader.line_num, str(e)) from e

    def record_counts(self) -> list[int]:
        """Data records per file (counted once, then cached)."""
        if self._record_counts is None:
            self._record_counts = [sum(1 for _ in self._records(p)) for p in self.paths]
        return self._record_counts

    def _total_rows(self) -> int:
        return sum(self.record_counts())

    def _read(self, start: int, stop: int) -> Iterator[CTRData]:
        report = self.report = ParseReport()
        caches: list[dict[str, int]] = [{} for _ in self.spec.categorical]
        offset = 0
        for i, path in enumerate(self.paths):
            if offset >= stop:
                break
            if self._record_counts is not None and offset + self._record_counts[i] <= start:
                offset += self._record_counts[i]
                continue
            lines: list[int] = []
            records: list[list[str]] = []
            for line, fields, columns in self._records(path):
                if offset >= stop:
                    break
                if offset >= start:
                    lines.append(line)
                    records.append(fields)
                    if len(records) == _BLOCK_ROWS:
                        yield from self._convert_block(path, lines, records, columns, caches, report)
                        lines, records = [], []
                offset += 1
            if records:
                yield from self._convert_block(path, lines, records, columns, caches, report)
        report.log()

    def _convert_block(
        self,
        path: Path,
        lines: list[int],
        records: list[list[str]],
        columns: list[int],
        caches: list[dict[str, int]],
        report: ParseReport,
    ) -> Iterator[CTRData]:
        """Converts a block of records column by column; looks for the culprits record by record
        only when the block holds a malformed one."""
        report.lines_read += len(records)
        data = self._convert(records, columns, caches)
        if data is None:
            good = []
            for line, fields in zip(lines, records):
                reason = self._problem(fields, columns)
                if reason is None:
                    good.append(fields)
                elif self.on_error == "raise":
                    raise DataFormatError(path, line, reason)
                else:
                    report.add_bad_lines(path, [line], [reason])
            data = self._convert(good, columns, caches) if good else None
        if data is not None:
            yield data

    def _convert(self, records: list[list[str]], columns: list[int], caches: list[dict[str, int]]) -> CTRData | None:
        """The records as CTRData, or None if one of them is malformed (see :meth:`_problem`)."""
        n = len(records)
        if any(len(fields) != columns[-1] for fields in records):
            return None
        values = list(zip(*map(operator.itemgetter(*columns[:-1]), records)))
        num_dense = len(self.spec.dense)
        dense = np.empty((n, num_dense))
        try:
            labels = np.fromiter(map(float, values[0]), dtype=np.float64, count=n)
            for k, v in enumerate(values[1 : 1 + num_dense]):
                dense[:, k] = np.fromiter(map(float, [t or "0" for t in v]), dtype=np.float64, count=n)
        except ValueError:
            return None
        if not (np.isfinite(dense).all() and ((labels >= 0) & (labels <= 1)).all()):
            return None
        sparse = np.empty((n, len(caches)), dtype=np.int64)
        for j, (cache, v) in enumerate(zip(caches, values[1 + num_dense :])):
            new = set(v).difference(cache)
            if len(cache) + len(new) > _MAX_CACHED_IDS:
                cache.clear()
                new = set(v)
            cache.update((text, categorical_id(text)) for text in new)
            sparse[:, j] = np.fromiter(map(cache.__getitem__, v), dtype=np.int64, count=n)
        return CTRData(dense, sparse, labels, self.dense_names, self.sparse_names)

    def _problem(self, fields: list[str], columns: list[int]) -> str | None:
        """Why one record is malformed, or None. ``columns``: used positions, then the field count."""
        if len(fields) != columns[-1]:
            return f"expected {columns[-1]} fields, got {len(fields)}"
        names = (self.spec.label, *self.spec.dense)
        for name, c in zip(names, columns):
            text = fields[c]
            try:
                x = float(text or ("0" if name != self.spec.label else text))
            except ValueError:
                return f"column {name!r}: expected a number, got {text[:40]!r}"
            if not math.isfinite(x):
                return f"column {name!r}: expected a finite number, got {text[:40]!r}"
            if name == self.spec.label and not 0.0 <= x <= 1.0:
                return f"column {name!r}: label must lie in [0, 1], got {text[:40]!r}"
        return None


def read_csv(paths: PathLike | Sequence[PathLike], spec: CSVSpec, *, on_error: OnError = "raise") -> CTRData:
    """All records of CSV/TSV files in memory; see :class:`CSVSource`.

    Example::

        data = read_csv("clicks.tsv", CSVSpec(label="y", dense=["x"], categorical=["u"], delimiter="\\t"))
    """
    return CSVSource(paths, spec, on_error=on_error).load()
