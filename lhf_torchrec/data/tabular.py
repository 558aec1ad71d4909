"""Generic CSV/TSV files with a column spec: one label column, dense columns, categorical columns.

Values:

* label: a number in [0, 1]; with the spec's ``label_threshold`` any finite number, 1 from the
  threshold on and 0 below it (a rating log: ``label_threshold=4`` makes 4 and 5 stars positives);
  with its ``positive_labels`` any non-empty text, 1 for those texts (an event log: ``["buy"]``);
* dense: a float; an empty field is 0.0; a value beyond float32's range (the model's dense inputs) is
  malformed unless its column has ``log1p``. The spec's ``transforms`` apply, per column and in this
  order, ``log1p`` (``log(1 + max(x, 0))``, the Criteo reader's transform of counts: negative values
  count as 0) and ``standardize`` (``(x - mean) / std`` with the mean and standard deviation of the
  *training* rows, see :meth:`CSVSource.fit_standardization`, so validation and test rows are
  transformed exactly as the training rows were);
* categorical: an empty field is missing (``-1``, an empty bag). A canonical non-negative decimal
  integer below 2**63 (``0``, ``42``, not ``007`` or ``-3``) is kept as its id, so integer-coded
  columns keep their dense id space; any other string ``s`` gets :func:`categorical_id`, the first
  63 bits of ``blake2b(s, key=b"lhf_torchrec")``: stable across runs, hosts and Python versions.
  A column in the spec's ``multi_valued`` holds a bag of such values joined by its ``separator``
  (``Comedy|Drama``), at most its ``max_values`` (a record with more is malformed); it is one
  multi-valued feature, read as ``max_values`` sparse columns ``name[0]``, ``name[1]``, ... padded
  with ``-1`` (:class:`~lhf_torchrec.data.CTRData`'s ``multi_valued``); empty items are dropped.

Table sizes come from the data (:meth:`CSVSource.table_sizes`): an integer-coded column whose ids
fill at least half of ``[0, max id]`` gets a table of ``max id + 1`` rows; any other column
(strings, hashes, sparse or large integers) a vocabulary-sized table, one row per distinct id and
one for ids never seen. No table is ever sized from the 2**63 hash space.

Records follow the ``csv`` module's rules (quoting and embedded newlines work); ``len``, ``slice`` and
:func:`time_split` count records, not physical lines. They come in the files' order, or with the
spec's ``order_by`` (a column of numbers or ISO 8601 dates and times) in time order: the parse cache
(below) then stores them sorted by that column, so a log sorted by user still splits by time. Files
ending in ``.gz``, ``.bz2``, ``.xz`` and ``.zip`` archives of one file are decompressed on the fly
(:func:`~lhf_torchrec.data.files.open_binary`). Text is read in blocks of a few MiB: a block
without quotes, NUL bytes or lone carriage returns (most CTR logs) is cut into lines and split on the
delimiter with ``str`` methods, column by column;
from the first block that has any, to the end of the file, the ``csv`` module reads the records
(same records, slower). A delimiter of several characters (MovieLens' ``::``) has no quoting: every
block is cut and split as plain text, quotes included.

Parsing text is the slow part (tens of thousands of records a second on one core), and training reads
the data many times (profiles, table sizes, every epoch of every run). :meth:`CSVSource.cache` parses
every record once into a *parse cache*: npy arrays of the labels, the dense values before their
transforms, the categorical ids and which records were well-formed, under
``<cache>/csv/<key>/`` (the cache root of :func:`~lhf_torchrec.data.files.resolve_cache_dir`:
``$LHF_CACHE_DIR``, else ``~/.cache/lhf_torchrec``). Later passes, and later runs on the same files
with the same columns, read those arrays through memory maps instead of the text. The key covers the
files (path, size, modification time) and the spec's columns, so an edited file is parsed again;
each array's sha256 is checked when the cache is opened. It takes 9 + 8 x (dense + sparse columns)
bytes a record on disk (delete the folder to reclaim it). The blocks of text are converted by the
worker processes of a ``torch.utils.data.DataLoader`` (one per core, at most 8): the one pass over
the text scales with the cores of the machine.
"""

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import operator
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from itertools import chain, compress
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from lhf_torchrec.data.ctr_data import CTRData, feature_columns
from lhf_torchrec.data.files import (
    COMPRESSION_ERRORS,
    MAX_REPORTED_LINES,
    DataFormatError,
    OnError,
    ParseReport,
    PathLike,
    check_on_error,
    check_readable,
    corrupt_compressed_file,
    file_sha256,
    is_damaged_compressed,
    line_blocks,
    open_binary,
    open_npy,
    resolve_cache_dir,
)
from lhf_torchrec.data.source import StreamingSource
from lhf_torchrec.files import atomic_write

logger = logging.getLogger(__name__)

_HASH_KEY = b"lhf_torchrec"
_KEYED_HASH = hashlib.blake2b(digest_size=8, key=_HASH_KEY)  # copied per string: cheaper than keying anew
_MAX_ID = (1 << 63) - 1
_BLOCK_ROWS = 1 << 16
_BLOCK_BYTES = 1 << 23  # text read at once (whole lines): ~30k Criteo-shaped records
_BOM = b"\xef\xbb\xbf"
_MAX_PARSE_WORKERS = min(8, os.cpu_count() or 1)  # the parse cache's default: text conversion is CPU-bound
_MAX_CACHED_IDS = 1 << 20  # per column: bounds memory on huge vocabularies
_WAIT_POLL_S = 0.5  # how often a process that does not build the parse cache looks for it
_MAX_BAG = 1024  # max_values of a multi-valued column: each value takes a sparse column of its own
DENSE_TRANSFORMS = ("log1p", "standardize")  # in the order they apply
# An integer column's table is its id space [0, max id] when at least this share of it occurs;
# sparser columns get a vocabulary instead (a table of 2**40 rows for 1,000 ids helps no one).
_MIN_ID_SPACE_OCCUPANCY = 0.5
# Texts that usually mark a missing value: a number error on one of them points to the spec's missing_values.
_MISSING_MARKERS = frozenset({"na", "n/a", "nan", "null", "none", "\\n", "-", "?"})
_UNIQUE_MERGE_IDS = 1 << 22  # distinct-id counting merges its per-chunk arrays at this many ids
_CACHE_FORMAT = "lhf_torchrec.csv_parse_cache"
_CACHE_VERSION = 2  # 2: dense values beyond float32 (without log1p) are malformed
# The largest dense value the model takes (its dense inputs are float32): beyond, a value is infinite there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CACHE_ARRAYS = ("labels", "dense", "sparse", "valid")


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
    keyed = _KEYED_HASH.copy()
    keyed.update(value.encode("utf-8"))
    return int.from_bytes(keyed.digest(), "big") >> 1


