"""Generic CSV/TSV files with a column spec: one label column, dense columns, categorical columns.

Values:

* label: a number in [0, 1];
* dense: a float; an empty field is 0.0. The spec's ``transforms`` apply, per column and in this
  order, ``log1p`` (``log(1 + max(x, 0))``, the Criteo reader's transform of counts: negative values
  count as 0) and ``standardize`` (``(x - mean) / std`` with the mean and standard deviation of the
  *training* rows, see :meth:`CSVSource.fit_standardization`, so validation and test rows are
  transformed exactly as the training rows were);
* categorical: an empty field is missing (``-1``, an empty bag). A canonical non-negative decimal
  integer below 2**63 (``0``, ``42``, not ``007`` or ``-3``) is kept as its id, so integer-coded
  columns keep their dense id space; any other string ``s`` gets :func:`categorical_id`, the first
  63 bits of ``blake2b(s, key=b"lhf_torchrec")``: stable across runs, hosts and Python versions.

Table sizes come from the data (:meth:`CSVSource.table_sizes`): an integer-coded column whose ids
fill at least half of ``[0, max id]`` gets a table of ``max id + 1`` rows; any other column
(strings, hashes, sparse or large integers) a vocabulary-sized table, one row per distinct id and
one for ids never seen. No table is ever sized from the 2**63 hash space.

Records are parsed with Python's ``csv`` module (quoting and embedded newlines work); ``len``,
``slice`` and :func:`time_split` count records, not physical lines.
"""

