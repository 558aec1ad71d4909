"""``LearnedHashEmbeddingBagCollection``: an EmbeddingBagCollection behind learned id mappings.

The module is a :class:`~lhf_torchrec.modules.remapped_ebc.RemappedEmbeddingBagCollection` whose
remap is an :class:`IdRemapper` (one :class:`IdMapping` per table, its tensors are buffers): it
rewrites the values of the incoming ``KeyedJaggedTensor`` from raw ids to rows, and a stock
``EmbeddingBagCollection`` holding the *compressed* tables pools them. Because the inner module is
a stock EBC, TorchRec shards it with its own sharder and FBGEMM's table-batched kernels do the
lookups (see :mod:`lhf_torchrec.distributed`).
"""

import dataclasses
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec.mapping.fused import FusedIdMappings, runtime_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.remapped_ebc import PerFeatureRemap, RemappedEmbeddingBagCollection


class IdRemapper(PerFeatureRemap):
    """The learned hash's remap: rewrites KJT values from raw ids to compressed rows.

    The ids of every table whose mapping :func:`~lhf_torchrec.mapping.fused.fusable` are mapped
    together, one pass per storage (:class:`~lhf_torchrec.mapping.fused.FusedIdMappings`, built at
    the first remap and again after a move: the mappings' buffers become views of its packed arrays);
    the others (double hashing, bucketed, larger sorted tables) table by table. Features whose table
    has no mapping pass through unchanged. Weights are kept (repeated for the second row of a
    double-hashed id). Raises ``ValueError`` as :func:`compressed_configs` does.
    """

    method = "learned_hash"

    def __init__(self, tables: Sequence[EmbeddingBagConfig], mappings: Mapping[str, IdMapping]) -> None:
        super().__init__(tables, {})
        self._compressed = {t.name: t for t in compressed_configs(list(tables), mappings)}
        self.mappings = nn.ModuleDict(dict(mappings))
        self._fused: Optional[FusedIdMappings] = None

    @property
    def compressed_tables(self) -> List[str]:
        return sorted(self.mappings)

    def tables_of(self, table: str) -> List[EmbeddingBagConfig]:
        return [self._compressed[table]]

    def config(self) -> Dict[str, Any]:
        return {name: m.params for name, m in sorted(self.mappings.items())}

    def state_bytes(self, table: str) -> int:
        """The mapping's buffers and what applying it together with the others adds (:func:`runtime_bytes`)."""
        return self.mappings[table].nbytes + runtime_bytes(self.mappings[table]) if table in self.mappings else 0

    def fingerprint(self) -> Dict[str, str]:
        return {name: m.fingerprint for name, m in sorted(self.mappings.items())}

    def remap_feature(
        self, table: str, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if table not in self.mappings:
            return values, lengths, weights
        return self.mappings[table].remap_jagged(values, lengths, weights)

    def remap_together(self, keys: Sequence[str], values: Sequence[torch.Tensor], tables: AbstractSet[str]
                       ) -> Dict[int, torch.Tensor]:
        fused = self.fused_mappings()
        picked = [i for i, key in enumerate(keys) if self.feature_to_table[key] in tables
                  and self.feature_to_table[key] in fused.code]
        if not picked:
            return {}
        return dict(zip(picked, fused([values[i] for i in picked], [self.feature_to_table[keys[i]] for i in picked])))

    def fused_mappings(self) -> FusedIdMappings:
        """The mappings packed to be applied together (built again when they moved or changed)."""
        if self._fused is None or not self._fused.is_current(self.mappings):
            self._fused = None  # let the old packed arrays go before packing again
            self._fused = FusedIdMappings(dict(self.mappings.items()))
        return self._fused

    def without_tables(self, tables: AbstractSet[str]) -> "IdRemapper":
        out = super().without_tables(tables)
        assert isinstance(out, IdRemapper)
        out._fused = None
        return out

    def _apply(self, fn: Callable, recurse: bool = True) -> "IdRemapper":
        # A move replaces the mappings' buffers: drop the packed arrays now (not at the next remap).
        self._fused = None
        return super()._apply(fn, recurse)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return self.preprocess(features)[0]


def compressed_configs(
    tables: List[EmbeddingBagConfig], mappings: Mapping[str, IdMapping]
) -> List[EmbeddingBagConfig]:
    """The configs of the compressed tables: ``num_embeddings`` = the mapping's rows; unmapped tables unchanged.

    Raises ``ValueError`` for a mapping of an unknown table, a mapping with more rows than the table
    has ids, or double hashing on a table that does not SUM-pool.
    """
    names = {t.name for t in tables}
    unknown = sorted(set(mappings) - names)
    if unknown:
        raise ValueError(f"mappings given for tables {unknown}, which are not among the tables {sorted(names)}")
    out = []
    for t in tables:
        mapping = mappings.get(t.name)
        if mapping is None:
            out.append(t)
            continue
        if mapping.num_rows > t.num_embeddings:
            raise ValueError(
                f"table '{t.name}': the mapping has {mapping.num_rows} rows but the table only "
                f"{t.num_embeddings}; a mapping must compress"
            )
        if mapping.probes > 1 and t.pooling != PoolingType.SUM:
            raise ValueError(
                f"table '{t.name}': method '{mapping.method}' sums two rows per id and needs SUM pooling, "
                f"the table uses {t.pooling.name}"
            )
        out.append(dataclasses.replace(t, num_embeddings=mapping.num_rows, feature_names=list(t.feature_names)))
    return out


class LearnedHashEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Drop-in replacement for an ``EmbeddingBagCollection`` whose tables are compressed by mappings.

    Args:
        tables: the original (full-size) table configs, as given to the EBC being replaced.
        mappings: table name -> fitted :class:`IdMapping`; tables without one stay full size.
        device: device of the compressed tables (``meta`` for deferred init under DMP). The mappings
            never go to ``meta``: DMP would silently fill them with zeros.
        is_weighted: as for ``EmbeddingBagCollection``.

    Example::

        ebc = LearnedHashEmbeddingBagCollection(tables=configs, mappings=fit_mappings(...))
        pooled = ebc(kjt)              # KeyedTensor, same keys and shapes as the full-size EBC
        ebc.embedding_bag_configs()    # the compressed tables
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        mappings: Mapping[str, IdMapping],
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__(IdRemapper(tables, mappings), device=device, is_weighted=is_weighted)

    @property
    def mappings(self) -> Dict[str, IdMapping]:
        return dict(self.remapper.mappings.items())