@dataclass(frozen=True)
class CSVSpec:
    """Which columns are what. With ``header=False`` name all columns in ``column_names``.

    ``delimiter`` separates the fields: one character (``","``, ``"\\t"``), read by the ``csv`` module's
    rules (quoted fields), or several (``"::"``, MovieLens' ``.dat`` files), read as plain text: a field
    is what lies between two delimiters, quotes are part of it, and nothing can be quoted.
    ``transforms`` maps a dense column to ``"log1p"``, ``"standardize"`` or both (a list, in that
    order); ``multi_valued`` maps a categorical column holding bags of ids to its ``separator`` and
    ``max_values``; ``label_threshold`` turns a numeric label (a rating) into a click, 1 from that value
    on, ``positive_labels`` a label of text (an event type) into one, 1 for those texts; ``order_by``
    names a column of times (numbers or ISO 8601 dates) that orders the records for the time split,
    for files not written in time order; ``missing_values`` lists texts that mark a missing dense or
    categorical value (``"NA"``, ``"\\N"``), read as an empty field; ``encoding`` is the files' text
    encoding (one that writes ASCII as ASCII); ``name`` names the dataset in reports (default: the file's name).

    Example::

        spec = CSVSpec(label="clicked", dense=["price"], categorical=["user", "ad"], delimiter="\\t")
        spec = CSVSpec(label="y", categorical=["a"], header=False, column_names=["y", "a", "note"])
        spec = CSVSpec(label="y", dense=["views", "age"], categorical=["user"],
                       transforms={"views": ["log1p", "standardize"], "age": "standardize"}, name="shop")
        spec = CSVSpec(label="y", categorical=["user", "genres"],
                       multi_valued={"genres": {"separator": "|", "max_values": 6}})
        spec = CSVSpec(label="behavior", categorical=["user", "item"], positive_labels=["buy", "cart"],
                       order_by="timestamp")
        spec = CSVSpec(label="rating", categorical=["user", "movie"], delimiter="::", header=False,
                       column_names=["user", "movie", "rating", "time"], label_threshold=4, order_by="time")
    """

    label: str
    dense: Sequence[str] = ()
    categorical: Sequence[str] = ()
    delimiter: str = ","
    header: bool = True
    column_names: Sequence[str] | None = None
    transforms: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    multi_valued: Mapping[str, Mapping[str, str | int]] = field(default_factory=dict)
    label_threshold: float | None = None
    positive_labels: Sequence[str] | None = None
    order_by: str | None = None
    missing_values: Sequence[str] = ()
    encoding: str = "utf-8"
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
        if not isinstance(self.delimiter, str) or not self.delimiter or any(c in self.delimiter for c in '"\n\r'):
            raise ValueError(f"delimiter must be one or more characters other than a quote or a line end, got "
                             f"{self.delimiter!r}")
        if self.header == (self.column_names is not None):
            raise ValueError("give column_names exactly when the file has no header (header=False)")
        if self.label_threshold is not None and (isinstance(self.label_threshold, bool) or not isinstance(
                self.label_threshold, (int, float)) or not math.isfinite(self.label_threshold)):
            raise ValueError(f"label_threshold must be a finite number, got {self.label_threshold!r}")
        if self.positive_labels is not None:
            if isinstance(self.positive_labels, str) or not all(
                    isinstance(t, str) and t for t in self.positive_labels) or not self.positive_labels:
                raise ValueError(f"positive_labels must be a list of label texts (e.g. [\"buy\"]), got "
                                 f"{self.positive_labels!r}")
            if self.label_threshold is not None:
                raise ValueError("give label_threshold (numeric labels) or positive_labels (labels of text), not both")
            object.__setattr__(self, "positive_labels", tuple(self.positive_labels))
        if self.order_by is not None and (not isinstance(self.order_by, str) or not self.order_by):
            raise ValueError(f"order_by must name a column, got {self.order_by!r}")
        if isinstance(self.missing_values, str) or not all(isinstance(t, str) and t for t in self.missing_values):
            raise ValueError(f"missing_values must be a list of texts that mark a missing value (e.g. [\"NA\", "
                             f"\"\\\\N\"]), got {self.missing_values!r}")
        object.__setattr__(self, "missing_values", frozenset(self.missing_values))
        self._check_encoding()
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "transforms", self._checked_transforms())
        object.__setattr__(self, "multi_valued", self._checked_multi_valued())
        object.__setattr__(self, "_used", used)

    def _check_encoding(self) -> None:
        """The text is cut into lines and fields as bytes: the encoding must write ASCII as ASCII."""
        ascii_text = f'\n\r"{self.delimiter}0aZ'
        try:
            compatible = codecs.lookup(self.encoding) and ascii_text.encode(self.encoding) == ascii_text.encode()
        except (LookupError, TypeError, UnicodeEncodeError):
            compatible = False
        if not compatible:
            raise ValueError(f"encoding must be a text encoding that writes ASCII as ASCII (utf-8, latin-1, cp1252, "
                             f"...), got {self.encoding!r} (convert UTF-16 files first: iconv -f utf-16 -t utf-8)")

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

    def _checked_multi_valued(self) -> dict[str, dict[str, str | int]]:
        if not isinstance(self.multi_valued, Mapping):
            raise ValueError(f"multi_valued must map categorical columns to a separator and max_values, got "
                             f"{self.multi_valued!r}")
        out = {}
        for column, bag in self.multi_valued.items():
            where = f"multi_valued[{column!r}]"
            if column not in self.categorical:
                raise ValueError(f"{where}: not a categorical column (categorical: {list(self.categorical)})")
            if not isinstance(bag, Mapping) or set(bag) != {"separator", "max_values"}:
                raise ValueError(f"{where} must be {{'separator': ..., 'max_values': ...}}, got {bag!r}")
            separator, max_values = bag["separator"], bag["max_values"]
            if not isinstance(separator, str) or len(separator) != 1 or separator in (*self.delimiter, '"', "\n", "\r"):
                raise ValueError(f"{where}: separator must be one character other than the delimiter, a quote or a "
                                 f"line end, got {separator!r}")
            if isinstance(max_values, bool) or not isinstance(max_values, int) or not 1 <= max_values <= _MAX_BAG:
                raise ValueError(f"{where}: max_values must be an integer in [1, {_MAX_BAG}], got {max_values!r}")
            out[column] = {"separator": separator, "max_values": max_values}
        return out

    @property
    def sparse_columns(self) -> list[str]:
        """The sparse columns the categorical ones are read into: a multi-valued column ``c`` becomes
        ``c[0]`` ... ``c[max_values - 1]``, every other column itself."""
        out = []
        for column in self.categorical:
            bag = self.multi_valued.get(column)
            out.extend([column] if bag is None else [f"{column}[{k}]" for k in range(bag["max_values"])])
        return out

    @property
    def standardized(self) -> list[str]:
        """The dense columns with a ``standardize`` transform."""
        return [c for c in self.dense if "standardize" in self.transforms.get(c, ())]

    @property
    def raw_dense(self) -> list[str]:
        """The dense columns without a ``log1p`` transform: their values reach the model's float32 inputs
        as they are (standardized or not), so each must be within float32's range."""
        return [c for c in self.dense if "log1p" not in self.transforms.get(c, ())]

    def _delimiter_hint(self) -> str:
        """What to check when a line is one field: the delimiter does not occur in it."""
        if "\\" in self.delimiter:  # an escape written twice, e.g. "\\t" in JSON
            return f" (the delimiter {self.delimiter!r} does not occur in the line; a tab is \"\\t\" in a JSON spec)"
        return f" (the delimiter {self.delimiter!r} does not occur in the line: is it the files' delimiter?)"

    def column_indices(self, names: Sequence[str], path: PathLike) -> list[int]:
        """Positions of label, dense, categorical and ``order_by`` columns (in that order) among
        ``names``, then the number of fields a record has (``len(names)``)."""
        read = (*self._used, self.order_by) if self.order_by is not None else self._used
        missing = [c for c in read if c not in names]
        if missing:
            raise DataFormatError(path, 1 if self.header else None, f"columns {missing} not found among {list(names)}"
                                  + (self._delimiter_hint() if len(names) == 1 else ""))
        names = list(names)
        twice = [c for c in read if names.count(c) > 1]
        if twice:
            where = ", ".join(f"{c!r} at fields {[k + 1 for k, n in enumerate(names) if n == c]}" for c in twice)
            raise DataFormatError(path, 1 if self.header else None,
                                  f"column names used by the spec occur more than once: {where}; rename them in "
                                  f"the header or give the spec's column_names")
        return [names.index(c) for c in read] + [len(names)]


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
        self._raw_dense = [k for k, column in enumerate(spec.dense) if column in spec.raw_dense]
        self.sparse_names = spec.sparse_columns
        self.multi_valued = {}
        for column, bag in spec.multi_valued.items():
            first = self.sparse_names.index(f"{column}[0]")
            self.multi_valued[column] = list(range(first, first + bag["max_values"]))
        self.report = ParseReport()
        self._record_counts: list[int] | None = None
        self._cache: _ParseCache | None = None
        # (mean, std) per dense column for the standardize transforms; identity where none applies.
        self._standardization: tuple[np.ndarray, np.ndarray] | None = None if spec.standardized else _identity(spec)

    def __repr__(self) -> str:
        records = "" if self._range is None else f", records [{self._range[0]}, {self._range[1]})"
        return f"CSVSource({[str(p) for p in self.paths]}{records})"

    def _record_blocks(self, path: Path) -> Iterator[tuple[list[int], "_Records"]]:
        """(used column positions, then the field count; records) for consecutive blocks of the data
        records of ``path`` (see the module docstring for the two ways a block is read)."""
        names = None if self.spec.header else list(self.spec.column_names or ())
        columns = None if names is None else self.spec.column_indices(names, path)
        offset, line = 0, 1  # where the next block starts: byte (of the decompressed text) and line
        for data, end in line_blocks(path, _BLOCK_BYTES):
            block = data[:end]
            if offset == 0 and block.startswith(_BOM):
                block, offset = block[len(_BOM) :], len(_BOM)
            if columns is None:
                header_end = block.find(b"\n") + 1
                header = self._plain_text(path, block[:header_end], line)
                if header is None:
                    break
                names = header.rstrip("\n").split(self.spec.delimiter)
                columns = self.spec.column_indices(names, path)
                block, offset, line = block[header_end:], offset + header_end, line + 1
            text = self._plain_text(path, block, line)
            if text is None:
                break
            yield columns, _Records.of_lines(text, line, self.spec.delimiter)
            offset, line = offset + len(block), line + block.count(b"\n")
        else:
            if columns is None:
                raise DataFormatError(path, 1, "empty file, expected a header line")
            return
        with open_binary(path) as raw:
            raw.seek(offset)
            text = io.TextIOWrapper(raw, self.spec.encoding, newline="")
            yield from self._csv_record_blocks(path, text, line, columns, offset)

    def _plain_text(self, path: Path, block: bytes, line: int) -> str | None:
        """``block`` (of ``path`` from ``line`` on) as text with ``\\n`` line ends, or None where the
        ``csv`` module's rules are needed to read it (:func:`_quote_free_text`). A multi-character
        delimiter has no such rules: then what plain text cannot hold is an error naming its line."""
        text = _quote_free_text(block, self.spec.encoding, quotes=len(self.spec.delimiter) == 1)
        if text is None and len(self.spec.delimiter) > 1:
            offset, reason = _not_plain_text(block, self.spec.encoding)
            raise DataFormatError(path, line + block.count(b"\n", 0, offset),
                                  f"{reason} (the delimiter {self.spec.delimiter!r} reads every line as plain text)")
        return text

    def _csv_record_blocks(
        self, path: Path, text: io.TextIOBase, line: int, columns: list[int] | None, offset: int = 0
    ) -> Iterator[tuple[list[int], "_Records"]]:
        """The records of ``text`` (``path`` from byte ``offset`` and ``line`` on) read by the ``csv`` module,
        in blocks; ``columns``: as in :meth:`_record_blocks`, None while the header is still to be read."""
        reader = csv.reader(text, delimiter=self.spec.delimiter)
        lines, rows = [], []
        try:
            if columns is None:
                names = next(reader, None)
                if names is None:
                    raise DataFormatError(path, 1, "empty file, expected a header line")
                columns = self.spec.column_indices(names, path)
            for fields in reader:
                if fields:
                    lines.append(line - 1 + reader.line_num)
                    rows.append(fields)
                    if len(rows) == _BLOCK_ROWS:
                        yield columns, _Records(lines, rows, None)
                        lines, rows = [], []
        except UnicodeDecodeError as e:
            # The decoder reads ahead of the csv module's records: find the line by decoding line by line.
            raise DataFormatError(path, _undecodable_line(path, offset, line, self.spec.encoding),
                                  f"not {self.spec.encoding} text (set the spec's encoding, e.g. \"latin-1\"): "
                                  f"{e.reason}") from e
        except csv.Error as e:
            raise DataFormatError(path, line - 1 + reader.line_num, str(e)) from e
        except COMPRESSION_ERRORS as e:
            if not is_damaged_compressed(path, e):
                raise
            raise corrupt_compressed_file(path, e) from e
        if rows:
            yield columns, _Records(lines, rows, None)

    def record_counts(self) -> list[int]:
        """Data records per file (counted once, then cached)."""
        if self._record_counts is None:
            self._record_counts = [sum(len(records) for _, records in self._record_blocks(p)) for p in self.paths]
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
        """Rows of each feature's full-size table (:attr:`feature_names`: a multi-valued column is one
        feature), from one pass over this source's rows.

        ``max id + 1`` when the feature's ids fill at least half of ``[0, max id]`` (an integer-coded
        column), else ``distinct ids + 1``: a vocabulary of the ids seen and one row for any other
        (strings, hashes, sparse or large integers). A feature without any value gets one row.

        Without the spec's ``order_by``, the same pass looks for records grouped by a feature (each of
        its ids in one run of records, as in a rating log sorted by user) and warns: the time split of
        such a file tests on ids the training split never saw.
        """
        features = feature_columns(self.sparse_names, self.multi_valued)
        seen: list[list[np.ndarray]] = [[] for _ in features]
        pending = [0] * len(features)
        runs = [0] * len(features)  # runs of equal ids in the records' order (single-valued features)
        previous = [None] * len(features)
        for chunk in self.chunks(_BLOCK_ROWS):
            for j, (_, columns) in enumerate(features):
                ids = chunk.sparse[:, columns].ravel()
                if len(columns) == 1 and len(ids):
                    runs[j] += int(np.count_nonzero(ids[1:] != ids[:-1])) + int(ids[0] != previous[j])
                    previous[j] = ids[-1]
                seen[j].append(np.unique(ids[ids >= 0]))
                pending[j] += len(seen[j][-1])
                if pending[j] > _UNIQUE_MERGE_IDS:
                    seen[j] = [np.unique(np.concatenate(seen[j]))]
                    pending[j] = len(seen[j][0])
        sizes, grouped = [], []
        for (name, columns), parts, feature_runs in zip(features, seen, runs):
            ids = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            if len(ids) == 0:
                sizes.append(1)
            elif int(ids[-1]) + 1 <= len(ids) / _MIN_ID_SPACE_OCCUPANCY:
                sizes.append(int(ids[-1]) + 1)
            else:
                sizes.append(len(ids) + 1)
            if len(columns) == 1 and _is_grouped(feature_runs, len(ids), len(self)):
                grouped.append(f"{name} ({len(ids):,} ids in {feature_runs:,} runs of records)")
        if grouped and self.spec.order_by is None:
            logger.warning("%r: the records are grouped by %s, not in time order: the last records, which the time "
                           "split tests on, hold ids the training records never saw. If the files have a time "
                           "column, name it in the spec's order_by.", self, ", ".join(grouped))
        return sizes

    def cache(
        self,
        cache_dir: PathLike | None = None,
        *,
        progress: bool = True,
        workers: int | None = None,
        build: bool = True,
    ) -> Path:
        """Parses every record of the files once into the parse cache (module docstring), or opens the
        one an earlier run made; this source, and the slices taken from it afterwards, then read the
        cache instead of the text. Returns the cache's folder.

        ``workers`` processes convert the text's blocks (a ``torch.utils.data.DataLoader``'s workers;
        default: one per CPU core, at most 8; 0 or 1: this process alone): the same cache either way.

        Several processes may cache the same files at once: each parses, the first to finish
        publishes its folder, the others use it. With ``build=False`` this process parses nothing
        and waits until another one (e.g. the first rank of the host) has published the cache.

        Example::

            source = CSVSource("clicks.csv", spec)
            source.cache()                      # ~/.cache/lhf_torchrec/csv/<key>/
            train, val, test = time_split(source)
        """
        inputs = self._cache_inputs()
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
        folder = resolve_cache_dir(cache_dir) / "csv" / key
        if not folder.is_dir() and not build:
            _wait_for(folder, self.paths[0])
        elif not folder.is_dir():
            if workers is None:  # a daemonic process (e.g. a DataLoader worker) may not start workers
                workers = 0 if multiprocessing.current_process().daemon else _MAX_PARSE_WORKERS
            self._write_cache(folder, inputs, progress, workers)
        self._cache = _open_cache(folder, inputs, len(self.spec.dense), len(self.sparse_names))
        self._record_counts = self._cache.record_counts
        return folder

    def _cache_inputs(self) -> dict:
        """What the parse cache's contents depend on: the files as they are now, the columns, on_error."""
        files = []
        for path in self.paths:
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        spec = self.spec
        columns = {"label": spec.label, "dense": list(spec.dense), "categorical": list(spec.categorical),
                   "multi_valued": spec.multi_valued, "label_threshold": spec.label_threshold,
                   "positive_labels": None if spec.positive_labels is None else list(spec.positive_labels),
                   "order_by": spec.order_by, "missing_values": sorted(spec.missing_values),
                   "delimiter": spec.delimiter, "header": spec.header, "encoding": spec.encoding,
                   "column_names": None if spec.column_names is None else list(spec.column_names),
                   "raw_dense": spec.raw_dense}  # which values are too large to be well-formed
        return {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "files": files, "columns": columns,
                "on_error": self.on_error}

    def _write_cache(self, folder: Path, inputs: dict, progress: bool, workers: int) -> None:
        """Parses every record into npy files of a private folder, then publishes it as ``folder``."""
        counts = self.record_counts()
        total = sum(counts)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            layout = {"labels": ((total,), np.float64), "dense": ((total, len(self.spec.dense)), np.float64),
                      "sparse": ((total, len(self.sparse_names)), np.int64), "valid": ((total,), np.bool_)}
            if self.spec.order_by is not None:  # the file order's arrays, until they are rewritten in time order
                layout = {f"unordered_{name}": spec for name, spec in layout.items()}
                layout["times"] = ((total,), np.float64)
            arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                      for name, (shape, dtype) in layout.items()}
            prefix = "" if self.spec.order_by is None else "unordered_"
            report = ParseReport()
            bad: list[int] = []  # record numbers of the first bad records (those report.examples describe)
            with tqdm(total=total, desc=f"parsing {self.paths[0].name}" + (" ..." if len(self.paths) > 1 else ""),
                      unit=" records", disable=not progress) as bar:
                blocks = (self._parse(0, total, report) if workers <= 1 else
                          self._parse_in_workers(0, total, report, workers))
                for block in blocks:
                    records = slice(block.first, block.first + len(block.valid))
                    rows = records if block.valid.all() else block.first + np.flatnonzero(block.valid)
                    arrays[prefix + "valid"][records] = block.valid
                    for name, values in zip(("labels", "dense", "sparse"), block.values):
                        arrays[prefix + name][rows] = values
                    if block.times is not None:
                        arrays["times"][records] = np.nan  # a malformed record keeps its place in the file
                        arrays["times"][rows] = block.times
                    if len(bad) < MAX_REPORTED_LINES:
                        bad.extend(block.first + np.flatnonzero(~block.valid)[:MAX_REPORTED_LINES - len(bad)])
                    bar.update(len(block.valid))
            if self.spec.order_by is not None:
                bad = self._write_in_time_order(tmp, arrays, bad, progress)
            for array in arrays.values():
                array.flush()
            del arrays
            for name in layout:
                if name not in _CACHE_ARRAYS:
                    (tmp / f"{name}.npy").unlink()
            manifest = {"inputs": inputs, "record_counts": counts, "lines_skipped": report.lines_skipped,
                        "examples": [[int(r), e] for r, e in zip(bad, report.examples)],
                        "sha256": {name: file_sha256(tmp / f"{name}.npy") for name in _CACHE_ARRAYS}}
            with atomic_write(tmp / "manifest.json") as f:
                f.write(json.dumps(manifest).encode())
            try:
                tmp.rename(folder)
            except OSError:
                if not folder.is_dir():  # not the race where another process published it first
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"could not write the parse cache of {self.paths[0]} under {folder.parent} "
                                       f"({e.strerror or e}); set $LHF_CACHE_DIR to a folder with room") from e
            raise

    def _write_in_time_order(self, tmp: Path, arrays: dict[str, np.ndarray], bad: list[int],
                             progress: bool) -> list[int]:
        """Writes the parse cache's arrays of ``tmp`` in the order of the records' times (``order_by``;
        a stable sort: records of one time keep the files' order; a malformed record, which has no
        time, the time of the record before it) from their ``unordered_`` versions in the files' order.
        Returns the positions of the ``bad`` records in the new order. The sort holds the times and
        the order in memory (about 20 bytes a record with the stable sort's buffer)."""
        times = np.array(arrays["times"])
        missing = np.isnan(times)
        if missing.any():
            last_known = np.maximum.accumulate(np.where(missing, 0, np.arange(len(times))))
            times = times[last_known]
            times[np.isnan(times)] = -np.inf  # malformed records before the first time stay first
        order = np.argsort(times, kind="stable")
        del times
        for name in ("labels", "dense", "sparse", "valid"):
            source = arrays[f"unordered_{name}"]
            arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=source.dtype,
                                                     shape=source.shape)
        with tqdm(total=len(order), desc=f"ordering by {self.spec.order_by}", unit=" records",
                  disable=not progress) as bar:
            for a in range(0, len(order), _BLOCK_ROWS):
                rows = order[a : a + _BLOCK_ROWS]
                for name in ("labels", "dense", "sparse", "valid"):
                    arrays[name][a : a + len(rows)] = arrays[f"unordered_{name}"][rows]
                bar.update(len(rows))
        return [int(np.flatnonzero(order == r)[0]) for r in bad]

    def num_examples(self) -> int:
        """The records of this slice, less the malformed ones ``on_error="skip"`` leaves out: counted
        in the parse cache (without one, every record, as ``len``)."""
        if self._cache is None:
            return len(self)
        start, stop = self._bounds()
        return int(np.count_nonzero(self._cache.arrays["valid"][start:stop]))

    def _read(self, start: int, stop: int) -> Iterator[CTRData]:
        report = self.report = ParseReport()
        if self._cache is None and self.spec.order_by is not None:
            raise ValueError(f"{self!r}: records ordered by {self.spec.order_by!r} are read from the parse cache; "
                             "call cache() first")
        if self._cache is not None:
            yield from self._read_cache(start, stop, report)
        else:
            for block in self._parse(start, stop, report):
                if block.valid.any():
                    yield self._data(*block.values)
        self._log_skipped(report, start, stop)

    def _read_cache(self, start: int, stop: int, report: ParseReport) -> Iterator[CTRData]:
        arrays = self._cache.arrays
        for a in range(start, stop, _BLOCK_ROWS):
            rows = slice(a, min(a + _BLOCK_ROWS, stop))
            valid = arrays["valid"][rows]
            report.lines_read += len(valid)
            keep = slice(None) if valid.all() else np.flatnonzero(valid)
            report.lines_skipped += len(valid) - int(valid.sum())
            if valid.any():
                # Copies (np.array of the mapped rows): the transforms write into the dense values.
                yield self._data(*(np.array(arrays[name][rows][keep]) for name in ("labels", "dense", "sparse")))
        report.examples = [e for r, e in self._cache.examples if start <= r < stop]

    def _data(self, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> CTRData:
        return CTRData(self._transform(dense), sparse, labels, self.dense_names, self.sparse_names, self.multi_valued)

    def _parse(self, start: int, stop: int, report: ParseReport) -> Iterator["_Block"]:
        """The records ``[start, stop)`` of the text, parsed in blocks."""
        caches: list[dict[str, int]] = [{} for _ in self.spec.categorical]
        for path, first, records, columns in self._text_blocks(start, stop):
            yield self._convert_block(path, first, records, columns, caches, report)

    def _text_blocks(self, start: int, stop: int) -> Iterator[tuple[Path, int, "_Records", list[int]]]:
        """(file, record number of the first, records, used columns) for blocks of at most
        ``_BLOCK_ROWS`` records that cover the records ``[start, stop)`` in order."""
        offset = 0
        for i, path in enumerate(self.paths):
            if offset >= stop:
                break
            if self._record_counts is not None and offset + self._record_counts[i] <= start:
                offset += self._record_counts[i]
                continue
            for columns, records in self._record_blocks(path):
                first, last = max(start - offset, 0), min(stop - offset, len(records))
                for a in range(first, last, _BLOCK_ROWS):
                    yield path, offset + a, records.sliced(a, min(a + _BLOCK_ROWS, last)), columns
                offset += len(records)
                if offset >= stop:
                    break

    def _parse_in_workers(self, start: int, stop: int, report: ParseReport, workers: int) -> Iterator["_Block"]:
        """What :meth:`_parse` yields, the blocks converted by ``workers`` DataLoader worker processes."""
        loader = DataLoader(_BlockParsing(self, start, stop), batch_size=None, num_workers=workers,
                            collate_fn=_as_is, prefetch_factor=2)
        for block, block_report in loader:
            if isinstance(block_report, DataFormatError):
                raise block_report
            report.extend(block_report)
            yield block

    def _convert_block(
        self,
        path: Path,
        first: int,
        records: "_Records",
        columns: list[int],
        caches: list[dict[str, int]],
        report: ParseReport,
    ) -> "_Block":
        """Converts a block of records (record numbers from ``first``) column by column; looks for the
        culprits record by record only when the block holds a malformed one."""
        report.lines_read += len(records)
        converted = self._convert(records.columns(columns), caches)
        if converted is not None:
            return _Block(first, np.ones(len(records), dtype=bool), *converted)
        valid = np.zeros(len(records), dtype=bool)
        for k, line in enumerate(records.lines):
            reason = self._problem(records.fields(k), columns)
            if reason is None:
                valid[k] = True
            elif self.on_error == "raise":
                raise DataFormatError(path, line, reason)
            else:
                report.add_bad_lines(path, [line], [reason])
        if not valid.any():
            return _Block(first, valid, _no_values(len(self.spec.dense), len(self.sparse_names)), None)
        converted = self._convert(records.kept(valid).columns(columns), caches)
        if converted is None:  # _problem checks what _convert does: the well-formed records convert
            raise DataFormatError(path, records.lines[0],
                                  "a block of records that each pass the checks does not convert")
        return _Block(first, valid, *converted)

    def _convert(
        self, values: list[Sequence[str]] | None, caches: list[dict[str, int]]
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None] | None:
        """((labels, dense values before their transforms, categorical ids), the times to order by or
        None without ``order_by``) from the records' fields (column by column), or None if one of the
        records is malformed (``values`` None: a record with another field count; see :meth:`_problem`)."""
        if values is None:
            return None
        n = len(values[0])
        num_dense, num_categorical = len(self.spec.dense), len(self.spec.categorical)
        if self.spec.missing_values:  # dense and categorical fields only: a label or a time must be there
            values = [self._without_markers(v) if 1 <= k <= num_dense + num_categorical else v
                      for k, v in enumerate(values)]
        positives = self.spec.positive_labels
        dense = np.empty((n, num_dense))
        try:
            if positives is None:
                labels = np.fromiter(map(float, values[0]), dtype=np.float64, count=n)
            elif "" in values[0]:
                return None
            else:
                labels = np.fromiter(map(frozenset(positives).__contains__, values[0]), dtype=np.float64, count=n)
            for k, v in enumerate(values[1 : 1 + num_dense]):
                dense[:, k] = np.fromiter(map(float, [t or "0" for t in v]), dtype=np.float64, count=n)
        except ValueError:
            return None
        threshold = self.spec.label_threshold
        if threshold is None and not ((labels >= 0) & (labels <= 1)).all():
            return None
        times = None
        if self.spec.order_by is not None:
            times = _times(values[1 + num_dense + num_categorical])
            if times is None:
                return None
        if not (np.isfinite(dense).all() and np.isfinite(labels).all()):
            return None
        if num_dense and (np.abs(dense[:, self._raw_dense]) > _FLOAT32_MAX).any():
            return None
        if threshold is not None:
            labels = (labels >= threshold).astype(np.float64)
        sparse = np.empty((n, len(self.sparse_names)), dtype=np.int64)
        first = 0
        categorical = values[1 + num_dense : 1 + num_dense + num_categorical]
        for column, cache, v in zip(self.spec.categorical, caches, categorical):
            bag = self.spec.multi_valued.get(column)
            if bag is None:
                sparse[:, first] = _ids(v, cache)
                first += 1
                continue
            items = [text.split(bag["separator"]) if text else [] for text in v]
            lengths = np.fromiter(map(len, items), dtype=np.int64, count=n)
            width = bag["max_values"]
            if n and lengths.max() > width:
                return None
            ids = _ids(list(chain.from_iterable(items)), cache)
            block = np.full((n, width), -1, dtype=np.int64)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            block[np.repeat(np.arange(n), lengths), np.arange(len(ids)) - starts] = ids
            sparse[:, first : first + width] = block
            first += width
        return (labels, dense, sparse), times

    def _without_markers(self, texts: Sequence[str]) -> Sequence[str]:
        """``texts`` with the spec's ``missing_values`` markers read as empty fields."""
        markers = self.spec.missing_values
        return texts if markers.isdisjoint(texts) else ["" if t in markers else t for t in texts]

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
            hint = self.spec._delimiter_hint() if len(fields) == 1 else ""
            return f"expected {columns[-1]} fields, got {len(fields)}{hint}"
        if self.spec.missing_values:
            fields = list(fields)
            for k in columns[1 : 1 + len(self.spec.dense) + len(self.spec.categorical)]:
                fields[k] = self._without_markers([fields[k]])[0]
        label = self.spec.label
        if self.spec.positive_labels is not None and not fields[columns[0]]:
            return f"column {label!r}: empty label"
        names = (label, *self.spec.dense) if self.spec.positive_labels is None else self.spec.dense
        for name, c in zip(names, columns if self.spec.positive_labels is None else columns[1:]):
            text = fields[c]
            hint = (" (a marker of missing values? list it in the spec's missing_values)"
                    if name != label and text.strip().lower() in _MISSING_MARKERS else "")
            try:
                x = float(text or ("0" if name != label else text))
            except ValueError:
                if name == label and text:
                    hint = " (for labels of text, list the positive ones in the spec's positive_labels)"
                return f"column {name!r}: expected a number, got {text[:40]!r}{hint}"
            if not math.isfinite(x):
                return f"column {name!r}: expected a finite number, got {text[:40]!r}{hint}"
            if name != label and abs(x) > _FLOAT32_MAX and name in self.spec.raw_dense:
                return (f"column {name!r}: {text[:40]!r} is beyond float32's range (3.4e38), the model's dense "
                        f"inputs; declare \"log1p\" in the spec's transforms for {name!r}")
            if name == self.spec.label and self.spec.label_threshold is None and not 0.0 <= x <= 1.0:
                return (f"column {name!r}: label must lie in [0, 1], got {text[:40]!r} (for ratings, set the spec's "
                        f"label_threshold)")
        for name, c in zip(self.spec.categorical, columns[1 + len(self.spec.dense) : -1]):
            bag = self.spec.multi_valued.get(name)
            count = len(fields[c].split(bag["separator"])) if bag is not None and fields[c] else 0
            if bag is not None and count > bag["max_values"]:
                return f"column {name!r}: {count} values, more than its max_values {bag['max_values']}"
        if self.spec.order_by is not None and _times([fields[columns[-2]]]) is None:
            return (f"column {self.spec.order_by!r} (order_by): expected a number or an ISO 8601 date/time, got "
                    f"{fields[columns[-2]][:40]!r}")
        return None


class _Block(NamedTuple):
    """Records ``[first, first + len(valid))`` of a source, parsed: which were well-formed, and the
    (labels, dense values before their transforms, categorical ids) of those, and their times to
    order by (None without the spec's ``order_by``)."""

    first: int
    valid: np.ndarray
    values: tuple[np.ndarray, np.ndarray, np.ndarray]
    times: np.ndarray | None


@dataclass(frozen=True)
class _Records:
    """Consecutive data records of one file: each one's line number and either its line, to be split
    on ``delimiter`` (quote-free text), or, with ``delimiter`` None, its fields (read by ``csv``)."""

    lines: list[int]
    rows: list[str] | list[list[str]]
    delimiter: str | None

    @classmethod
    def of_lines(cls, text: str, first_line: int, delimiter: str) -> "_Records":
        """The records of quote-free text whose first line is ``first_line``: its non-blank lines."""
        pieces = text.split("\n")
        if pieces[-1] == "":  # what follows the last newline
            pieces.pop()
        lines = range(first_line, first_line + len(pieces))
        if all(pieces):
            return cls(list(lines), pieces, delimiter)
        return cls(list(compress(lines, pieces)), list(filter(None, pieces)), delimiter)  # blank lines: no record

    def __len__(self) -> int:
        return len(self.lines)

    def sliced(self, start: int, stop: int) -> "_Records":
        return _Records(self.lines[start:stop], self.rows[start:stop], self.delimiter)

    def kept(self, keep: np.ndarray) -> "_Records":
        return _Records(list(compress(self.lines, keep)), list(compress(self.rows, keep)), self.delimiter)

    def fields(self, k: int) -> list[str]:
        return self.rows[k] if self.delimiter is None else self.rows[k].split(self.delimiter)

    def columns(self, columns: list[int]) -> list[Sequence[str]] | None:
        """The fields at ``columns[:-1]`` of every record, column by column; None if a record does not
        have ``columns[-1]`` fields."""
        positions, width = columns[:-1], columns[-1]
        if self.delimiter is None:
            if any(len(fields) != width for fields in self.rows):
                return None
            return list(zip(*map(operator.itemgetter(*positions), self.rows)))
        if any(row.count(self.delimiter) != width - 1 for row in self.rows):
            return None
        if len(self.delimiter) == 1:
            flat = self.delimiter.join(self.rows).split(self.delimiter)
        else:  # joined, a field that ends or starts with part of the delimiter could split at another place
            flat = [f for row in self.rows for f in row.split(self.delimiter)]
        return [flat[p::width] for p in positions]


def _wait_for(folder: Path, path: Path) -> None:
    """Returns once ``folder`` exists (another process publishes it), logging every minute."""
    started = time.monotonic()
    while not folder.is_dir():
        time.sleep(_WAIT_POLL_S)
        waited = time.monotonic() - started
        if waited // 60 != (waited - _WAIT_POLL_S) // 60:
            logger.info("waiting %.0f min for another process to build the parse cache of %s in %s",
                        waited / 60, path, folder)


def _ids(texts: Sequence[str], cache: dict[str, int]) -> np.ndarray:
    """:func:`categorical_id` of each text, computed once per distinct text (``cache`` keeps them)."""
    new = set(texts).difference(cache)
    if len(cache) + len(new) > _MAX_CACHED_IDS:
        cache.clear()
        new = set(texts)
    cache.update(zip(new, map(categorical_id, new)))  # a set iterates twice in one order
    return np.fromiter(map(cache.__getitem__, texts), dtype=np.int64, count=len(texts))


def _is_grouped(runs: int, distinct: int, records: int) -> bool:
    """Whether a feature's ids come in runs, one per id (records sorted or grouped by it), rather than
    mixed as in a log in time order: at least 100 ids, seen 5 times each on average, in at most twice
    as many runs as ids."""
    return distinct >= 100 and records >= 5 * distinct and runs <= 2 * distinct


def _times(texts: Sequence[str]) -> np.ndarray | None:
    """The times of an ``order_by`` column as float64: numbers as they are, ISO 8601 dates and times
    (``2014-10-21``, ``2014-10-21 13:05:00``, an offset such as ``+02:00`` applied) as seconds since
    1970-01-01 UTC; None if one of them is neither (or empty, or not finite)."""
    try:
        times = np.fromiter(map(float, texts), dtype=np.float64, count=len(texts))
    except ValueError:
        try:
            with warnings.catch_warnings():  # numpy applies an offset and warns that it keeps no time zone
                warnings.simplefilter("ignore", UserWarning)
                dates = np.array(texts, dtype="datetime64[s]")
        except ValueError:
            return None
        if np.isnat(dates).any():
            return None
        times = dates.astype(np.int64).astype(np.float64)
    return times if np.isfinite(times).all() else None


def _quote_free_text(block: bytes, encoding: str, quotes: bool = True) -> str | None:
    """``block`` as text with ``\\n`` line ends, or None where the ``csv`` module's rules are needed
    to read it (quotes, unless ``quotes`` is False: then they are text; NUL bytes, lone carriage
    returns) or to report it (not ``encoding`` text)."""
    if (quotes and b'"' in block) or b"\x00" in block:
        return None
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")
        if b"\r" in block:
            return None
    try:
        return block.decode(encoding)
    except UnicodeDecodeError:
        return None


def _undecodable_line(path: Path, offset: int, line: int, encoding: str) -> int | None:
    """The number of the first line of ``path`` from byte ``offset`` (line ``line``) that is not ``encoding``
    text, or None. The encodings a spec takes write ASCII as ASCII, so no character holds a newline byte."""
    with open_binary(path) as raw:
        raw.seek(offset)
        for number, text in enumerate(raw, start=line):
            try:
                text.decode(encoding)
            except UnicodeDecodeError:
                return number
    return None


def _not_plain_text(block: bytes, encoding: str) -> tuple[int, str]:
    """(byte offset, what it is) of the first thing in ``block`` that :func:`_quote_free_text` with
    ``quotes=False`` cannot read: a NUL byte, a carriage return that ends no line, or text that is not
    ``encoding``."""
    found = []
    if b"\x00" in block:
        found.append((block.index(b"\x00"), "a NUL byte"))
    lone_return = block.replace(b"\r\n", b"\n\n").find(b"\r")  # same length: offsets stay
    if lone_return >= 0:
        found.append((lone_return, "a carriage return that ends no line"))
    try:
        block.decode(encoding)
    except UnicodeDecodeError as e:
        found.append((e.start, f"not {encoding} text (set the spec's encoding, e.g. \"latin-1\")"))
    return min(found)


class _BlockParsing(IterableDataset):
    """The blocks of records ``[start, stop)`` of a :class:`CSVSource` for DataLoader workers: worker
    ``k`` of ``n`` converts blocks ``k``, ``k + n``, ... (and only cuts the others into records), so
    the loader's round-robin over its workers yields them in the files' order. Items are (block, the
    block's report), or (None, the error) for a malformed record under ``on_error="raise"``: raised
    by the main process in order, after every block before it."""

    def __init__(self, source: "CSVSource", start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __iter__(self) -> Iterator[tuple["_Block | None", "ParseReport | DataFormatError"]]:
        worker = get_worker_info()
        part, parts = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        caches: list[dict[str, int]] = [{} for _ in self.source.spec.categorical]
        for i, (path, first, records, columns) in enumerate(self.source._text_blocks(self.start, self.stop)):
            if i % parts == part:
                report = ParseReport()
                try:
                    yield self.source._convert_block(path, first, records, columns, caches, report), report
                except DataFormatError as e:
                    yield None, e
                    return


def _as_is(item):
    return item


class _ParseCache(NamedTuple):
    """An opened parse cache: its arrays (memory maps), records per file, and the first bad records'
    numbers with their descriptions."""

    arrays: dict[str, np.ndarray]
    record_counts: list[int]
    examples: list[tuple[int, str]]


def _no_values(num_dense: int, num_sparse: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0), np.zeros((0, num_dense)), np.zeros((0, num_sparse), dtype=np.int64)


def _open_cache(folder: Path, inputs: dict, num_dense: int, num_sparse: int) -> _ParseCache:
    """The parse cache in ``folder``, checked against the ``inputs`` it must have been made from and
    its arrays' checksums; a damaged cache is a :class:`DataFormatError` naming the file."""
    manifest_path = folder / "manifest.json"
    remedy = f"delete {folder} to parse the files again"
    try:
        manifest = json.loads(manifest_path.read_text())
        counts = [int(c) for c in manifest["record_counts"]]
        checksums = manifest["sha256"]
        examples = [(int(r), str(e)) for r, e in manifest["examples"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(manifest_path, None, f"not a readable parse cache manifest ({e}); {remedy}") from None
    if manifest.get("inputs") != inputs:
        raise DataFormatError(manifest_path, None, f"a parse cache of other files or columns; {remedy}")
    total = sum(counts)
    shapes = {"labels": (total,), "dense": (total, num_dense), "sparse": (total, num_sparse), "valid": (total,)}
    arrays = {}
    for name in _CACHE_ARRAYS:
        path = folder / f"{name}.npy"
        if not path.is_file() or file_sha256(path) != checksums.get(name):
            raise DataFormatError(path, None, f"missing or damaged (sha256 differs from the manifest's); {remedy}")
        arrays[name] = open_npy(path)
        if arrays[name].shape != shapes[name]:
            raise DataFormatError(path, None, f"shape {arrays[name].shape}, expected {shapes[name]}; {remedy}")
    return _ParseCache(arrays, counts, examples)


def _identity(spec: CSVSpec) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(spec.dense)), np.ones(len(spec.dense))


def read_csv(paths: PathLike | Sequence[PathLike], spec: CSVSpec, *, on_error: OnError = "raise") -> CTRData:
    """All records of CSV/TSV files in memory; see :class:`CSVSource`. Columns to ``standardize``
    are standardized with the statistics of all these records (for a train / validation / test
    split, fit on the training rows with :meth:`CSVSource.fit_standardization` instead). With the
    spec's ``order_by`` the records come in time order from the parse cache (built if missing).

    Example::

        data = read_csv("clicks.tsv", CSVSpec(label="y", dense=["x"], categorical=["u"], delimiter="\\t"))
    """
    source = CSVSource(paths, spec, on_error=on_error)
    if spec.order_by is not None:
        source.cache()
    if spec.standardized:
        source.fit_standardization(0, len(source))
    return source.load()
