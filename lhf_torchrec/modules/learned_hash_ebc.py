"""``LearnedHashEmbeddingBagCollection``: an EmbeddingBagCollection behind learned id mappings.

The module is the unsharded reference: an :class:`IdRemapper` (one :class:`IdMapping` per table,
its tensors are buffers) rewrites the values of the incoming ``KeyedJaggedTensor`` from raw ids to
rows, and a stock ``EmbeddingBagCollection`` holding the *compressed* tables pools them. Because the
inner module is a stock EBC, TorchRec shards it with its own sharder and FBGEMM's table-batched
kernels do the lookups (see :mod:`lhf_torchrec.distributed`).
"""

import dataclasses
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from lhf_torchrec.mapping.id_mapping import IdMapping


class IdRemapper(nn.Module):
    """Rewrites KJT values from raw ids to compressed rows, table by table.

    Features whose table has no mapping pass through unchanged. Weights are kept (repeated for the
    second row of a double-hashed id).
    """

    def __init__(self, feature_to_table: Mapping[str, str], mappings: Mapping[str, IdMapping]) -> None:
        super().__init__()
        self.mappings = nn.ModuleDict(dict(mappings))
        self._feature_to_table = dict(feature_to_table)
        self._mapped = {f for f, t in self._feature_to_table.items() if t in self.mappings}
        self._lengths_change = any(m.probes > 1 for m in self.mappings.values())

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        unknown = [k for k in keys if k not in self._feature_to_table]
        if unknown:
            raise KeyError(f"features {unknown} are not in this module (it has {sorted(self._feature_to_table)})")
        values = features.values()
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"KJT values must be integer ids, got dtype {values.dtype} (features {keys})")
        if not self._mapped.intersection(keys):
            return features
        weights = features.weights_or_none()
        per_key_values = values.split(features.length_per_key())
        if not self._lengths_change:
            remapped: List[torch.Tensor] = []
            for key, segment in zip(keys, per_key_values):
                table = self._feature_to_table[key]
                remapped.append(self.mappings[table](segment) if table in self.mappings else segment)
            return KeyedJaggedTensor(
                keys=keys,
                values=torch.cat(remapped) if remapped else values,
                lengths=features.lengths(),
                weights=weights,
                length_per_key=features.length_per_key(),
                offset_per_key=features.offset_per_key(),
                **_batch_layout(features),
            )
        # Double hashing turns one id into two values: lengths and weights change with the values.
        per_key_lengths = features.lengths().split(features.stride_per_key())
        per_key_weights = weights.split(features.length_per_key()) if weights is not None else [None] * len(keys)
        out_values, out_lengths, out_weights = [], [], []
        for key, segment, lengths, w in zip(keys, per_key_values, per_key_lengths, per_key_weights):
            table = self._feature_to_table[key]
            if table in self.mappings:
                segment, lengths, w = self.mappings[table].remap_jagged(segment, lengths, w)
            out_values.append(segment)
            out_lengths.append(lengths)
            out_weights.append(w)
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(out_values),
            lengths=torch.cat(out_lengths),
            weights=torch.cat(out_weights) if weights is not None else None,
            **_batch_layout(features),
        )


def _batch_layout(features: KeyedJaggedTensor) -> Dict:
    """How the KJT's bags map to samples: its stride, or per-key strides and inverse indices (VBE)."""
    if features.variable_stride_per_key():
        return {
            "stride_per_key_per_rank": features.stride_per_key_per_rank(),
            "inverse_indices": features.inverse_indices_or_none(),
        }
    return {"stride": features.stride()}


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


class LearnedHashEmbeddingBagCollection(nn.Module):
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
        super().__init__()
        self._full_configs = list(tables)
        small = compressed_configs(self._full_configs, mappings)
        feature_to_table = {f: t.name for t in tables for f in t.feature_names}
        mapping_device = None if device is None or torch.device(device).type == "meta" else device
        self.remapper = IdRemapper(
            feature_to_table, {name: m.to(mapping_device) if mapping_device else m for name, m in mappings.items()}
        )
        self.ebc = EmbeddingBagCollection(tables=small, device=device, is_weighted=is_weighted)

    @property
    def mappings(self) -> Dict[str, IdMapping]:
        return dict(self.remapper.mappings.items())

    def full_embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The configs of the original, uncompressed tables."""
        return list(self._full_configs)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.ebc.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self.ebc.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        remapped = self.remapper(features)
        self._check_features(remapped)
        return self.ebc(remapped)

    def _check_features(self, features: KeyedJaggedTensor) -> None:
        """Names the feature and table of a missing key or of ids outside an unmapped table (whose
        rows are the raw ids), where the EBC would raise a bare KeyError or index error. The id
        check runs on CPU only: on accelerators it would sync every batch, and FBGEMM's bounds
        check handles out-of-range ids there."""
        keys = features.keys()
        missing = [f"{f} (table {t.name})" for t in self._full_configs for f in t.feature_names if f not in keys]
        if missing:  # no quotes inside: KeyError shows its message quoted
            raise KeyError(f"the input KeyedJaggedTensor lacks features {', '.join(missing)}; it has {', '.join(keys)}")
        if features.values().device.type != "cpu":
            return
        mapped = self.remapper.mappings
        for key, values in zip(keys, features.values().split(features.length_per_key())):
            table = next((t for t in self._full_configs if key in t.feature_names), None)
            if table is None or table.name in mapped or not values.numel():
                continue
            low, high = torch.aminmax(values)
            if int(low) < 0 or int(high) >= table.num_embeddings:
                bad = int(low) if int(low) < 0 else int(high)
                raise ValueError(f"feature '{key}': id {bad} is outside table '{table.name}' "
                                 f"[0, {table.num_embeddings}), which has no mapping to place it")
