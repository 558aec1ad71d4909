"""Mappings co-sharded row-wise with their tables, through TorchRec's managed-collision engine.

A bucketed :class:`~lhf_torchrec.mapping.id_mapping.IdMapping` (B buckets, M rows, R = M / B rows per
bucket) is a function of the bucket hash ``h = bucket_hash(id, B, seed)`` only, and bucket b owns the
rows ``[b * R, (b + 1) * R)``. :class:`CoShardedIdRemap` writes it as a frozen TorchRec
``ManagedCollisionModule``: ``preprocess`` turns raw ids into h on the rank that read them, TorchRec's
sharded ``ManagedCollisionCollection`` block-bucketizes h into B ranges (``input_size() = IHS``,
``buckets() = B``) and sends each to the rank that owns the bucket's rows, where ``remap`` gives the
global row. So with row-wise sharding every rank holds only its buckets' entries.

Storage, one block of rows per bucket (TorchRec shards every managed-collision buffer by its first
dimension, which must be the rank's rows; :func:`~lhf_torchrec.mapping.buckets.cosharded_slots` gives K):

* ``_keys`` (M, K) int64: the bucket's entry hashes, sorted, padded with its last key (the first h of
  the bucket when it has none), so the flattened keys stay sorted and one ``searchsorted`` finds an h;
* ``_slots`` (M, K) int32: each entry's row inside the bucket, -1 for the padding of an empty bucket;
* ``_hash_regions`` (M,) int32: at ``b * R`` the offset, at ``b * R + 1`` the rows of the bucket's
  hash region (R >= 2 by :data:`~lhf_torchrec.mapping.buckets.MIN_ROWS_PER_BUCKET`), 0 elsewhere.

:class:`CoShardedLearnedHashEBC` puts the tables whose mapping co-shards (bucketed, one row per id) in
TorchRec's ``ManagedCollisionEmbeddingBagCollection`` and the others in a
:class:`~lhf_torchrec.modules.learned_hash_ebc.LearnedHashEmbeddingBagCollection` (replicated remap),
and returns one ``KeyedTensor`` as the EBC it replaces. Tables with several features co-shard.
Double hashing (``probes == 2``) cannot: it turns an id into two rows, and the engine's ``remap``
cannot grow bags. Weighted EBCs keep every remap replicated (:data:`WEIGHTED_REFUSAL`).
"""

from typing import Collection, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.types import Awaitable
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection, ManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from lhf_torchrec.mapping.buckets import cosharded_slots
from lhf_torchrec.mapping.hashing import bucket_hash, hash_coefficients, hash_with_coefficients, input_hash_size
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection, compressed_configs


# Measured with torchrec 1.9.2 on 2 gloo ranks (tests/distributed/test_cosharded.py was written for it):
# forward, backward and step are exact for unweighted KJTs, but with weights the sharded
# managed-collision EBC pools other values than the unsharded one (max diff ~1e-2).
WEIGHTED_REFUSAL = ("its features are weighted, and TorchRec's sharded managed-collision EBC pools weighted "
                    "features differently from the unsharded module (torchrec 1.9.2); it keeps a replicated remap")


def cosharding_refusal(mapping: IdMapping) -> Optional[str]:
    """Why ``mapping`` cannot co-shard with its table, or None when it can."""
    if mapping.num_buckets is None:
        return "not bucketed: fit it with num_buckets"
    if mapping.probes != 1:
        return (f"{mapping.probes} probes per id: method '{mapping.method}' gives a hashed id two rows, and "
                "TorchRec's managed-collision remap maps one id to one row (it cannot grow bags)")
    return None


