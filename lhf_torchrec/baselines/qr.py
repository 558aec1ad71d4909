"""Quotient-remainder compositional embeddings (Shi et al., "Compositional Embeddings Using
Complementary Partitions for Memory-Efficient Recommendation Systems", KDD 2020), multiplicative.

An id ``x`` with index ``i(x)`` in ``[0, q * m)`` has the embedding ``Q[i // m] * R[i % m]``
(element-wise): two tables of ``q`` and ``m`` rows replace one of ``q * m`` rows, and two ids with
different indices never share both rows (the quotient and remainder partitions are
complementary). A bag pools the per-id products: ``sum_j Q[i_j // m] * R[i_j % m]`` (divided by
the bag size for MEAN pooling). The stock EBC pools, so every id is looked up as a bag of its own
(a KJT of stride = the most ids any feature has in the batch, padded with empty bags; sharded, the
most over all ranks) and the products are pooled here.

Index and split at a budget of ``K`` rows (``K = budget bytes // row bytes``; both tables have the
full dim, so every row costs the same):

* dense ids (``0 <= x < N``, ``N`` = the table's rows, no vocabulary) that ``K`` rows can cover
  (``N <= floor(K/2) * ceil(K/2)``): ``i(x) = x``; ``m`` = the largest remainder table (at most
  ``N``) with ``m + ceil(N / m) <= K``, ``q = ceil(N / m)``. Every id keeps a distinct (quotient,
  remainder) pair and the spare rows go to the remainder table: the paper's setting of a
  hashing-trick table of ``m`` rows made collision-free by a small quotient table. Ids outside
  ``[0, N)`` are hashed into it.
* otherwise (sparse 64-bit ids, or a budget too small to cover ``N``): ``m = ceil(K/2)``,
  ``q = K - m`` (the split with the most distinct pairs) and ``i(x)`` is a seeded hash of ``x`` into
  ``[0, q * m)``, drawn as two independent hashes for the quotient and the remainder. Ids then
  share both rows only by hash collision (about ``n^2 / (2 q m)`` pairs for ``n`` ids).

``Q`` starts near one (uniform in [0.5, 1.5]) so that each product starts at the scale of TorchRec's
default init of ``R`` and ids sharing a remainder row start apart.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec.baselines.budget import account
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap, split_per_key
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.hashing import MERSENNE_31, hash_ids
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.mapping.tables import table_budgets
from lhf_torchrec.training.compression import FittedTables, RemapCompression

QUOTIENT_INIT = (0.5, 1.5)
_MAX_BUCKETS = MERSENNE_31 - 1


@dataclass(frozen=True)
class QRSplit:
    """One table's quotient and remainder tables: ``quotient_rows`` x ``remainder_rows`` indices."""

    quotient_rows: int
    remainder_rows: int
    id_space: int  # N: ids in [0, N) are their own index (0 when every id is hashed)

    @property
    def num_rows(self) -> int:
        return self.quotient_rows + self.remainder_rows

    @property
    def hashed(self) -> bool:
        return self.id_space == 0


