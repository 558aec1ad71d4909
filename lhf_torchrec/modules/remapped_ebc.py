"""The one compression module: a remap in front of a stock ``EmbeddingBagCollection``.

Every compression method of this project is an :class:`EmbeddingRemap`: it turns the KJT of the
full tables into the KJT of a stock EBC holding the method's (smaller) tables (``preprocess``), and
turns that EBC's pooled output back into one embedding per original feature (``postprocess``,
identity for most methods). The learned hash's :class:`~lhf_torchrec.modules.learned_hash_ebc.IdRemapper`
is one; QR, MCH and CCE (:mod:`lhf_torchrec.baselines`) are others. The tables live in the stock
EBC, so TorchRec shards them with its own sharder, FBGEMM's fused kernels look them up, and the
fused table optimizer trains them.

:class:`RemappedEmbeddingBagCollection` is the unsharded module (the reference for tests);
:class:`~lhf_torchrec.distributed.sharder.RemappedEBCSharder` shards it, running ``preprocess`` at
the start of ``input_dist`` (replicated, before the KJT all-to-all, so ``TrainPipelineSparseDist``
overlaps it with the previous batch) and ``postprocess`` when the pooled output is awaited. A
:class:`PerFeatureRemap` (one stock table per table, keys and bags kept) can also remap a table
planned table-wise on the rank that owns it, after the all-to-all, so only that rank holds its state.

Tables a method does not compress pass through, behind the vocabulary mapping the full-table
baseline uses for sparse id spaces (see :func:`lhf_torchrec.mapping.tables.vocabulary_mappings`).
"""

import copy
import dataclasses
import hashlib
import json
from typing import AbstractSet, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.types import Multistreamable

from lhf_torchrec.mapping.id_mapping import IdMapping


class EmbeddingRemap(nn.Module):
    """A method's KJT rewrite around the stock EBC that holds its tables (subclasses fill it in).

    Args:
        tables: the full-size table configs the method replaces.
        vocabularies: raw id -> row mappings of the tables that stay full size and need a
            vocabulary (sparse id spaces); other full tables take ids as rows.

    Buffers hold all of its state, so it moves with ``.to`` and travels in ``state_dict``.
    """

    method: str = ""

    def __init__(self, tables: Sequence[EmbeddingBagConfig], vocabularies: Mapping[str, IdMapping]) -> None:
        super().__init__()
        self.full_configs = list(tables)
        self.feature_to_table = {f: t.name for t in tables for f in t.feature_names}
        self.configs = {t.name: t for t in tables}
        unknown = sorted(set(vocabularies) - set(self.configs))
        if unknown:
            raise ValueError(f"vocabularies given for tables {unknown}, which are not among {sorted(self.configs)}")
        self.vocabularies = nn.ModuleDict(dict(vocabularies))

    @property
    def compressed_tables(self) -> List[str]:
        """Names of the tables this method compresses (the others stay full size)."""
        raise NotImplementedError

    def tables_of(self, table: str) -> List[EmbeddingBagConfig]:
        """Configs of the stock EBC's tables that stand for ``table``."""
        raise NotImplementedError

    def inner_configs(self) -> List[EmbeddingBagConfig]:
        """Configs of the tables of the stock EBC (the compressed tables and the full ones)."""
        return [inner for t in self.full_configs for inner in self.tables_of(t.name)]

    def full_table_config(self, table: str) -> EmbeddingBagConfig:
        """A table that stays full size: its vocabulary's rows, or the table's own."""
        return dataclasses.replace(self.configs[table], num_embeddings=self.full_rows(table),
                                   feature_names=list(self.configs[table].feature_names))

    def inner_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        """The batch size of the stock EBC's input when it is not the KJT's (the smallest that fits)."""
        return None

    def preprocess(
        self, features: KeyedJaggedTensor, stride: Optional[int] = None
    ) -> Tuple[KeyedJaggedTensor, Optional[Multistreamable]]:
        """The stock EBC's input, and what ``postprocess`` needs to know about this batch.

        ``stride``: the batch size of the EBC's input, at least :meth:`inner_stride` (the sharded
        module makes it the same on every rank); ignored by remaps that keep the KJT's batch size.
        """
        raise NotImplementedError

    def postprocess(self, pooled: KeyedTensor, batch: Optional[Multistreamable]) -> KeyedTensor:
        """One embedding per original feature from the stock EBC's output (identity by default)."""
        return pooled

    def config(self) -> Dict[str, Any]:
        """The hyper-parameters that define this remap with its buffers (JSON-serializable)."""
        raise NotImplementedError

    def state_bytes(self, table: str) -> int:
        """Bytes of the remap state a compressed table keeps besides its tables (buffers)."""
        raise NotImplementedError

    def full_rows(self, table: str) -> int:
        config = self.configs[table]
        vocabulary = self.vocabularies[table] if table in self.vocabularies else None
        return vocabulary.num_rows if vocabulary is not None else config.num_embeddings

    def full_ids(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a full-size table: through its vocabulary, else the ids themselves."""
        return self.vocabularies[table](ids) if table in self.vocabularies else ids

    def fingerprint(self) -> Dict[str, str]:
        """Table name -> what must be equal on every rank and in a checkpoint for the table: by
        default the sha256 of the remap's config and of its buffers that concern the table."""
        out = {}
        for table in sorted(self.configs):
            digest = hashlib.sha256(json.dumps({"method": self.method, "table": table, **self.config()},
                                               sort_keys=True, default=str).encode())
            for name, buffer in sorted(self.named_buffers()):
                if _concerns(name, table):
                    digest.update(name.encode())
                    digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
            out[table] = digest.hexdigest()
        return out

    def check_features(self, features: KeyedJaggedTensor) -> None:
        """Raises for features this remap does not know or misses, and for non-integer ids."""
        keys = features.keys()
        unknown = [k for k in keys if k not in self.feature_to_table]
        if unknown:
            raise KeyError(f"features {unknown} are not in this module (it has {sorted(self.feature_to_table)})")
        values = features.values()
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"KJT values must be integer ids, got dtype {values.dtype} (features {keys})")
        if len(keys) < len(self.feature_to_table):
            present = set(keys)
            missing = [f"{f} (table {t})" for f, t in self.feature_to_table.items() if f not in present]
            # no quotes inside: KeyError shows its message quoted
            raise KeyError(f"the input KeyedJaggedTensor lacks features {', '.join(missing)}; it has {', '.join(keys)}")

    def check_plain_features(self, features: KeyedJaggedTensor) -> None:
        """:meth:`check_features`, and raises for weights and variable batch sizes (VBE), which
        remaps that rebuild the KJT do not carry."""
        self.check_features(features)
        if features.weights_or_none() is not None:
            raise NotImplementedError(f"'{self.method}' does not support weighted features")
        if features.variable_stride_per_key():
            raise NotImplementedError(f"'{self.method}' does not support variable batch sizes per feature (VBE)")