class CoShardedIdRemap(ManagedCollisionModule):
    """A frozen bucketed mapping as a TorchRec managed-collision module (see the module docstring).

    Built by :meth:`from_mapping`; TorchRec's sharder calls :meth:`rebuild_with_output_id_range` to
    keep one rank's buckets. The mapping's description (method, params, layout, ...) travels as
    attributes so that :meth:`to_mapping` gives back the :class:`IdMapping` of the buffers.
    """

    def __init__(
        self,
        num_rows: int,
        num_buckets: int,
        seed: int,
        slots_per_row: int,
        *,
        device: torch.device,
        description: Mapping,
        bucket_range: Optional[Tuple[int, int]] = None,
        state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        output_segments: Optional[List[int]] = None,
    ) -> None:
        self.table_name = str(description.get("table_name", "table"))
        if num_rows % num_buckets or num_rows // num_buckets < 2:
            raise ValueError(f"table '{self.table_name}': {num_rows} rows do not split into {num_buckets} buckets "
                             "of at least 2 rows")
        super().__init__(device=device, output_segments=list(output_segments or [0, num_rows]))
        self.num_rows, self.num_buckets, self.seed = int(num_rows), int(num_buckets), int(seed)
        self.slots_per_row = int(slots_per_row)
        self.description = dict(description)
        self.rows_per_bucket = num_rows // num_buckets
        self._input_hash_size = input_hash_size(num_buckets)
        self._bucket_width = self._input_hash_size // num_buckets
        self.first_bucket, self.end_bucket = bucket_range or (0, num_buckets)
        rows = (self.end_bucket - self.first_bucket) * self.rows_per_bucket
        if state is None:  # no entries: the padding of empty buckets (filled by from_mapping or a checkpoint)
            first = torch.arange(self.first_bucket, self.end_bucket, dtype=torch.int64, device=device)
            keys = (first * self._bucket_width).repeat_interleave(self.rows_per_bucket * slots_per_row)
            state = (keys.view(rows, slots_per_row),
                     torch.full((rows, slots_per_row), -1, dtype=torch.int32, device=device),
                     torch.zeros(rows, dtype=torch.int32, device=device))
        keys, slots, regions = state
        if keys.shape != (rows, slots_per_row) or slots.shape != keys.shape or regions.shape != (rows,):
            raise ValueError(f"table '{self.table_name}': co-sharded state of shapes {tuple(keys.shape)}, "
                             f"{tuple(slots.shape)}, {tuple(regions.shape)} does not fit {rows} rows x "
                             f"{slots_per_row} slots")
        self.register_buffer("_keys", keys)
        self.register_buffer("_slots", slots)
        self.register_buffer("_hash_regions", regions)
        # The hash's seeded coefficients, derived from the seed: not state (and not sharded by TorchRec).
        self.register_buffer("_hash_coefficients", torch.tensor(hash_coefficients(seed), dtype=torch.int64,
                                                                device=device), persistent=False)
        # A checkpoint of another world size carries its own segments: validate_state puts these back.
        self._own_output_segments = self._output_segments_tensor

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, mapping: IdMapping, device: Optional[torch.device] = None) -> "CoShardedIdRemap":
        """The co-sharded twin of a bucketed, one-row-per-id ``mapping`` (every bucket's entries)."""
        refusal = cosharding_refusal(mapping)
        if refusal is not None:
            raise ValueError(f"table '{mapping.table_name}': the mapping cannot co-shard with its table: {refusal}")
        num_rows, num_buckets = mapping.num_rows, mapping.num_buckets
        counts = mapping.bucket_entry_counts()
        slots_per_row = cosharded_slots(num_rows, num_buckets, int(counts.max()))
        device = torch.device(device) if device is not None else mapping.bucket_hash_regions.device
        entry_keys, entry_rows = mapping.stored_entries()
        description = {**mapping.metadata(), "table_name": mapping.table_name}
        return cls.from_bucket_entries(num_rows, num_buckets, mapping.seed, entry_keys, entry_rows, counts,
                                       mapping.bucket_hash_regions, slots_per_row=slots_per_row,
                                       description=description, device=device)

    @classmethod
    def from_bucket_entries(
        cls,
        num_rows: int,
        num_buckets: int,
        seed: int,
        entry_keys: torch.Tensor,
        entry_rows: torch.Tensor,
        bucket_counts: torch.Tensor,
        bucket_hash_regions: torch.Tensor,
        *,
        slots_per_row: int,
        description: Mapping,
        first_bucket: int = 0,
        device: Optional[torch.device] = None,
    ) -> "CoShardedIdRemap":
        """The module of the buckets ``[first_bucket, first_bucket + len(bucket_counts))`` only (all of
        them: :meth:`from_mapping`; one rank's: built from its shard of a distributed fit, as
        :meth:`rebuild_with_output_id_range` would cut it). ``entry_keys``: the buckets' entry hashes,
        sorted (so in bucket order); ``entry_rows``: their rows in the whole table; ``bucket_counts``:
        entries per bucket; ``bucket_hash_regions``: (buckets, 2) offset and rows of each hash region;
        ``slots_per_row``: K of the whole table (its fullest bucket)."""
        device = torch.device(device) if device is not None else entry_keys.device
        per_bucket = num_rows // num_buckets
        num_own = int(bucket_counts.numel())
        block = per_bucket * slots_per_row
        width = input_hash_size(num_buckets) // num_buckets
        entry_keys, entry_rows = entry_keys.to(device, torch.int64), entry_rows.to(device, torch.int64)
        counts = bucket_counts.to(device, torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        # Position j of bucket b's block holds entry starts[b] + min(j, counts[b] - 1): the entries in
        # order, then the last one repeated. Empty buckets hold their first h with slot -1.
        local = torch.arange(num_own, device=device).repeat_interleave(block)
        bucket = local + first_bucket
        position = torch.arange(block, device=device).repeat(num_own)
        count = counts.index_select(0, local)
        source = (starts.index_select(0, local) + torch.minimum(position, count - 1)).clamp(min=0)
        empty = count == 0
        if entry_keys.numel():
            keys = torch.where(empty, bucket * width, entry_keys.index_select(0, source))
            slots = torch.where(empty, -1, entry_rows.index_select(0, source) - bucket * per_bucket)
        else:
            keys, slots = bucket * width, torch.full_like(bucket, -1)
        rows = num_own * per_bucket
        regions = torch.zeros(num_own, per_bucket, dtype=torch.int32, device=device)
        regions[:, :2] = bucket_hash_regions.to(device)
        return cls(num_rows, num_buckets, seed, slots_per_row, device=device, description=description,
                   bucket_range=(first_bucket, first_bucket + num_own),
                   state=(keys.view(rows, slots_per_row), slots.to(torch.int32).view(rows, slots_per_row),
                          regions.view(rows)))

    def to_mapping(self) -> IdMapping:
        """The :class:`IdMapping` these buffers hold (an unsharded module only: all buckets)."""
        if (self.first_bucket, self.end_bucket) != (0, self.num_buckets):
            raise ValueError(f"table '{self.table_name}': this module holds buckets [{self.first_bucket}, "
                             f"{self.end_bucket}) only; load the checkpoint into the unsharded module first")
        keys, slots = self._keys.reshape(-1).cpu(), self._slots.reshape(-1).to(torch.int64).cpu()
        first_of_run = torch.ones_like(keys, dtype=torch.bool)
        first_of_run[1:] = keys[1:] != keys[:-1]
        real = first_of_run & (slots >= 0)
        position = torch.arange(keys.numel())
        base = torch.div(position, self.rows_per_bucket * self.slots_per_row, rounding_mode="floor")
        rows = (base * self.rows_per_bucket + slots)[real]
        regions = self._hash_regions.cpu().view(self.num_buckets, self.rows_per_bucket)[:, :2].contiguous()
        meta = self.description
        entries = IdMapping(
            self.num_rows, hash_offset=meta["hash_offset"], hash_rows=meta["hash_rows"], probes=1, seed=self.seed,
            storage="sorted" if bool(real.any()) else "none", offset=0,
            tensors={"bucket_hash_regions": regions, **({"keys": keys[real].contiguous(), "values": rows.to(torch.int32)}
                                                          if bool(real.any()) else {})},
            num_entries=int(real.sum()), method=meta["method"], params=meta["params"], layout=meta["layout"],
            table_name=self.table_name, entry_share=meta.get("entry_share"), num_buckets=self.num_buckets,
        )
        # In the storage the mapping was fitted in (storage_cost's choice), so that fingerprints match.
        return entries.with_storage(meta["storage"])

    # ------------------------------------------------------------------ ManagedCollisionModule
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        """Raw ids -> bucket hashes (on the rank that read them, before the input all-to-all)."""
        return {name: _with_values(jt, bucket_hash(jt.values(), self.num_buckets, self.seed))
                for name, jt in features.items()}

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features  # frozen: nothing to learn from traffic

    @torch.no_grad()
    def remap(
        self,
        features: Dict[str, JaggedTensor],
        mutate_miss_lengths: bool = True,
        write_weights: Optional[torch.Tensor] = None,
    ) -> Dict[str, JaggedTensor]:
        """Bucket hashes of this rank's buckets -> global rows (the sharded collection subtracts the
        shard offset). An h of another rank's bucket fails the ``index_select`` of its region."""
        keys, slots = self._keys.view(-1), self._slots.view(-1)
        return {name: _with_values(jt, self._rows_of(jt.values(), keys, slots)) for name, jt in features.items()}

    def _rows_of(self, h: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        position = torch.searchsorted(keys, h).clamp_(max=keys.numel() - 1)
        slot = slots.index_select(0, position).to(torch.int64)
        hit = (keys.index_select(0, position) == h) & (slot >= 0)
        bucket = torch.div(h, self._bucket_width, rounding_mode="floor")
        first_row = (bucket - self.first_bucket) * self.rows_per_bucket  # of the bucket, in this module's rows
        offset = self._hash_regions.index_select(0, first_row).to(torch.int64)
        hash_rows = self._hash_regions.index_select(0, first_row + 1).to(torch.int64)
        coefficients = torch.cat([hash_rows.unsqueeze(1), self._hash_coefficients.expand(h.numel(), 4)], dim=1)
        inside = torch.where(hit, slot, offset + hash_with_coefficients(h, coefficients))
        return bucket * self.rows_per_bucket + inside

    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True) -> Dict[str, JaggedTensor]:
        return self.remap(self.profile(self.preprocess(features)))

    def evict(self) -> Optional[torch.Tensor]:
        return None

    def output_size(self) -> int:
        return (self.end_bucket - self.first_bucket) * self.rows_per_bucket

    def input_size(self) -> int:
        return self._input_hash_size

    def buckets(self) -> int:
        return self.num_buckets  # all of the table's, also after a rebuild: drives the input bucketization

    def open_slots(self) -> torch.Tensor:
        return torch.tensor([0])

    def validate_state(self) -> None:
        """After a load: the keys are sorted and each block holds its own bucket's hashes."""
        if self._keys.device.type != "meta":
            keys = self._keys.view(-1)
            block = torch.div(torch.arange(keys.numel(), device=keys.device),
                              self.rows_per_bucket * self.slots_per_row, rounding_mode="floor")
            own = torch.div(keys, self._bucket_width, rounding_mode="floor") == block + self.first_bucket
            if not bool(own.all()) or not bool((keys[1:] >= keys[:-1]).all()):
                raise ValueError(f"table '{self.table_name}': the loaded co-sharded mapping does not hold sorted "
                                 f"keys of buckets [{self.first_bucket}, {self.end_bucket}) in their blocks: it was "
                                 f"saved with another bucket count or is corrupted")
        self._output_segments_tensor = self._own_output_segments

    def rebuild_with_output_id_range(
        self, output_id_range: Tuple[int, int], output_segments: List[int], device: Optional[torch.device] = None
    ) -> "CoShardedIdRemap":
        """This module's buckets in rows ``[start, end)`` (a row-wise shard), as a new module."""
        start, end = output_id_range
        if start % self.rows_per_bucket or end % self.rows_per_bucket:
            raise ValueError(
                f"table '{self.table_name}': the shard of rows [{start}, {end}) cuts a bucket of "
                f"{self.rows_per_bucket} rows; co-sharding needs whole buckets per rank: a world size that divides "
                f"the {self.num_buckets} buckets, or row_wise(num_buckets={self.num_buckets})")
        low = start - self.first_bucket * self.rows_per_bucket
        high = end - self.first_bucket * self.rows_per_bucket
        if not 0 <= low <= high <= self._keys.shape[0]:
            raise ValueError(f"table '{self.table_name}': rows [{start}, {end}) are not among this module's")
        device = torch.device(device) if device is not None else self._keys.device
        state = None
        if self._keys.device.type != "meta" and device.type != "meta":
            state = (self._keys[low:high].to(device).clone(), self._slots[low:high].to(device).clone(),
                     self._hash_regions[low:high].to(device).clone())
        return type(self)(self.num_rows, self.num_buckets, self.seed, self.slots_per_row, device=device,
                          description=self.description,
                          bucket_range=(start // self.rows_per_bucket, end // self.rows_per_bucket), state=state,
                          output_segments=output_segments)

    def extra_repr(self) -> str:
        return (f"table={self.table_name!r}, rows={self.num_rows}, buckets=[{self.first_bucket}, {self.end_bucket}) "
                f"of {self.num_buckets}, slots_per_row={self.slots_per_row}")


def _with_values(jt: JaggedTensor, values: torch.Tensor) -> JaggedTensor:
    return JaggedTensor(values=values, lengths=jt.lengths(), offsets=jt.offsets(), weights=jt.weights_or_none())


class CoShardedLearnedHashEBC(nn.Module):
    """Drop-in replacement for an ``EmbeddingBagCollection`` whose co-shardable tables keep their
    mappings with their rows.

    Args:
        tables: the original (full-size) table configs.
        mappings: table name -> fitted :class:`IdMapping`; tables without one stay full size.
        cosharded_tables: the tables to co-shard (default: every table whose mapping can, see
            :func:`cosharding_refusal`, none when ``is_weighted``); each must be able to. The others
            keep a replicated remap.
        device: device of the tables (``meta`` for deferred init under DMP); the remaps never go to
            ``meta`` (DMP would leave them empty).
        is_weighted: as for ``EmbeddingBagCollection``.

    Children: ``cosharded`` (TorchRec's ``ManagedCollisionEmbeddingBagCollection``: shard it row-wise
    with :class:`~lhf_torchrec.distributed.sharder.CoShardedEBCSharder`) and ``replicated`` (a
    :class:`LearnedHashEmbeddingBagCollection`, sharded by ``LearnedHashEBCSharder``); either is None
    when it has no table. ``forward(KJT) -> KeyedTensor`` with the keys of the original tables' features.

    Example::

        ebc = CoShardedLearnedHashEBC(tables, fit_mappings(..., num_buckets=64).compression.mappings)
        pooled = ebc(kjt)   # as LearnedHashEmbeddingBagCollection(tables, mappings)(kjt)
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        mappings: Mapping[str, IdMapping],
        cosharded_tables: Optional[Collection[str]] = None,
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        compressed = compressed_configs(list(tables), mappings)  # checks the mappings against the tables
        if cosharded_tables is None:
            cosharded_tables = [] if is_weighted else [n for n, m in mappings.items() if cosharding_refusal(m) is None]
        for name in cosharded_tables:
            if name not in mappings:
                raise ValueError(f"table '{name}' is to co-shard but has no mapping (mappings: {sorted(mappings)})")
            refusal = WEIGHTED_REFUSAL if is_weighted else cosharding_refusal(mappings[name])
            if refusal is not None:
                raise ValueError(f"table '{name}' cannot co-shard with its mapping: {refusal}")
        chosen = set(cosharded_tables)
        self.full_configs = list(tables)
        self.feature_names = [f for t in tables for f in t.feature_names]
        device = torch.device(device) if device is not None else None
        remap_device = None if device is None or device.type == "meta" else device
        cosharded_configs = [c for c in compressed if c.name in chosen]
        self.cosharded: Optional[ManagedCollisionEmbeddingBagCollection] = None
        if cosharded_configs:
            remaps = {c.name: CoShardedIdRemap.from_mapping(mappings[c.name], remap_device) for c in cosharded_configs}
            self.cosharded = ManagedCollisionEmbeddingBagCollection(
                EmbeddingBagCollection(tables=cosharded_configs, device=device, is_weighted=is_weighted),
                ManagedCollisionCollection(remaps, cosharded_configs),
            )
        others = [t for t in tables if t.name not in chosen]
        self.replicated: Optional[LearnedHashEmbeddingBagCollection] = None
        if others:
            self.replicated = LearnedHashEmbeddingBagCollection(
                others, {t.name: mappings[t.name] for t in others if t.name in mappings}, device=device,
                is_weighted=is_weighted)
        self._replicated_features = [f for t in others for f in t.feature_names]

    @property
    def cosharded_tables(self) -> List[str]:
        """Names of the tables whose mapping is co-sharded (in the managed-collision EBC)."""
        if self.cosharded is None:
            return []
        return [c.name for c in self.cosharded._embedding_module.embedding_bag_configs()]

    def full_embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self.full_configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        _check_features(features, self.feature_names)
        pooled: List[KeyedTensor] = []
        if self.cosharded is not None:
            # The whole KJT: TorchRec's managed-collision EBC picks its own features, and its input
            # comes straight from the batch, so TrainPipelineSparseDist pipelines its input dist.
            pooled.append(self.cosharded(features)[0])
        if self.replicated is not None:
            pooled.append(self.replicated(_select_features(features, self._replicated_features)))
        return _merge_pooled(pooled, self.feature_names)

    def to_learned_hash_ebc(self) -> LearnedHashEmbeddingBagCollection:
        """The same tables, mappings and weights as one :class:`LearnedHashEmbeddingBagCollection` with
        replicated remaps (an unsharded module only), e.g. to quantize it for serving from a
        co-sharded checkpoint loaded into this module."""
        mappings: Dict[str, IdMapping] = {}
        weights: Dict[str, torch.Tensor] = {}
        if self.replicated is not None:
            mappings.update(self.replicated.mappings)
            weights.update({n: bag.weight for n, bag in self.replicated.ebc.embedding_bags.items()})
        if self.cosharded is not None:
            remaps = self.cosharded._managed_collision_collection._managed_collision_modules
            mappings.update({name: remap.to_mapping() for name, remap in remaps.items()})
            weights.update({n: bag.weight for n, bag in self.cosharded._embedding_module.embedding_bags.items()})
        device = next(iter(weights.values())).device
        out = LearnedHashEmbeddingBagCollection(self.full_configs, mappings, device=device,
                                                is_weighted=self._is_weighted())
        with torch.no_grad():
            for name, bag in out.ebc.embedding_bags.items():
                bag.weight.copy_(weights[name])
        return out

    def _is_weighted(self) -> bool:
        part = self.replicated if self.replicated is not None else self.cosharded._embedding_module
        return part.is_weighted()


# Leaves for torch.fx (TrainPipelineSparseDist traces the model): Python over the KJT's keys does
# not trace. The replicated child, whose input is a selection of the KJT, then runs in the model's
# forward rather than in the pipeline.
@torch.fx.wrap
def _check_features(features: KeyedJaggedTensor, feature_names: List[str]) -> None:
    keys = features.keys()
    if sorted(keys) != sorted(feature_names):
        raise KeyError(f"the input KeyedJaggedTensor has features {keys}; this module needs exactly "
                       f"{sorted(feature_names)} (missing {sorted(set(feature_names) - set(keys))}, unknown "
                       f"{sorted(set(keys) - set(feature_names))})")


@torch.fx.wrap
def _select_features(features: KeyedJaggedTensor, names: List[str]) -> KeyedJaggedTensor:
    index = {k: i for i, k in enumerate(features.keys())}
    return features.permute([index[k] for k in names])


@torch.fx.wrap
def _merge_pooled(pooled: List[KeyedTensor], feature_names: List[str]) -> KeyedTensor:
    """One KeyedTensor, in the original features' order; sharded children return awaitables."""
    by_feature: Dict[str, torch.Tensor] = {}
    for part in pooled:
        by_feature.update((part.wait() if isinstance(part, Awaitable) else part).to_dict())
    return KeyedTensor.from_tensor_list(feature_names, [by_feature[f] for f in feature_names])