def qr_split(budget_rows: int, id_space: Optional[int]) -> QRSplit:
    """The split of ``budget_rows`` rows (see the module doc); ``id_space`` None for sparse ids."""
    if budget_rows < 2:
        raise ValueError(f"QR needs at least 2 rows (a quotient and a remainder row), the budget holds {budget_rows}")
    half_low, half_high = budget_rows // 2, budget_rows - budget_rows // 2
    if id_space is not None and 0 < id_space <= half_low * half_high:
        # m + ceil(N/m) is nondecreasing for m >= sqrt(N): the largest m that fits, by bisection.
        low, high = max(1, math.isqrt(id_space)), min(budget_rows - 1, id_space)
        while low < high:
            mid = (low + high + 1) // 2
            if mid + -(-id_space // mid) <= budget_rows:
                low = mid
            else:
                high = mid - 1
        return QRSplit(-(-id_space // low), low, id_space)
    return QRSplit(half_low, half_high, 0)


class QRRemap(EmbeddingRemap):
    """Ids -> (quotient, remainder) rows, one bag per id; products pooled in ``postprocess``."""

    method = "qr"

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        splits: Mapping[str, QRSplit],
        vocabularies: Optional[Mapping[str, IdMapping]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tables, vocabularies or {})
        unknown = sorted(set(splits) - set(self.configs))
        if unknown:
            raise ValueError(f"QR splits given for tables {unknown}, which are not among {sorted(self.configs)}")
        for name in splits:
            if self.configs[name].pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table '{name}': QR pools products with SUM or MEAN, the table uses "
                                 f"{self.configs[name].pooling.name}")
            if name in self.vocabularies:
                raise ValueError(f"table '{name}' is compressed by QR and must not have a vocabulary")
        self.splits = dict(splits)
        self.seed = seed

    @property
    def compressed_tables(self) -> List[str]:
        return sorted(self.splits)

    def config(self) -> Dict[str, Any]:
        return {"seed": self.seed, "splits": {t: dataclasses.asdict(s) for t, s in sorted(self.splits.items())}}

    def state_bytes(self, table: str) -> int:
        return 0

    def tables_of(self, table: str) -> List[EmbeddingBagConfig]:
        split = self.splits.get(table)
        if split is None:
            # One id per bag: the inner table sums, MEAN pooling divides in postprocess.
            return [dataclasses.replace(self.full_table_config(table), pooling=PoolingType.SUM)]
        t = self.configs[table]
        return [
            EmbeddingBagConfig(name=f"{table}__q", embedding_dim=t.embedding_dim, num_embeddings=split.quotient_rows,
                               feature_names=[f"{f}__q" for f in t.feature_names], data_type=t.data_type,
                               weight_init_min=QUOTIENT_INIT[0], weight_init_max=QUOTIENT_INIT[1]),
            EmbeddingBagConfig(name=f"{table}__r", embedding_dim=t.embedding_dim, num_embeddings=split.remainder_rows,
                               feature_names=[f"{f}__r" for f in t.feature_names], data_type=t.data_type),
        ]

    def rows(self, table: str, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(quotient rows, remainder rows) of raw ``ids`` in a compressed table."""
        split = self.splits[table]
        ids = ids.to(torch.int64)
        if split.hashed:
            return (hash_ids(ids, split.quotient_rows, self.seed),
                    hash_ids(ids, split.remainder_rows, self.seed + 1))
        inside = (ids >= 0) & (ids < split.id_space)
        index = torch.where(inside, ids, hash_ids(ids, min(split.id_space, _MAX_BUCKETS), self.seed))
        return index // split.remainder_rows, index % split.remainder_rows

    def inner_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        return max([1] + features.length_per_key())

    def preprocess(
        self, features: KeyedJaggedTensor, stride: Optional[int] = None
    ) -> Tuple[KeyedJaggedTensor, "PerIdBags"]:
        self.check_plain_features(features)
        per_key = list(split_per_key(features))
        needed = self.inner_stride(features)
        if stride is not None and stride < needed:
            raise ValueError(f"stride {stride} is smaller than the {needed} ids of the largest feature")
        stride = stride or needed
        keys: List[str] = []
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for key, ids, bag_lengths in per_key:
            table = self.feature_to_table[key]
            one_per_id = torch.zeros(stride, dtype=bag_lengths.dtype, device=ids.device)
            one_per_id[: ids.numel()] = 1
            if table in self.splits:
                quotient, remainder = self.rows(table, ids)
                keys += [f"{key}__q", f"{key}__r"]
                values += [quotient, remainder]
                lengths += [one_per_id, one_per_id]
            else:
                keys.append(key)
                values.append(self.full_ids(table, ids))
                lengths.append(one_per_id)
        inner = KeyedJaggedTensor(keys=keys, values=torch.cat(values) if values else features.values(),
                                  lengths=torch.cat(lengths), stride=stride)
        bags = PerIdBags.of(features, per_key)
        return inner, bags

    def postprocess(self, pooled: KeyedTensor, batch: Optional["PerIdBags"]) -> KeyedTensor:
        assert batch is not None
        rows = pooled.to_dict()
        out = []
        for key, count, bag_of_id, lengths in zip(batch.keys, batch.counts, batch.bag_of_id.split(batch.counts),
                                                  batch.lengths.split(batch.batch_size)):
            table = self.feature_to_table[key]
            if table in self.splits:
                per_id = rows[f"{key}__q"][:count] * rows[f"{key}__r"][:count]
            else:
                per_id = rows[key][:count]
            bag = per_id.new_zeros(batch.batch_size, per_id.shape[1]).index_add(0, bag_of_id, per_id)
            if self.configs[table].pooling == PoolingType.MEAN:
                bag = bag / lengths.clamp_min(1).to(bag.dtype)[:, None]
            out.append(bag)
        return KeyedTensor.from_tensor_list(list(batch.keys), out)


@dataclass
class PerIdBags:
    """Which bag each id of a batch belongs to, per feature (the batch before one-bag-per-id)."""

    keys: List[str]
    counts: List[int]
    batch_size: int
    bag_of_id: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, features: KeyedJaggedTensor, per_key) -> "PerIdBags":
        batch_size = features.stride()
        bags = torch.arange(batch_size, device=features.lengths().device)
        bag_of_id = [torch.repeat_interleave(bags, lengths) for _, _, lengths in per_key]
        return cls(
            keys=list(features.keys()),
            counts=[int(v.numel()) for _, v, _ in per_key],
            batch_size=batch_size,
            bag_of_id=torch.cat(bag_of_id) if bag_of_id else bags[:0],
            lengths=features.lengths(),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.bag_of_id.record_stream(stream)
        self.lengths.record_stream(stream)


def fit_qr(
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    budget_split: str = "table",
) -> FittedTables:
    """QR embeddings for every table at ``1 / compression`` of its full bytes (see the module doc;
    ``budget_split``: :func:`~lhf_torchrec.mapping.tables.table_budgets`').

    Example::

        fitted = fit_qr(split.tables, profile_tables(split.train, split.tables), compression=8,
                        optimizer="rowwise_adagrad")
        trainer = Trainer(model_config, train_config, split.tables, num_dense, fitted.compression)
    """
    budgets, vocabularies = table_budgets(tables, profiles, compression=compression, optimizer=optimizer, seed=seed,
                                        budget_split=budget_split)
    splits = {}
    for name, budget in budgets.items():
        budget_rows = budget.budget_bytes // row_bytes(budget.config.embedding_dim, optimizer)
        try:
            splits[name] = qr_split(budget_rows, budget.config.num_embeddings if budget.dense_ids else None)
        except ValueError as e:
            raise ValueError(f"table '{name}': {e} ({budget.budget_bytes} bytes)") from None
    return account(RemapCompression(QRRemap(tables, splits, vocabularies, seed=seed)), optimizer, budgets)