class PerFeatureRemap(EmbeddingRemap):
    """A remap that rewrites each feature on its own and keeps the KJT's keys and bags (the values
    change, and with them the lengths and weights where one id becomes several rows): the learned
    hash (:class:`~lhf_torchrec.modules.learned_hash_ebc.IdRemapper`) and MCH. Each table stands
    for one stock-EBC table of the same name and features, so the sharded module can run a table's
    remap on the rank that owns it, after the input all-to-all (:meth:`remap_features` of the
    features that reached that rank), and the other ranks can drop its state (:meth:`without_tables`).

    Subclasses keep their per-table state in ``nn.ModuleDict`` s keyed by table name (the buffer
    naming ``<kind>.<table>`` that :meth:`EmbeddingRemap.fingerprint` relies on as well); a table
    without state takes its ids as rows (its features pass unchanged).
    """

    def remap_feature(
        self, table: str, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(values, lengths, weights) of one feature of ``table`` in the stock EBC's input.

        Returns ``lengths`` itself (the same tensor) when the bags keep their sizes."""
        raise NotImplementedError

    def remap_together(self, keys: Sequence[str], values: Sequence[torch.Tensor], tables: AbstractSet[str]
                       ) -> Dict[int, torch.Tensor]:
        """Position in ``keys`` -> new values of the features of ``tables`` that this remap maps all at
        once (their bags keep their sizes); the other features of ``tables`` go through
        :meth:`remap_feature`. None by default."""
        return {}

    def check_input(self, features: KeyedJaggedTensor) -> None:
        """Raises for a KJT this remap cannot take (see :meth:`EmbeddingRemap.check_features`)."""
        self.check_features(features)

    def preprocess(
        self, features: KeyedJaggedTensor, stride: Optional[int] = None, raw: AbstractSet[str] = frozenset()
    ) -> Tuple[KeyedJaggedTensor, None]:
        """The stock EBC's input; the features of tables in ``raw`` keep their raw ids (the sharded
        module remaps them on the rank that owns the table)."""
        self.check_input(features)
        return self.remap_features(features, set(self.stateful_tables()) - set(raw)), None

    def remap_features(self, features: KeyedJaggedTensor, tables: AbstractSet[str]) -> KeyedJaggedTensor:
        """``features`` with every feature of ``tables`` remapped; keys, their order and the batch layout kept."""
        keys = features.keys()
        if not any(self.feature_to_table[k] in tables for k in keys):
            return features
        weights = features.weights_or_none()
        per_key_values = features.values().split(features.length_per_key())
        per_key_lengths = features.lengths().split(features.stride_per_key())
        per_key_weights = weights.split(features.length_per_key()) if weights is not None else [None] * len(keys)
        together = self.remap_together(keys, per_key_values, tables)
        out_values, out_lengths, out_weights = [], [], []
        for i, (key, values, lengths, w) in enumerate(zip(keys, per_key_values, per_key_lengths, per_key_weights)):
            table = self.feature_to_table[key]
            if i in together:
                values = together[i]
            elif table in tables:
                values, lengths, w = self.remap_feature(table, values, lengths, w)
            out_values.append(values)
            out_lengths.append(lengths)
            out_weights.append(w)
        same_bags = all(new is old for new, old in zip(out_lengths, per_key_lengths))
        # Bags of the same sizes: the KJT's lengths and per-key offsets stay valid as they are.
        kept = {"lengths": features.lengths(), "length_per_key": features.length_per_key(),
                "offset_per_key": features.offset_per_key()} if same_bags else {"lengths": torch.cat(out_lengths)}
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(out_values),
            weights=torch.cat(out_weights) if weights is not None else None,
            **kept,
            **batch_layout(features),
        )

    def stateful_tables(self) -> List[str]:
        """Tables whose remap holds state (buffers): what a rank that does not own them can drop."""
        return sorted({table for state in self._per_table_state() for table in state})

    def without_tables(self, tables: AbstractSet[str]) -> "PerFeatureRemap":
        """A shallow copy of this remap without the state of ``tables`` (the other tables' buffers
        are shared, not copied; this remap is unchanged)."""
        out = copy.copy(self)
        # copy.copy shares the module's dicts of children and tensors: give the copy its own.
        out._modules, out._buffers, out._parameters = dict(self._modules), dict(self._buffers), dict(self._parameters)
        for name, state in self._modules.items():
            if isinstance(state, nn.ModuleDict):
                out._modules[name] = nn.ModuleDict({t: m for t, m in state.items() if t not in tables})
        return out

    def _per_table_state(self) -> List[nn.ModuleDict]:
        return [m for m in self.children() if isinstance(m, nn.ModuleDict)]


def batch_layout(features: KeyedJaggedTensor) -> Dict[str, Any]:
    """How the KJT's bags map to samples: its stride, or per-key strides and inverse indices (VBE)."""
    if features.variable_stride_per_key():
        return {
            "stride_per_key_per_rank": features.stride_per_key_per_rank(),
            "inverse_indices": features.inverse_indices_or_none(),
        }
    return {"stride": features.stride()}


