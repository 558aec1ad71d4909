"""Sharding a remapped EBC with TorchRec: the remap runs inside ``input_dist``, or after it on
the rank that owns a table-wise table; a co-sharded mapping (:class:`CoShardedEBCSharder`, at the
end) runs on the rank that owns the id's rows.

:class:`RemappedEBCSharder` turns a :class:`RemappedEmbeddingBagCollection` (any method's remap)
into a :class:`ShardedRemappedEBC`; :class:`LearnedHashEBCSharder` does the same for the learned
hash's :class:`LearnedHashEmbeddingBagCollection` (DMP picks sharders by exact module type). The
inner EBC is sharded by TorchRec's stock ``EmbeddingBagCollectionSharder`` with any sharding type
and kernel it supports. Where the remap runs depends on the table's sharding type:

* ``table_wise``, for a table with remap state of a :class:`PerFeatureRemap` (the learned hash,
  MCH): its features travel as raw ids in the KJT all-to-all and the one rank that owns the table
  remaps what it receives, just before the lookup; the other ranks drop the table's mapping when
  sharding, so it costs memory on one rank only. Bags that grow (double hashing) are fine there:
  the table-wise lookup and output dist depend on the number of bags, not their lengths.
* every other case (``row_wise``, ``table_row_wise``, ``column_wise``, ``table_column_wise``,
  ``data_parallel``; and QR and CCE, which rewrite a table into several stock tables or change the
  batch): replicated, at the start of ``input_dist``, before the all-to-all, on every rank. Row-wise
  input dists route ids by row, so the rows must be known before the all-to-all (co-sharding a
  mapping row-wise takes a bucketed mapping and TorchRec's managed-collision engine:
  :class:`CoShardedEBCSharder`); column-wise and data-parallel tables are looked up on several ranks.

Both run inside the input dist / lookup of the sharded module, so ``TrainPipelineSparseDist``
overlaps the replicated remap with the previous batch like any input distribution; ``postprocess``
runs when the pooled output is awaited.

The remap must be the same function on every rank, else the same id would reach different rows
depending on which rank read it. DMP does not synchronize buffers, so the sharder compares remap
fingerprints across ranks when it shards (before dropping the mappings a rank does not own), and
raises if any rank differs.

Checkpointing with ``torch.distributed.checkpoint`` (DCP). ``dmp.state_dict()`` holds the tables
as sharded tensors and, under ``<path>.remapper.mappings.<table>.``, each mapping's buffers (full
tensors, the same on every rank that holds them: all ranks, or a table-wise table's owner only) and
its fingerprint (``_extra_state``). DCP writes each key once, from whichever rank holds it, so a
checkpoint is the same whatever the plan, and loads under another plan (other owners, row-wise)::

    dcp.save(dmp.state_dict(), checkpoint_id=path)

    # later, possibly with another plan: build the same model with the same mappings (e.g.
    # ``load_mappings`` of the file they were saved to), shard it, then
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=path)   # in place; refuses tensors of another shape
    dmp.load_state_dict(state)            # required: checks every mapping against the checkpoint's

A mapping with other rows than the checkpoint's fails in ``dcp.load`` (``Size mismatch ... for
<path>.ebc.embedding_bags.<table>.weight``); a mapping of the same shapes but another function
(other seed, entries or method) fails in ``load_state_dict`` with a ``ValueError`` naming the table.
Do not skip ``load_state_dict``: ``dcp.load`` writes the mapping buffers in place and checks nothing,
so a mismatch of the second kind would go unnoticed.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    Multistreamable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lhf_torchrec.modules.cosharded import CoShardedIdRemap
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap, PerFeatureRemap, RemappedEmbeddingBagCollection

logger = logging.getLogger(__name__)


def check_identical_across_ranks(fingerprints: Dict[str, str], env: ShardingEnv, what: str) -> None:
    """Raises ``RuntimeError`` naming the ranks and tables whose fingerprint differs from rank 0's.

    ``fingerprints``: table name -> fingerprint of this rank's remap state (``what`` names it).
    """
    pg = env.process_group
    if pg is None or not dist.is_initialized() or env.world_size == 1:
        return
    gathered: List[Optional[Dict[str, str]]] = [None] * env.world_size
    dist.all_gather_object(gathered, dict(fingerprints), group=pg)
    reference = gathered[0] or {}
    bad = [
        f"rank {rank}: " + ", ".join(
            sorted(t for t in set(reference) | set(other or {}) if reference.get(t) != (other or {}).get(t))
        )
        for rank, other in enumerate(gathered)
        if other != reference
    ]
    if bad:
        raise RuntimeError(
            f"the {what} differ across ranks (the same id would reach different rows); "
            f"differences from rank 0 in tables: {'; '.join(bad)}. Fit them with the same data and seed, "
            "or load the same file on every rank."
        )


@dataclass
class RemappedEBCContext(EmbeddingBagCollectionContext):
    """The stock EBC's context plus what ``postprocess`` needs about the batch."""

    batch: Optional[Multistreamable] = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.batch is not None:
            self.batch.record_stream(stream)


