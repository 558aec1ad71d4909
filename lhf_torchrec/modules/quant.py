"""Quantized (int8 / fp16) inference twin of :class:`LearnedHashEmbeddingBagCollection`.

The compressed tables become TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM's
``IntNBitTableBatchedEmbeddingBagsCodegen``, CPU and GPU). The raw id -> row remap of each mapped
table goes one of two ways:

* **folded** into the lookup kernel with ``set_index_remappings``. The kernel takes an int32 array
  over the raw id space ``[0, N)`` of the original table (``N = num_embeddings`` of the full-size
  config), materialized from the mapping (every id of ``[0, N)`` -> its row, hashed ids included),
  followed by a *hash block* of ``hash_rows`` entries: index ``N + j`` -> row ``hash_offset + j``.
  The kernel cannot hash: it replaces an index outside its array by 0 with a logged error (and
  lets -1, its "pruned" marker, through unchecked), so a guard in front (:class:`OutOfRangeRedirect`) rewrites every id outside ``[0, N)``
  (negative or ``>= N``) to ``N + hash(id)``. Every int64 id then gets the row the float module
  gives it.
* **in front**: the table's :class:`IdMapping` stays in an :class:`IdRemapper` ahead of the
  quantized EBC, as in the float module.

``fold_remap`` chooses, table by table:

* ``"dense"`` (default): fold tables whose mapping is stored densely (``storage == "dense"``, an
  int32 per id of its span): the mapping already pays ~4 bytes per raw id, so the folded array
  (4 bytes x ``(N + hash_rows)``) costs about the same and the remap moves into the kernel. Sorted
  (sparse entries) and pure-hash mappings cost far less than 4 bytes per raw id: they stay in front.
* ``"all"``: fold every eligible table, trading 4 bytes per raw id for speed (for an int8 dim-16
  table compressed 10x that is more than the table itself: 0.1 rows x 32 bytes = 3.2 bytes per id).
* ``"none"``: every mapping in front.

Eligible for folding: one row per id (``probes == 1``; double hashing turns an id into two rows,
which an array cannot express), every entry id inside ``[0, N)``, ``N + hash_rows < 2**31`` (the
array is int32), and every table in the same TBE (tables are grouped by pooling) has exactly one
feature: FBGEMM 1.9's ``pruned_array_lookup`` indexes the remap arrays by *feature* while
``set_index_remappings`` lays them out by *table*, so with a table shared by two features one
table's remap is applied to another table's feature. Such TBEs keep their remaps in front.

Serving: a module with no table remapped in front traces with ``torchrec.fx.symbolic_trace`` and
the trace compiles with ``torch.jit.script`` (:func:`script_for_serving`), TorchRec's own path for
its quantized EBC; ``torch.export.export(..., strict=False)`` works too (mark the KJT's values
dimension dynamic). With a table remapped in front all three fail, in ``IdRemapper``/``IdMapping``:
torch.fx "Proxy object cannot be iterated" (the loop over the KJT's keys), TorchScript
"Comprehension ifs are not supported yet", torch.export on ``IdRemapper``'s data-dependent steps
(its checks of the ids, the fused remap's shapes). A single ``IdMapping`` exports and compiles (it has
no data-dependent control flow when traced: :meth:`IdMapping.compile`).
"""

import copy
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import PlaceholderObserver, QConfig
from torchrec import KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from lhf_torchrec.mapping.hashing import hash_coefficients, hash_with_coefficients
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.learned_hash_ebc import IdRemapper, LearnedHashEmbeddingBagCollection

logger = logging.getLogger(__name__)

_INT32_MAX = (1 << 31) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
QUANT_DTYPES = (torch.qint8, torch.quint8, torch.float16)
FOLD_CHOICES = ("dense", "all", "none")
_FOLD_CHUNK = 1 << 22


@torch.fx.wrap
def _redirect_out_of_range(
    features: KeyedJaggedTensor,
    feature_names: List[str],
    bounds: torch.Tensor,
    hash_consts: torch.Tensor,
) -> KeyedJaggedTensor:
    """Ids of folded features outside ``[lo, hi]`` become ``hi + 1 + hash(id)`` (the hash block).

    ``bounds`` is (F, 2) int64 ``[lo, hi]`` per feature of the module (``[INT64_MIN, INT64_MAX]``
    for features that are not folded), ``hash_consts`` (F, 5) as :func:`hash_with_coefficients` takes.
    Vectorized over all values; only the out-of-range ids are hashed. No data-dependent Python
    branch, so torch.fx, TorchScript and torch.export see one graph.
    """
    keys = features.keys()
    positions = torch.tensor([feature_names.index(k) for k in keys], dtype=torch.int64, device=bounds.device)
    values = features.values()
    lengths_per_key = features.lengths().view(len(keys), -1).sum(dim=1)
    key_bounds = bounds.index_select(0, positions)
    value_bounds = torch.repeat_interleave(key_bounds, lengths_per_key, dim=0, output_size=values.numel())
    ids = values.to(torch.int64)
    outside = torch.nonzero((ids < value_bounds[:, 0]) | (ids > value_bounds[:, 1])).squeeze(1)
    key_of_outside = torch.searchsorted(torch.cumsum(lengths_per_key, 0), outside, right=True)
    consts = hash_consts.index_select(0, positions.index_select(0, key_of_outside))
    block_start = bounds.index_select(0, positions.index_select(0, key_of_outside))[:, 1] + 1
    redirected = block_start + hash_with_coefficients(ids.index_select(0, outside), consts)
    return KeyedJaggedTensor(
        keys=keys,
        values=values.index_put((outside,), redirected.to(values.dtype)),
        weights=features.weights_or_none(),
        lengths=features.lengths(),
        offsets=features.offsets_or_none(),
        stride=features.stride(),
        length_per_key=features.length_per_key_or_none(),
        offset_per_key=features.offset_per_key_or_none(),
    )