def _concerns(buffer_name: str, table: str) -> bool:
    """Buffers are named ``<kind>.<table>[.<...>]``: this one belongs to ``table``."""
    parts = buffer_name.split(".")
    return len(parts) > 1 and parts[1] == table


class RemappedEmbeddingBagCollection(nn.Module):
    """Drop-in replacement for an ``EmbeddingBagCollection``: ``remapper`` around a stock EBC.

    Args:
        remapper: the method's fitted :class:`EmbeddingRemap`.
        device: device of the tables (``meta`` for deferred init under DMP); the remap never goes
            to ``meta``, DMP would silently fill its buffers with zeros.
        is_weighted: as for ``EmbeddingBagCollection``.

    Example::

        ebc = RemappedEmbeddingBagCollection(fit_qr(tables, profiles, compression=8).compression.remapper)
        pooled = ebc(kjt)              # KeyedTensor, same keys and shapes as the full-size EBC
    """

    def __init__(
        self, remapper: EmbeddingRemap, device: Optional[torch.device] = None, is_weighted: bool = False
    ) -> None:
        super().__init__()
        remap_device = None if device is None or torch.device(device).type == "meta" else device
        self.remapper = remapper.to(remap_device) if remap_device else remapper
        self.ebc = EmbeddingBagCollection(tables=remapper.inner_configs(), device=device, is_weighted=is_weighted)

    def full_embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The configs of the original, uncompressed tables."""
        return list(self.remapper.full_configs)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.ebc.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self.ebc.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        inner, batch = self.remapper.preprocess(features)
        self._check_pass_through_ids(inner)
        return self.remapper.postprocess(self.ebc(inner), batch)

    def _check_pass_through_ids(self, inner: KeyedJaggedTensor) -> None:
        """Names the feature and table of an id outside a table the method does not compress (whose
        rows are the raw ids or a vocabulary's), where the lookup would fail with torch's bare range
        message. Compressed tables are in range by construction. CPU only: on accelerators the check
        would sync every batch, and FBGEMM's bounds check handles out-of-range ids there."""
        if inner.values().device.type != "cpu":
            return
        # Compressed tables and vocabularies place every id in range by construction: only tables
        # that take raw ids as rows need the check.
        compressed = set(self.remapper.compressed_tables)
        raw_rows = {f: self.remapper.full_rows(t) for f, t in self.remapper.feature_to_table.items()
                    if t not in compressed and t not in self.remapper.vocabularies}
        if not raw_rows:
            return
        for key, values in zip(inner.keys(), inner.values().split(inner.length_per_key())):
            rows = raw_rows.get(key)
            if rows is None or not values.numel():
                continue
            low, high = torch.aminmax(values)
            if int(low) < 0 or int(high) >= rows:
                bad = int(low) if int(low) < 0 else int(high)
                raise ValueError(f"feature '{key}': id {bad} is outside table "
                                 f"'{self.remapper.feature_to_table[key]}' [0, {rows}), which has no mapping to place it")

def split_per_key(features: KeyedJaggedTensor) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, values, lengths) of every feature of a (non-VBE) KJT."""
    values = features.values().split(features.length_per_key())
    lengths = features.lengths().split(features.stride_per_key())
    yield from zip(features.keys(), values, lengths)
