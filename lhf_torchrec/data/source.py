"""File-backed data behind the one interface of in-memory data (:class:`CTRSource`, defined
with :class:`CTRData`), and time-ordered splits.

A training loop written against :class:`CTRSource` runs unchanged on :class:`CTRData` (in memory)
and on file-backed sources (:class:`StreamingSource` subclasses such as ``CriteoTSV``) that read
bounded chunks of rows. Row order is the data's order (time for Criteo), so :func:`time_split`
cuts contiguous row ranges: train first, test last.
"""

import abc
import copy
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
from torchrec.datasets.utils import Batch

from lhf_torchrec.data.ctr_data import BatchOrder, CTRData, CTRSource, batches_from_chunks, feature_columns
from lhf_torchrec.data.files import ParseReport

#: Rows per shuffle window of streaming sources (one window holds this many rows in memory).
SHUFFLE_WINDOW_ROWS = 1 << 18


def rechunk(parts: Iterable[CTRData], chunk_rows: int) -> Iterator[CTRData]:
    """Regroups a stream of row blocks of any sizes into chunks of exactly ``chunk_rows`` rows
    (the last may be shorter)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    pending: list[CTRData] = []
    pending_rows = 0
    for part in parts:
        while len(part):
            take = min(chunk_rows - pending_rows, len(part))
            pending.append(part.slice(0, take))
            pending_rows += take
            part = part.slice(take, len(part))
            if pending_rows == chunk_rows:
                yield pending[0] if len(pending) == 1 else CTRData.concat(pending)
                pending, pending_rows = [], 0
    if pending:
        yield CTRData.concat(pending)


class StreamingSource(CTRSource):
    """Base of file-backed sources: rows ``[start, stop)`` of a sequence of files, read in chunks.

    Subclasses set the column names in ``__init__`` and implement :meth:`_total_rows` and
    :meth:`_read`; ``slice`` returns a shallow copy restricted to a sub-range of rows.
    """

    dense_names: list[str]
    sparse_names: list[str]
    multi_valued: dict[str, list[int]]

    def __init__(self) -> None:
        self._range: tuple[int, int] | None = None
        # Row ranges whose skipped lines were logged: every epoch reads them again (slices share the set).
        self._reported: set[tuple[int, int]] = set()

    def _log_skipped(self, report: ParseReport, start: int, stop: int) -> None:
        """Logs what a whole pass over rows ``[start, stop)`` skipped (:meth:`ParseReport.log`), once per range."""
        if (start, stop) not in self._reported:
            report.log()
            self._reported.add((start, stop))

    @abc.abstractmethod
    def _total_rows(self) -> int:
        """Rows in all files, before slicing."""

    @abc.abstractmethod
    def _read(self, start: int, stop: int) -> Iterator[CTRData]:
        """Blocks of rows (any sizes) that cover rows ``[start, stop)`` of the files in order."""

    @property
    def feature_names(self) -> list[str]:
        return [name for name, _ in feature_columns(self.sparse_names, self.multi_valued)]

    def _bounds(self) -> tuple[int, int]:
        return self._range if self._range is not None else (0, self._total_rows())

    def __len__(self) -> int:
        start, stop = self._bounds()
        return stop - start

    def slice(self, start: int, stop: int) -> "StreamingSource":
        """The rows ``[start, stop)`` of this source (clipped to it), read lazily."""
        lo, hi = self._bounds()
        start, stop, _ = slice(start, stop).indices(hi - lo)
        view = copy.copy(self)
        view._range = (lo + start, lo + max(start, stop))
        return view

    def chunks(self, chunk_rows: int) -> Iterator[CTRData]:
        """Consecutive chunks of ``chunk_rows`` rows (the last may be shorter)."""
        return rechunk(self._read(*self._bounds()), chunk_rows)

    def load(self) -> CTRData:
        """All rows in memory."""
        parts = list(self._read(*self._bounds()))
        if not parts:
            empty = (np.zeros((0, len(self.dense_names))), np.zeros((0, len(self.sparse_names)), np.int64), np.zeros(0))
            return CTRData(*empty, self.dense_names, self.sparse_names, self.multi_valued)
        return CTRData.concat(parts)

    def _batches(self, batch_size: int, order: BatchOrder) -> Iterator[Batch]:
        # Shuffling permutes rows within windows of SHUFFLE_WINDOW_ROWS rows: each rank reads the
        # whole stream and keeps its slices.
        return batches_from_chunks(self.chunks(SHUFFLE_WINDOW_ROWS), batch_size, order)

    def num_embeddings_per_feature(self) -> list[int]:
        """Per feature, max id + 1 over all rows (one pass over the data)."""
        out = [0] * len(self.feature_names)
        for chunk in self.chunks(SHUFFLE_WINDOW_ROWS):
            out = [max(a, b) for a, b in zip(out, chunk.num_embeddings_per_feature())]
        return out


def split_bounds(num_rows: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[tuple[int, int]]:
    """Contiguous row ranges, in order, that cover ``[0, num_rows)`` with the given fractions.

    Example::

        >>> split_bounds(10, (0.8, 0.1, 0.1))
        [(0, 8), (8, 9), (9, 10)]
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or (f <= 0).any() or abs(f.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    cuts = [0] + [int(round(c * num_rows)) for c in np.cumsum(f)[:-1]] + [num_rows]
    return list(zip(cuts[:-1], cuts[1:]))


S = TypeVar("S", CTRData, StreamingSource)


def time_split(source: S, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[S, ...]:
    """Splits rows in order into contiguous parts (train first, test last), in memory or streamed.

    The rows must already be in time order (Criteo files are; the MovieLens loader sorts by
    timestamp).

    Example::

        train, val, test = time_split(CriteoTSV(["day_0.tsv", "day_1.tsv"]), (0.8, 0.1, 0.1))
    """
    return tuple(source.slice(a, b) for a, b in split_bounds(len(source), fractions))