class OutOfRangeRedirect(nn.Module):
    """The guard in front of folded tables: ids outside ``[0, N)`` go to the hash block of the remap.

    The folded remap array of a table is ``[row(0), ..., row(N - 1), hash_offset, ..., hash_offset +
    hash_rows - 1]``, so index ``N + hash_ids(id, hash_rows, seed)`` gives the row the float module's
    mapping gives an id it hashes. ``folded`` maps feature name -> (N, its table's mapping).
    """

    def __init__(self, feature_names: List[str], folded: Dict[str, Tuple[int, IdMapping]]) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        bounds = torch.tensor([[_INT64_MIN, _INT64_MAX]] * len(self.feature_names), dtype=torch.int64)
        consts = torch.zeros(len(self.feature_names), 5, dtype=torch.int64)
        for i, name in enumerate(self.feature_names):
            if name in folded:
                num_ids, mapping = folded[name]
                bounds[i] = torch.tensor([0, num_ids - 1])
                consts[i] = torch.tensor([mapping.hash_rows, *hash_coefficients(mapping.seed)])
        # Derived from the mappings at construction, not state: kept out of the state_dict.
        self.register_buffer("bounds", bounds, persistent=False)
        self.register_buffer("hash_consts", consts, persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return _redirect_out_of_range(features, self.feature_names, self.bounds, self.hash_consts)


class QuantLearnedHashEmbeddingBagCollection(nn.Module):
    """Inference module: remap in front (where needed), out-of-range guard, quantized EBC.

    Built by :func:`quantize_learned_hash_ebc`; ``forward(KJT) -> KeyedTensor`` with the keys and
    shapes of the float module. ``folded_tables`` lists the tables whose remap is in the kernel.
    """

    def __init__(
        self,
        remapper: Optional[IdRemapper],
        redirect: Optional[OutOfRangeRedirect],
        ebc: QuantEmbeddingBagCollection,
        folded_remap_nbytes: Dict[str, int],
        full_configs: List[EmbeddingBagConfig],
    ) -> None:
        super().__init__()
        self.remapper = remapper
        self.redirect = redirect
        self.ebc = ebc
        self._folded_remap_nbytes = dict(folded_remap_nbytes)
        self._full_configs = list(full_configs)

    @property
    def folded_tables(self) -> List[str]:
        return sorted(self._folded_remap_nbytes)

    def remap_nbytes(self) -> Dict[str, int]:
        """Bytes each mapped table's remap costs in this module: folded array or in-front mapping (with
        what applying the in-front mappings together adds, :meth:`IdRemapper.state_bytes`)."""
        out = dict(self._folded_remap_nbytes)
        if self.remapper is not None:
            out.update({name: self.remapper.state_bytes(name) for name in self.remapper.mappings})
        return out

    def full_embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._full_configs)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.ebc.embedding_bag_configs()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.remapper is not None:
            features = self.remapper(features)
        if self.redirect is not None:
            features = self.redirect(features)
        return self.ebc(features)


def _entry_id_range(mapping: IdMapping) -> Optional[Tuple[int, int]]:
    """(smallest, largest) id with an entry, None for a mapping without entries."""
    if mapping.storage == "dense":
        return mapping.offset, mapping.offset + mapping.table.numel() - 1
    keys, _ = mapping.stored_entries()
    return (int(keys[0]), int(keys[-1])) if keys.numel() else None


def _foldable(mapping: IdMapping, num_ids: int, fold_remap: str) -> bool:
    if fold_remap == "none" or (fold_remap == "dense" and mapping.storage != "dense"):
        return False
    entries = _entry_id_range(mapping)
    return (
        mapping.probes == 1
        and mapping.num_buckets is None  # one hash block per table: a bucketed mapping's hash rows are per bucket
        and (entries is None or (entries[0] >= 0 and entries[1] < num_ids))
        and num_ids + mapping.hash_rows <= _INT32_MAX
    )


