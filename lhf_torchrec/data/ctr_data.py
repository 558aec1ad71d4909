"""In-memory CTR data (:class:`CTRData`) and its conversion to TorchRec batches.

Rows hold dense float features, categorical ids (``-1`` = missing) and a 0/1 label. A *feature*
(a key of the KeyedJaggedTensor, usually one embedding table) is one sparse column, or, for a
multi-valued feature such as a movie's genres, a group of columns padded with ``-1``.

Batching follows TorchRec's convention: ``batch_size`` is per rank; global step ``s`` takes the
``batch_size * world_size`` consecutive rows ``[s * B * W, (s + 1) * B * W)`` (after an optional
seeded shuffle) and rank ``r`` gets the ``r``-th contiguous slice of them. So two ranks see, step
for step, the same global batches as one rank with twice the batch size. A last, smaller global
batch is split as evenly as possible (the first ranks get one row more); it is dropped with
``drop_last=True``, and always when it has fewer rows than ranks, so that every rank runs the same
number of steps on non-empty batches.
"""

import abc
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FeatureColumns = list[tuple[str, list[int]]]


def feature_columns(sparse_names: Sequence[str], multi_valued: Mapping[str, Sequence[int]]) -> FeatureColumns:
    """(feature name, sparse column indices) per KJT key, in order of each feature's first column.

    Columns not named in ``multi_valued`` are single-valued features named after the column.

    Example::

        >>> feature_columns(["user", "g0", "g1"], {"genres": [1, 2]})
        [('user', [0]), ('genres', [1, 2])]
    """
    num_columns = len(sparse_names)
    owner: dict[int, str] = {}
    for name, columns in multi_valued.items():
        if len(columns) == 0:
            raise ValueError(f"multi-valued feature {name!r} has no column")
        for c in columns:
            if not 0 <= c < num_columns:
                raise ValueError(f"multi-valued feature {name!r}: column {c} out of range [0, {num_columns})")
            if c in owner:
                raise ValueError(f"sparse column {c} belongs to both {owner[c]!r} and {name!r}")
            owner[c] = name
    features: FeatureColumns = []
    seen: set[str] = set()
    for c, column_name in enumerate(sparse_names):
        name = owner.get(c, column_name)
        if name in seen:
            if c not in owner:
                raise ValueError(f"feature name {name!r} is used twice")
            continue
        seen.add(name)
        features.append((name, sorted(multi_valued[name]) if c in owner else [c]))
    return features


def sparse_to_kjt(sparse: np.ndarray, features: FeatureColumns) -> KeyedJaggedTensor:
    """Builds a KeyedJaggedTensor from an (B, C) id array, ``-1`` meaning no value.

    Values are feature-major as KJT requires; within a feature, row by row, each row's values in
    column order. The work is one vectorized pass per feature, none per row.

    Example::

        >>> kjt = sparse_to_kjt(np.array([[3, -1], [5, 7]]), [("a", [0]), ("b", [1])])
        >>> kjt.values().tolist(), kjt.lengths().tolist()
        ([3, 5, 7], [1, 1, 0, 1])
    """
    values, lengths = [], []
    for _, columns in features:
        block = sparse[:, columns]
        present = block >= 0
        values.append(block[present])
        lengths.append(present.sum(axis=1, dtype=np.int32))
    length_per_key = [len(v) for v in values]
    return KeyedJaggedTensor(
        keys=[name for name, _ in features],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=sparse.shape[0],
        length_per_key=length_per_key,
        offset_per_key=np.concatenate([[0], np.cumsum(length_per_key)]).tolist(),
    )