import csv
import hashlib
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

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
DENSE_TRANSFORMS = ("log1p", "standardize")  # in the order they apply
# An integer column's table is its id space [0, max id] when at least this share of it occurs;
# sparser columns get a vocabulary instead (a table of 2**40 rows for 1,000 ids helps no one).
_MIN_ID_SPACE_OCCUPANCY = 0.5
_UNIQUE_MERGE_IDS = 1 << 22  # distinct-id counting merges its per-chunk arrays at this many ids


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

    ``transforms`` maps a dense column to ``"log1p"``, ``"standardize"`` or both (a list, in that
    order); ``name`` names the dataset in reports (default: the file's name).

    Example::

        spec = CSVSpec(label="clicked", dense=["price"], categorical=["user", "ad"], delimiter="\\t")
        spec = CSVSpec(label="y", categorical=["a"], header=False, column_names=["y", "a", "note"])
        spec = CSVSpec(label="y", dense=["views", "age"], categorical=["user"],
                       transforms={"views": ["log1p", "standardize"], "age": "standardize"}, name="shop")
    """

    label: str
    dense: Sequence[str] = ()
    categorical: Sequence[str] = ()
    delimiter: str = ","
    header: bool = True
    column_names: Sequence[str] | None = None
    transforms: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    name: str | None = None
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
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "transforms", self._checked_transforms())
        object.__setattr__(self, "_used", used)

    def _checked_transforms(self) -> dict[str, tuple[str, ...]]:
        if not isinstance(self.transforms, Mapping):
            raise ValueError(f"transforms must map dense columns to transforms, got {self.transforms!r}")
        out = {}
        for column, steps in self.transforms.items():
            if column not in self.dense:
                raise ValueError(f"transforms: {column!r} is not a dense column (dense: {list(self.dense)})")
            steps = (steps,) if isinstance(steps, str) else tuple(steps)
            unknown = [s for s in steps if s not in DENSE_TRANSFORMS]
            if unknown or not steps:
                raise ValueError(f"transforms of {column!r}: {list(steps)}; choose from {list(DENSE_TRANSFORMS)}")
            if list(steps) != sorted(set(steps), key=DENSE_TRANSFORMS.index):
                raise ValueError(f"transforms of {column!r}: {list(steps)}; each at most once, in the order "
                                 f"{list(DENSE_TRANSFORMS)}")
            out[column] = steps
        return out

    @property
    def standardized(self) -> list[str]:
        """The dense columns with a ``standardize`` transform."""
        return [c for c in self.dense if "standardize" in self.transforms.get(c, ())]

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
        # (mean, std) per dense column for the standardize transforms; identity where none applies.
        self._standardization: tuple[np.ndarray, np.ndarray] | None = None if spec.standardized else _identity(spec)

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

    def fit_standardization(self, start: int, stop: int) -> None:
        """Fits the ``standardize`` transforms on rows ``[start, stop)`` of this source (the training
        rows): their mean and standard deviation, after ``log1p`` where declared, are kept and used for
        every row this source reads afterwards, and by the slices taken from it afterwards.

        A constant column keeps a standard deviation of 1 (it is centred only).

        Example::

            source = CSVSource("clicks.csv", spec)
            source.fit_standardization(*split_bounds(len(source))[0])
            train, val, test = time_split(source)    # all three standardized with the train statistics
        """
        rows = self.slice(start, stop)
        rows._standardization = _identity(self.spec)
        count, mean, m2 = 0, np.zeros(len(self.spec.dense)), np.zeros(len(self.spec.dense))
        for chunk in rows.chunks(_BLOCK_ROWS):
            # Chan et al.'s pairwise update: stable for large counts, one pass.
            n = len(chunk)
            x = chunk.dense.astype(np.float64)
            chunk_mean = x.mean(axis=0)
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + ((x - chunk_mean) ** 2).sum(axis=0) + delta**2 * (count * n / total)
            count = total
        if count == 0:
            raise ValueError(f"{self!r}: no rows in [{start}, {stop}) to fit the standardize transforms on")
        std = np.sqrt(m2 / count)
        constant = std <= 1e-9 * np.fmax(np.abs(mean), 1.0)  # rounding leaves a constant column a tiny std
        identity_mean, identity_std = _identity(self.spec)
        standardized = np.array([c in self.spec.standardized for c in self.spec.dense], dtype=bool)
        self._standardization = (
            np.where(standardized, mean, identity_mean),
            np.where(standardized & ~constant, std, identity_std),
        )

    @property
    def standardization(self) -> dict[str, tuple[float, float]]:
        """(mean, std) of each standardized dense column, once fitted (see :meth:`fit_standardization`)."""
        if self._standardization is None:
            return {}
        mean, std = self._standardization
        standardized = self.spec.standardized
        return {c: (float(mean[k]), float(std[k])) for k, c in enumerate(self.spec.dense) if c in standardized}

    def table_sizes(self) -> list[int]:
        """Rows of each categorical column's full-size table, from one pass over this source's rows.

        ``max id + 1`` when the column's ids fill at least half of ``[0, max id]`` (an integer-coded
        column), else ``distinct ids + 1``: a vocabulary of the ids seen and one row for any other
        (strings, hashes, sparse or large integers). A column without any value gets one row.
        """
        num_columns = len(self.spec.categorical)
        seen: list[list[np.ndarray]] = [[] for _ in range(num_columns)]
        pending = [0] * num_columns
        for chunk in self.chunks(_BLOCK_ROWS):
            for j in range(num_columns):
                ids = chunk.sparse[:, j]
                seen[j].append(np.unique(ids[ids >= 0]))
                pending[j] += len(seen[j][-1])
                if pending[j] > _UNIQUE_MERGE_IDS:
                    seen[j] = [np.unique(np.concatenate(seen[j]))]
                    pending[j] = len(seen[j][0])
        sizes = []
        for parts in seen:
            ids = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            if len(ids) == 0:
                sizes.append(1)
            elif int(ids[-1]) + 1 <= len(ids) / _MIN_ID_SPACE_OCCUPANCY:
                sizes.append(int(ids[-1]) + 1)
            else:
                sizes.append(len(ids) + 1)
        return sizes

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
        dense = self._transform(dense)
        sparse = np.empty((n, len(caches)), dtype=np.int64)
        for j, (cache, v) in enumerate(zip(caches, values[1 + num_dense :])):
            new = set(v).difference(cache)
            if len(cache) + len(new) > _MAX_CACHED_IDS:
                cache.clear()
                new = set(v)
            cache.update((text, categorical_id(text)) for text in new)
            sparse[:, j] = np.fromiter(map(cache.__getitem__, v), dtype=np.int64, count=n)
        return CTRData(dense, sparse, labels, self.dense_names, self.sparse_names)

    def _transform(self, dense: np.ndarray) -> np.ndarray:
        """The spec's dense transforms, column by column (see the module docstring)."""
        if self._standardization is None:
            raise ValueError(f"{self!r}: columns {self.spec.standardized} are to be standardized; call "
                             "fit_standardization on the training rows before reading")
        for k, column in enumerate(self.spec.dense):
            if "log1p" in self.spec.transforms.get(column, ()):
                dense[:, k] = np.log1p(np.fmax(dense[:, k], 0.0))
        mean, std = self._standardization
        return (dense - mean) / std

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


def _identity(spec: CSVSpec) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(spec.dense)), np.ones(len(spec.dense))


def read_csv(paths: PathLike | Sequence[PathLike], spec: CSVSpec, *, on_error: OnError = "raise") -> CTRData:
    """All records of CSV/TSV files in memory; see :class:`CSVSource`. Columns to ``standardize``
    are standardized with the statistics of all these records (for a train / validation / test
    split, fit on the training rows with :meth:`CSVSource.fit_standardization` instead).

    Example::

        data = read_csv("clicks.tsv", CSVSpec(label="y", dense=["x"], categorical=["u"], delimiter="\\t"))
    """
    source = CSVSource(paths, spec, on_error=on_error)
    if spec.standardized:
        source.fit_standardization(0, len(source))
    return source.load()