class _Postprocessed(LazyAwaitable[KeyedTensor]):
    def __init__(self, pooled: LazyAwaitable[KeyedTensor], remapper: EmbeddingRemap,
                 batch: Optional[Multistreamable]) -> None:
        super().__init__()
        self._pooled = pooled
        self._remapper = remapper
        self._batch = batch

    def _wait_impl(self) -> KeyedTensor:
        return self._remapper.postprocess(LazyAwaitable._wait_async(self._pooled), self._batch)


class ShardedRemappedEBC(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, RemappedEBCContext]
):
    """The sharded twin of :class:`RemappedEmbeddingBagCollection` and its subclasses (sharded
    tables; the remap replicated, or on the owning rank only for tables planned table-wise).

    Where each table's remap runs:

    * planned ``table_wise``, when the remap is a :class:`PerFeatureRemap` (learned hash, MCH) and
      the table has remap state: on the rank that owns the table, after the input all-to-all (its
      features travel as raw ids); the other ranks drop the table's state when sharding.
    * every other case (row-wise, table-row-wise, column-wise, data-parallel; remaps that rewrite
      a table into several stock tables or change the batch, QR and CCE): on every rank, at the
      start of ``input_dist``, replicated.
    """

    def __init__(
        self,
        module: RemappedEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
        ebc_sharder: EmbeddingBagCollectionSharder,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        check_identical_across_ranks(module.remapper.fingerprint(), env, f"'{module.remapper.method}' remaps")
        self._unsharded_type = type(module)
        owners = table_owners(module.remapper, params)
        # Tables remapped on their owner: every rank sends their raw ids, the owner remaps what it receives.
        self._remapped_on_owner: FrozenSet[str] = frozenset(owners)
        self._owned: FrozenSet[str] = frozenset(t for t, rank in owners.items() if rank == env.rank)
        remapper = module.remapper
        if owners:
            assert isinstance(remapper, PerFeatureRemap)
            remapper = remapper.without_tables(self._remapped_on_owner - self._owned)
        self.remapper: EmbeddingRemap = remapper.to(device)
        self._device = device
        self._env = env
        self.ebc: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.ebc, params, env, device, module_fqn=append_prefix(module_fqn or "", "ebc")
        )

    def create_context(self) -> RemappedEBCContext:
        return RemappedEBCContext()

    def input_dist(self, ctx: RemappedEBCContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        with torch.no_grad():
            if self._remapped_on_owner:
                assert isinstance(self.remapper, PerFeatureRemap)
                inner, ctx.batch = self.remapper.preprocess(features, raw=self._remapped_on_owner)
            else:
                inner, ctx.batch = self.remapper.preprocess(features, self._common_stride(features))
        return self.ebc.input_dist(ctx, inner)

    def _remap_owned(self, dist_input: KJTList) -> KJTList:
        """The features of the tables this rank owns and remaps, remapped (they arrive as raw ids)."""
        if not self._owned:
            return dist_input
        assert isinstance(self.remapper, PerFeatureRemap)
        with torch.no_grad():
            return KJTList([self.remapper.remap_features(kjt, self._owned) for kjt in dist_input])

    def _common_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        """The largest :meth:`EmbeddingRemap.inner_stride` over the ranks: the backward of row-wise
        output dists needs the same batch size on every rank (one small all-reduce per batch; every
        rank reads the same number of batches)."""
        stride = self.remapper.inner_stride(features)
        if stride is None or self._env.world_size == 1 or not dist.is_initialized():
            return stride
        agreed = torch.tensor([stride], dtype=torch.int64, device=self._device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._env.process_group)
        return int(agreed.item())

    def compute(self, ctx: RemappedEBCContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self.ebc.compute(ctx, self._remap_owned(dist_input))

    def output_dist(self, ctx: RemappedEBCContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return _Postprocessed(self.ebc.output_dist(ctx, output), self.remapper, ctx.batch)

    def compute_and_output_dist(self, ctx: RemappedEBCContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return _Postprocessed(self.ebc.compute_and_output_dist(ctx, self._remap_owned(input)), self.remapper,
                              ctx.batch)

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # DDP must leave the sharded tables alone; the remap has buffers only.
        yield from self.ebc.sharded_parameter_names(append_prefix(prefix, "ebc"))

    @property
    def unsharded_module_type(self) -> Type[RemappedEmbeddingBagCollection]:
        return self._unsharded_type


def table_owners(remapper: EmbeddingRemap, params: Dict[str, ParameterSharding]) -> Dict[str, int]:
    """Table -> the rank that owns it, for the tables whose remap runs on their owner only: tables
    with remap state of a :class:`PerFeatureRemap`, planned ``table_wise``."""
    if not isinstance(remapper, PerFeatureRemap):
        return {}
    owners = {}
    for table in remapper.stateful_tables():
        (inner,) = remapper.tables_of(table)
        sharding = params.get(inner.name)
        if sharding is not None and sharding.sharding_type == ShardingType.TABLE_WISE.value:
            (owners[table],) = sharding.ranks
    return owners


class RemappedEBCSharder(BaseEmbeddingSharder[nn.Module]):
    """Shards :class:`RemappedEmbeddingBagCollection` (any method's remap) into a
    :class:`ShardedRemappedEBC`, with TorchRec's EBC sharder underneath for the tables.

    Offers every sharding type the EBC sharder offers; on CPU it adds ``row_wise`` and
    ``table_row_wise``, which TorchRec's CPU planner leaves out although they run on CPU/gloo.
    """

    module_cls: Type[RemappedEmbeddingBagCollection] = RemappedEmbeddingBagCollection

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
    ) -> None:
        self._ebc_sharder = ebc_sharder or EmbeddingBagCollectionSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
        )
        super().__init__(
            fused_params=self._ebc_sharder.fused_params, qcomm_codecs_registry=self._ebc_sharder.qcomm_codecs_registry
        )

    @property
    def module_type(self) -> Type[nn.Module]:
        return self.module_cls

    def shardable_parameters(self, module: nn.Module) -> Dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module.ebc)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(self._ebc_sharder.sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    def shard(
        self,
        module: RemappedEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> nn.Module:
        return ShardedRemappedEBC(module, params, env, device or torch.device("cpu"), self._ebc_sharder, module_fqn)


class LearnedHashEBCSharder(RemappedEBCSharder):
    """Shards :class:`LearnedHashEmbeddingBagCollection`: the tables sharded by TorchRec's EBC
    sharder with any sharding type it supports (plus row-wise ones on CPU), each mapping replicated
    or, for a table planned table-wise, on the rank that owns the table.

    Example::

        apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.05})
        sharders = [LearnedHashEBCSharder()]
        plan = LearnedHashPlanner(topology).collective_plan(model, sharders, pg)
        model = DistributedModelParallel(model, plan=plan, sharders=sharders, device=device)
    """

    module_cls = LearnedHashEmbeddingBagCollection


def cosharding_world_sizes(num_buckets: int) -> List[int]:
    """The world sizes a table of ``num_buckets`` buckets co-shards on: the divisors of B."""
    return [w for w in range(1, num_buckets + 1) if num_buckets % w == 0]


class CoShardedEBCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """Shards the co-sharded part of a :class:`~lhf_torchrec.modules.cosharded.CoShardedLearnedHashEBC`
    (TorchRec's ``ManagedCollisionEmbeddingBagCollection`` of :class:`CoShardedIdRemap` s) row-wise:
    each rank holds the rows, and the mapping entries, of whole buckets; raw ids travel to the rank
    that owns their bucket in the input all-to-all and are remapped there.

    TorchRec's sharder offers ``row_wise`` on CUDA only; this one offers it on CPU too (it runs on
    gloo), with the fused kernel. The world size must divide every table's bucket count, else a rank
    would hold part of a bucket: sharding is refused with an error naming B and the sizes that work.

    Example::

        sharders = [CoShardedEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}),
                    LearnedHashEBCSharder(fused_params=...)]
        model = DistributedModelParallel(model, plan=planner.collective_plan(model, sharders, pg), sharders=sharders)
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ShardingType.ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if compute_device_type == "cpu":
            return [EmbeddingComputeKernel.FUSED.value]
        return super().compute_kernels(sharding_type, compute_device_type)

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> nn.Module:
        remaps = module._managed_collision_collection._managed_collision_modules
        for table, remap in remaps.items():
            if isinstance(remap, CoShardedIdRemap) and remap.num_buckets % env.world_size:
                raise ValueError(
                    f"table '{table}': its mapping has {remap.num_buckets} buckets, which {env.world_size} ranks "
                    f"cannot share whole (a rank would hold part of a bucket); co-sharded world sizes for it: "
                    f"{cosharding_world_sizes(remap.num_buckets)}. Refit with a bucket count that the world size "
                    "divides, or keep the table's remap replicated")
        return super().shard(module, params, env, device or torch.device("cpu"), module_fqn)
