"""The baselines' common shape: rewrite the KJT, look rows up in a stock EBC, combine the pooled rows.

QR embeddings, TorchRec's managed-collision remap and clustered compositional embeddings all fit
one mould: an :class:`EmbeddingRemap` turns the KJT of the full tables into the KJT of a stock
``EmbeddingBagCollection`` holding the baseline's tables (``preprocess``), and turns that EBC's
pooled output back into one embedding per original feature (``postprocess``). The tables live in
the stock EBC, so TorchRec shards them with its own sharder, FBGEMM's fused kernels look them up,
and the trainer's fused table optimizer (``apply_optimizer_in_backward``) trains them like every
other method's.

:class:`ComposedEmbeddingBagCollection` is the unsharded module (the reference for tests);
:class:`ComposedEBCSharder` shards it into :class:`ShardedComposedEBC`, which runs ``preprocess``
at the start of ``input_dist`` (replicated, before the KJT all-to-all, so
``TrainPipelineSparseDist`` overlaps it with the previous batch) and ``postprocess`` when the
pooled output is awaited. The remap's state (buffers) is replicated on every rank; the sharder
checks that every rank holds the same remap.

Tables a baseline does not compress pass through, behind the vocabulary mapping the full-table
baseline uses for sparse id spaces (see :func:`lhf_torchrec.pipeline.steps.vocabulary_mappings`).
"""

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    Multistreamable,
    ParameterSharding,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix

from lhf_torchrec.distributed.sharder import WrappedEBCSharder, check_identical_across_ranks
from lhf_torchrec.mapping.id_mapping import IdMapping

logger = logging.getLogger(__name__)


class EmbeddingRemap(nn.Module):
    """A baseline's KJT rewrite around the stock EBC that holds its tables (subclasses fill it in).

    Args:
        tables: the full-size table configs the baseline replaces.
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
        """Names of the tables this baseline compresses (the others stay full size)."""
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
        """Table name -> sha256 of the remap's config and its buffers that concern the table."""
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

    def _check_input(self, features: KeyedJaggedTensor) -> None:
        unknown = [k for k in features.keys() if k not in self.feature_to_table]
        if unknown:
            raise KeyError(f"features {unknown} are not in this module (it has {sorted(self.feature_to_table)})")
        if features.values().dtype.is_floating_point or features.values().dtype == torch.bool:
            raise TypeError(f"KJT values must be integer ids, got dtype {features.values().dtype}")
        if features.weights_or_none() is not None:
            raise NotImplementedError(f"'{self.method}' does not support weighted features")
        if features.variable_stride_per_key():
            raise NotImplementedError(f"'{self.method}' does not support variable batch sizes per feature (VBE)")


def _concerns(buffer_name: str, table: str) -> bool:
    """Buffers are named ``<kind>.<table>[.<...>]``: this one belongs to ``table``."""
    parts = buffer_name.split(".")
    return len(parts) > 1 and parts[1] == table


class ComposedEmbeddingBagCollection(nn.Module):
    """Drop-in replacement for an ``EmbeddingBagCollection``: ``remap`` around a stock EBC.

    Args:
        remap: the baseline's fitted :class:`EmbeddingRemap`.
        device: device of the tables (``meta`` for deferred init under DMP); the remap never goes
            to ``meta``, DMP would silently fill its buffers with zeros.

    Example::

        ebc = ComposedEmbeddingBagCollection(fit_qr(tables, profiles, compression=8).remap)
        pooled = ebc(kjt)              # KeyedTensor, same keys and shapes as the full-size EBC
    """

    def __init__(self, remap: EmbeddingRemap, device: Optional[torch.device] = None) -> None:
        super().__init__()
        remap_device = None if device is None or torch.device(device).type == "meta" else device
        self.remap = remap.to(remap_device) if remap_device else remap
        self.ebc = EmbeddingBagCollection(tables=remap.inner_configs(), device=device)

    def full_embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self.remap.full_configs)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.ebc.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return False

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        with torch.no_grad():
            inner, batch = self.remap.preprocess(features)
        return self.remap.postprocess(self.ebc(inner), batch)


@dataclass
class ComposedEBCContext(EmbeddingBagCollectionContext):
    """The stock EBC's context plus what ``postprocess`` needs about the batch."""

    batch: Optional[Multistreamable] = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.batch is not None:
            self.batch.record_stream(stream)


class _Postprocessed(LazyAwaitable[KeyedTensor]):
    def __init__(self, pooled: LazyAwaitable[KeyedTensor], remap: EmbeddingRemap,
                 batch: Optional[Multistreamable]) -> None:
        super().__init__()
        self._pooled = pooled
        self._remap = remap
        self._batch = batch

    def _wait_impl(self) -> KeyedTensor:
        return self._remap.postprocess(LazyAwaitable._wait_async(self._pooled), self._batch)


class ShardedComposedEBC(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, ComposedEBCContext]
):
    """The sharded twin of :class:`ComposedEmbeddingBagCollection` (replicated remap, sharded tables)."""

    def __init__(
        self,
        module: ComposedEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
        ebc_sharder: EmbeddingBagCollectionSharder,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        check_identical_across_ranks(module.remap.fingerprint(), env, f"'{module.remap.method}' remaps")
        self.remap: EmbeddingRemap = module.remap.to(device)
        self._device = device
        self._env = env
        self.ebc: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.ebc, params, env, device, module_fqn=append_prefix(module_fqn or "", "ebc")
        )

    def create_context(self) -> ComposedEBCContext:
        return ComposedEBCContext()

    def input_dist(self, ctx: ComposedEBCContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        with torch.no_grad():
            inner, ctx.batch = self.remap.preprocess(features, self._common_stride(features))
        return self.ebc.input_dist(ctx, inner)

    def _common_stride(self, features: KeyedJaggedTensor) -> Optional[int]:
        """The largest :meth:`EmbeddingRemap.inner_stride` over the ranks: the backward of row-wise
        output dists needs the same batch size on every rank (one small all-reduce per batch; every
        rank reads the same number of batches)."""
        stride = self.remap.inner_stride(features)
        if stride is None or self._env.world_size == 1 or not dist.is_initialized():
            return stride
        agreed = torch.tensor([stride], dtype=torch.int64, device=self._device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._env.process_group)
        return int(agreed.item())

    def compute(self, ctx: ComposedEBCContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self.ebc.compute(ctx, dist_input)

    def output_dist(self, ctx: ComposedEBCContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return _Postprocessed(self.ebc.output_dist(ctx, output), self.remap, ctx.batch)

    def compute_and_output_dist(self, ctx: ComposedEBCContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return _Postprocessed(self.ebc.compute_and_output_dist(ctx, input), self.remap, ctx.batch)

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # DDP must leave the sharded tables alone; the remap has buffers only.
        yield from self.ebc.sharded_parameter_names(append_prefix(prefix, "ebc"))

    @property
    def unsharded_module_type(self) -> Type[ComposedEmbeddingBagCollection]:
        return ComposedEmbeddingBagCollection


class ComposedEBCSharder(WrappedEBCSharder):
    """Shards :class:`ComposedEmbeddingBagCollection` (replicated remap, tables by TorchRec's EBC sharder)."""

    module_cls = ComposedEmbeddingBagCollection
    sharded_cls = ShardedComposedEBC


def split_per_key(features: KeyedJaggedTensor) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, values, lengths) of every feature of a (non-VBE) KJT."""
    values = features.values().split(features.length_per_key())
    lengths = features.lengths().split(features.stride_per_key())
    yield from zip(features.keys(), values, lengths)