def folded_remap(mapping: IdMapping, num_ids: int) -> torch.Tensor:
    """The int32 array the kernel gets for one table: rows of ids ``0..N-1``, then the hash block."""
    device = next(iter(mapping.buffers()), torch.empty(0)).device
    out = torch.empty(num_ids + mapping.hash_rows, dtype=torch.int32, device=device)
    for start in range(0, num_ids, _FOLD_CHUNK):  # chunks: int64 temporaries stay small for huge N
        stop = min(start + _FOLD_CHUNK, num_ids)
        out[start:stop] = mapping(torch.arange(start, stop, dtype=torch.int64, device=device)).to(torch.int32)
    out[num_ids:] = mapping.hash_offset + torch.arange(mapping.hash_rows, dtype=torch.int32, device=device)
    return out


def quantize_learned_hash_ebc(
    module: LearnedHashEmbeddingBagCollection,
    dtype: torch.dtype = torch.qint8,
    fold_remap: str = "dense",
) -> QuantLearnedHashEmbeddingBagCollection:
    """An int8 or fp16 inference copy of ``module`` (an unsharded learned-hash EBC; it is not changed).

    ``dtype``: ``torch.qint8``/``torch.quint8`` (row-wise int8 with an fp16 scale and bias per row)
    or ``torch.float16``. Outputs are float32. ``fold_remap``: ``"dense"``, ``"all"`` or ``"none"``,
    which tables get their remap folded into the lookup kernel (see the module docstring).

    Example::

        qebc = quantize_learned_hash_ebc(lh_ebc, dtype=torch.qint8)
        pooled = qebc(kjt)                      # KeyedTensor, within int8 error of lh_ebc(kjt)
        qebc.folded_tables, qebc.remap_nbytes() # what went into the kernel, and its bytes
    """
    if not isinstance(module, LearnedHashEmbeddingBagCollection):
        raise TypeError(
            f"expected an unsharded LearnedHashEmbeddingBagCollection, got {type(module).__name__}"
        )
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"dtype must be one of {QUANT_DTYPES}, got {dtype}")
    if fold_remap not in FOLD_CHOICES:
        raise ValueError(f"fold_remap must be one of {FOLD_CHOICES}, got {fold_remap!r}")
    float_ebc = module.ebc
    if any(p.is_meta for p in float_ebc.parameters()):
        raise ValueError("the module's tables are on the meta device; materialize them before quantizing")
    qconfig = QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=dtype),
    )
    # from_float reads the qconfig from the module: set it on a shallow copy, not on the caller's EBC.
    float_copy = copy.copy(float_ebc)
    float_copy.qconfig = qconfig
    qebc = QuantEmbeddingBagCollection.from_float(float_copy)

    full = {t.name: t for t in module.full_embedding_bag_configs()}
    mappings = module.mappings
    feature_names = [f for t in module.full_embedding_bag_configs() for f in t.feature_names]
    folded: Dict[str, Tuple[int, IdMapping]] = {}
    folded_nbytes: Dict[str, int] = {}
    for tbe in qebc._emb_modules:
        tables = [spec[0] for spec in tbe.embedding_specs]
        one_feature_per_table = len(tbe.feature_table_map) == len(tables)
        if fold_remap != "none" and not one_feature_per_table and any(n in mappings for n in tables):
            logger.info("tables %s share a TBE with a multi-feature table: their remaps stay in front", tables)
        remaps: List[Optional[torch.Tensor]] = []
        for name in tables:
            mapping = mappings.get(name)
            num_ids = full[name].num_embeddings
            if mapping is not None and one_feature_per_table and _foldable(mapping, num_ids, fold_remap):
                remaps.append(folded_remap(mapping, num_ids).to(tbe.current_device))
                folded_nbytes[name] = remaps[-1].numel() * remaps[-1].element_size()
                folded[full[name].feature_names[0]] = (num_ids, mapping)
            else:
                remaps.append(None)
        if any(r is not None for r in remaps):
            tbe.set_index_remappings(remaps)

    folded_tables = set(folded_nbytes)
    in_front = {name: copy.deepcopy(m) for name, m in mappings.items() if name not in folded_tables}
    remapper = IdRemapper(module.full_embedding_bag_configs(), in_front) if in_front else None
    redirect = OutOfRangeRedirect(feature_names, folded).to(qebc.device) if folded else None
    return QuantLearnedHashEmbeddingBagCollection(
        remapper, redirect, qebc, folded_nbytes, module.full_embedding_bag_configs()
    )


def script_for_serving(module: QuantLearnedHashEmbeddingBagCollection) -> torch.jit.ScriptModule:
    """TorchScript of a quantized module whose mapped tables are all folded (TorchRec's fx path).

    Raises ``ValueError`` when a table is remapped in front: ``IdRemapper`` does not trace.
    """
    from torchrec.fx import symbolic_trace

    if module.remapper is not None:
        raise ValueError(
            f"tables {sorted(module.remapper.mappings)} are remapped in front of the kernel; IdRemapper "
            f"neither traces with torch.fx nor scripts. fold_remap='all' folds every eligible table (not double "
            f"hashing, not a TBE with a table shared by features); else serve in eager mode"
        )
    return torch.jit.script(symbolic_trace(module))