def shuffle_order(num_rows: int, seed: int, epoch: int, window: int = 0) -> np.ndarray:
    """The permutation of ``num_rows`` rows used by ``batches(shuffle=True)``.

    A fixed function of (seed, epoch, window); streaming sources shuffle their ``k``-th window of
    rows with ``window=k``, in-memory data is one window.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, window]).permutation(num_rows)


@dataclass(frozen=True)
class BatchOrder:
    """Which rows, in which order, make this rank's batches: the keyword arguments of
    :meth:`CTRSource.batches`, passed on as one value."""

    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def check(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")


def rank_rows(global_rows: int, batch_size: int, order: BatchOrder) -> tuple[int, int] | None:
    """Row range ``[lo, hi)`` of ``order.rank`` within a global batch of ``global_rows`` rows.

    Returns None when the global batch is skipped (a partial last batch with ``drop_last``, or
    with fewer rows than ranks).
    """
    rank, world_size = order.rank, order.world_size
    if global_rows == batch_size * world_size:
        return rank * batch_size, (rank + 1) * batch_size
    if order.drop_last or global_rows < world_size:
        return None
    base, extra = divmod(global_rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _as_array(name: str, x: np.ndarray, dtype: type, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if not np.can_cast(x.dtype, dtype, casting="same_kind"):
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=dtype)


class CTRSource(abc.ABC):
    """What the training loop needs from data, in memory (:class:`CTRData`) or streamed
    (:class:`~lhf_torchrec.data.source.StreamingSource`).

    Example::

        def train_epoch(source: CTRSource, epoch: int) -> None:
            for batch in source.batches(1024, shuffle=True, epoch=epoch, rank=r, world_size=w):
                ...
    """

    dense_names: list[str]
    sparse_names: list[str]
    multi_valued: dict[str, list[int]]

    @property
    @abc.abstractmethod
    def feature_names(self) -> list[str]:
        """KJT keys, one per (possibly multi-valued) sparse feature."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def num_examples(self) -> int:
        """Examples a pass yields: the rows, less any a reader skips as malformed (known where the
        rows were checked already, e.g. a CSV's parse cache); what an epoch's steps follow."""
        return len(self)

    @abc.abstractmethod
    def slice(self, start: int, stop: int) -> "CTRSource":
        """Rows ``[start, stop)``, clipped to the source."""

    @abc.abstractmethod
    def chunks(self, chunk_rows: int) -> Iterator["CTRData"]:
        """Consecutive chunks of ``chunk_rows`` rows (the last may be shorter)."""

    @abc.abstractmethod
    def num_embeddings_per_feature(self) -> list[int]:
        """Per feature, max id + 1 over all rows."""

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """This rank's TorchRec Batches, see the module docstring for the split over ranks.

        With ``shuffle``, in-memory rows are permuted by :func:`shuffle_order` ``(len(self), seed,
        epoch)``, the same on every rank; streaming sources permute rows within windows of rows
        (see :func:`batches_from_chunks`).

        Example::

            for batch in train.batches(512, shuffle=True, epoch=epoch, rank=rank, world_size=world):
                loss = model(batch.dense_features, batch.sparse_features)
        """
        return self._batches(batch_size, BatchOrder(shuffle, seed, epoch, drop_last, rank, world_size))

    @abc.abstractmethod
    def _batches(self, batch_size: int, order: BatchOrder) -> Iterator[Batch]:
        """The generator behind :meth:`batches` (it checks the arguments when first advanced)."""


@dataclass(eq=False)
class CTRData(CTRSource):
    """CTR rows in memory: ``dense`` float32 (N, D), ``sparse`` int64 (N, C) with ``-1`` for a
    missing value, ``labels`` float32 (N,) in [0, 1] (clicks are 0 or 1).

    ``multi_valued`` groups sparse columns into one multi-valued feature, e.g.
    ``{"genres": [6, 7, 8]}``; every other column is its own feature. Arrays of compatible dtypes
    are converted (int32 ids to int64, float64 to float32).

    Example::

        data = CTRData(
            dense=np.zeros((2, 1), np.float32),
            sparse=np.array([[4, -1], [2, 3]]),
            labels=np.array([0.0, 1.0], np.float32),
            dense_names=["age"],
            sparse_names=["user", "item"],
        )
        for batch in data.batches(batch_size=2):
            batch.sparse_features["item"].lengths()  # tensor([0, 1])
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    dense_names: list[str]
    sparse_names: list[str]
    multi_valued: dict[str, list[int]] = field(default_factory=dict)
    _features: FeatureColumns = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.dense = _as_array("dense", self.dense, np.float32, 2)
        self.sparse = _as_array("sparse", self.sparse, np.int64, 2)
        self.labels = _as_array("labels", self.labels, np.float32, 1)
        self.dense_names = list(self.dense_names)
        self.sparse_names = list(self.sparse_names)
        self.multi_valued = {k: list(v) for k, v in self.multi_valued.items()}
        n = len(self.labels)
        for name, array, names in [("dense", self.dense, self.dense_names), ("sparse", self.sparse, self.sparse_names)]:
            if array.shape != (n, len(names)):
                raise ValueError(f"{name} has shape {array.shape}, expected ({n}, {len(names)}) from labels and names")
        if self.labels.size and not (self.labels.min() >= 0 and self.labels.max() <= 1):
            raise ValueError(f"labels must lie in [0, 1], found range [{self.labels.min()}, {self.labels.max()}]")
        if self.sparse.size and self.sparse.min() < -1:
            raise ValueError(f"sparse ids must be >= 0, or -1 for missing; found {self.sparse.min()}")
        self._features = feature_columns(self.sparse_names, self.multi_valued)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def feature_names(self) -> list[str]:
        """KJT keys, one per (possibly multi-valued) sparse feature."""
        return [name for name, _ in self._features]

    def _with_rows(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> "CTRData":
        return CTRData(dense, sparse, labels, self.dense_names, self.sparse_names, self.multi_valued)

    def slice(self, start: int, stop: int) -> "CTRData":
        """Rows ``[start, stop)`` (clipped to the data), sharing memory with ``self``."""
        rows = slice(start, stop)
        return self._with_rows(self.dense[rows], self.sparse[rows], self.labels[rows])

    def take(self, indices: np.ndarray) -> "CTRData":
        """A copy of the rows at ``indices``, in that order."""
        return self._with_rows(self.dense[indices], self.sparse[indices], self.labels[indices])

    @staticmethod
    def concat(parts: Sequence["CTRData"]) -> "CTRData":
        """The rows of ``parts`` one after the other; all parts must have the same columns."""
        if not parts:
            raise ValueError("concat needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if (p.dense_names, p.sparse_names, p.multi_valued) != (
                first.dense_names,
                first.sparse_names,
                first.multi_valued,
            ):
                raise ValueError("cannot concat CTRData with different columns")
        return first._with_rows(
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )

    def num_embeddings_per_feature(self) -> list[int]:
        """Per feature, max id + 1 (0 for a feature without values): the table size for dense ids."""
        return [int(self.sparse[:, cols].max(initial=-1)) + 1 for _, cols in self._features]

    def chunks(self, chunk_rows: int) -> Iterator["CTRData"]:
        """Consecutive views of ``chunk_rows`` rows (the last may be shorter)."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        for start in range(0, len(self), chunk_rows):
            yield self.slice(start, start + chunk_rows)

    def to_batch(self) -> Batch:
        """All rows as one TorchRec Batch (tensors are copies)."""
        return Batch(
            dense_features=torch.from_numpy(self.dense.copy()),
            sparse_features=sparse_to_kjt(self.sparse, self._features),
            labels=torch.from_numpy(self.labels.copy()),
        )

    def _batches(self, batch_size: int, order: BatchOrder) -> Iterator[Batch]:
        order.check(batch_size)
        permutation = shuffle_order(len(self), order.seed, order.epoch) if order.shuffle else None
        global_size = batch_size * order.world_size
        for start in range(0, len(self), global_size):
            rows = rank_rows(min(global_size, len(self) - start), batch_size, order)
            if rows is None:
                return
            lo, hi = start + rows[0], start + rows[1]
            part = self.slice(lo, hi) if permutation is None else self.take(permutation[lo:hi])
            yield part.to_batch()


def batches_from_chunks(
    chunks: Iterable[CTRData], batch_size: int, order: BatchOrder = BatchOrder()
) -> Iterator[Batch]:
    """The batches of :meth:`CTRSource.batches` over a stream of chunks, in bounded memory.

    With ``shuffle``, rows are permuted within each chunk (chunk ``k`` by
    ``shuffle_order(len(chunk), seed, epoch, k)``), so a single chunk shuffles exactly like
    in-memory data.
    """
    order.check(batch_size)
    rank, world_size = order.rank, order.world_size
    global_size = batch_size * world_size
    pending: CTRData | None = None
    for k, chunk in enumerate(chunks):
        if order.shuffle:
            chunk = chunk.take(shuffle_order(len(chunk), order.seed, order.epoch, k))
        pending = chunk if pending is None else CTRData.concat([pending, chunk])
        full = len(pending) // global_size * global_size
        for start in range(0, full, global_size):
            yield pending.slice(start + rank * batch_size, start + (rank + 1) * batch_size).to_batch()
        pending = pending.slice(full, len(pending))
    if pending is not None and len(pending):
        rows = rank_rows(len(pending), batch_size, order)
        if rows is not None:
            yield pending.slice(*rows).to_batch()
