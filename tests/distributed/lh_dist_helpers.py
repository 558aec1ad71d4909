"""Shared pieces of the 2-rank gloo tests: tables, mappings, batches, models, and shard copying.

Spawned workers import this module by name (pytest puts this folder on ``sys.path`` and the spawn
start method passes ``sys.path`` on), so it must stay importable without side effects.
"""

import datetime
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from lhf_torchrec import IdMapping, fit_mapping
from lhf_torchrec.modules import LearnedHashEmbeddingBagCollection

B_LOCAL = 4
DIM = 8
LR = 0.5
SPARSE_BASE = 1 << 40

TABLES = [
    EmbeddingBagConfig(name="t_freq", num_embeddings=2000, embedding_dim=DIM, feature_names=["f_a", "f_b"]),
    EmbeddingBagConfig(name="t_hash", num_embeddings=1000, embedding_dim=DIM, feature_names=["f_h"]),
    EmbeddingBagConfig(name="t_dbl", num_embeddings=1500, embedding_dim=DIM, feature_names=["f_d"]),
    EmbeddingBagConfig(name="t_sparse", num_embeddings=1 << 30, embedding_dim=DIM, feature_names=["f_s"]),
    EmbeddingBagConfig(name="t_plain", num_embeddings=64, embedding_dim=DIM, feature_names=["f_p"]),
]
FEATURES = [f for t in TABLES for f in t.feature_names]


def run_on_rank(check: Callable[..., None], rank: int, world_size: int, **kwargs) -> None:
    """Runs ``check(rank, world_size, **kwargs)`` in a gloo process group, then tears the group down.

    The group has a short timeout, so a rank that fails does not leave the other waiting for 30
    minutes in a collective. Exceptions that are not ``Exception`` s (DCP's ``CheckpointException``
    is a ``BaseException``) would kill the harness's pool worker and hang the test: they are
    re-raised as ``RuntimeError``.
    """
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        check(rank, world_size, **kwargs)
    except Exception:
        raise
    except BaseException as e:
        raise RuntimeError(f"rank {rank}: {type(e).__name__}: {e}") from None
    finally:
        dist.destroy_process_group()


def raised_by(fn: Callable[[], object]) -> BaseException:
    """The exception ``fn()`` raises (any ``BaseException``); fails if it raises none."""
    try:
        fn()
    except BaseException as e:  # DCP raises CheckpointException, a BaseException
        return e
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised nothing")


def make_mappings(seed: int = 0, hash_rows: int = 32) -> Dict[str, IdMapping]:
    """One mapping per storage/method: dense entries, none (hash), double hashing, sorted 64-bit keys."""
    rng = np.random.default_rng(seed)
    return {
        "t_freq": fit_mapping(rng.zipf(1.4, 4000) % 2000, method="frequency", num_rows=48, seed=seed + 1, table="t_freq"),
        "t_hash": fit_mapping(None, method="hash", num_rows=hash_rows, seed=seed + 2, table="t_hash"),
        "t_dbl": fit_mapping(rng.zipf(1.4, 4000) % 1500, method="double_hash", num_rows=40, seed=seed + 3, table="t_dbl"),
        "t_sparse": fit_mapping(
            SPARSE_BASE + 7919 * (rng.zipf(1.4, 2000) % 400), method="frequency", num_rows=16, seed=seed + 4,
            table="t_sparse",
        ),
    }


def make_module(device: str, seed: int = 0, mappings: Optional[Dict[str, IdMapping]] = None, is_weighted: bool = False):
    torch.manual_seed(seed)
    return LearnedHashEmbeddingBagCollection(
        TABLES, make_mappings() if mappings is None else mappings, device=torch.device(device), is_weighted=is_weighted
    )


def rank_batch(rank: int, seed: int = 0, weighted: bool = False) -> KeyedJaggedTensor:
    """Rank ``rank``'s local batch: empty bags, hot ids, and ids no mapping has seen (negative, huge, out of range)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    values, lengths = [], []
    for t in TABLES:
        for f in t.feature_names:
            lens = torch.randint(0, 4, (B_LOCAL,), generator=g)
            lens[rank % B_LOCAL] = 0
            lens[(rank + 1) % B_LOCAL] = 3
            n = int(lens.sum())
            if t.name == "t_plain":
                ids = torch.randint(0, t.num_embeddings, (n,), generator=g)
            elif t.name == "t_sparse":
                ids = SPARSE_BASE + 7919 * torch.randint(0, 500, (n,), generator=g)
                ids[:2] = torch.tensor([-1, 5])
            else:
                ids = torch.randint(0, 50, (n,), generator=g)
                ids[:3] = torch.tensor([-7, 3 * t.num_embeddings + 1, (1 << 50) + 3])
            values.append(ids)
            lengths.append(lens)
    all_values = torch.cat(values)
    weights = torch.rand(all_values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=all_values, lengths=torch.cat(lengths), weights=weights)


def global_batch(world_size: int, seed: int = 0, weighted: bool = False) -> KeyedJaggedTensor:
    """All ranks' batches concatenated along the batch: what the unsharded reference sees."""
    per_rank = [rank_batch(r, seed, weighted) for r in range(world_size)]
    values, lengths, weights = [], [], []
    for key in FEATURES:
        for kjt in per_rank:
            jt = kjt[key]
            values.append(jt.values())
            lengths.append(jt.lengths())
            if weighted:
                weights.append(jt.weights())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat(values), lengths=torch.cat(lengths), weights=torch.cat(weights) if weighted else None
    )


class SparseOnly(nn.Module):
    """Puts the learned-hash EBC below the root, as in a real model (module path ``sparse``)."""

    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, features: KeyedJaggedTensor):
        return self.sparse(features)


class Ranker(nn.Module):
    """A tiny CTR model for TrainPipelineSparseDist: forward(Batch) -> (loss, (loss, logits))."""

    def __init__(self, sparse: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.sparse = sparse
        torch.manual_seed(seed)
        self.over = nn.Linear(DIM * len(FEATURES) + 2, 1)

    def forward(self, batch: Batch):
        pooled = self.sparse(batch.sparse_features)
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
        d = pooled.to_dict()
        logits = self.over(torch.cat([batch.dense_features] + [d[f] for f in FEATURES], dim=1)).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def make_batches(rank: int, n: int, seed: int = 0) -> List[Batch]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(10_000 + 100 * (seed + i) + rank)
        out.append(Batch(
            dense_features=torch.randn(B_LOCAL, 2, generator=g),
            sparse_features=rank_batch(rank, seed=seed + i),
            labels=torch.randint(0, 2, (B_LOCAL,), generator=g).float(),
        ))
    return out


def local_pieces(value) -> List[Tuple[List[int], torch.Tensor]]:
    """(offsets, local tensor) of every piece of a state_dict value this rank holds."""
    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [([0] * value.dim(), value)]


def _slices(offsets: Iterable[int], shape: Iterable[int]):
    return tuple(slice(o, o + s) for o, s in zip(offsets, shape))


@torch.no_grad()
def copy_into_shards(sharded_state: Dict, full_state: Dict, keys: Iterable[str]) -> None:
    for key in keys:
        for offsets, local in local_pieces(sharded_state[key]):
            local.copy_(full_state[key][_slices(offsets, local.shape)])


def max_shard_diff(sharded_state: Dict, full_state: Dict, keys: Iterable[str]) -> float:
    worst = 0.0
    for key in keys:
        pieces = local_pieces(sharded_state[key])
        for offsets, local in pieces:
            if local.numel():
                worst = max(worst, (full_state[key][_slices(offsets, local.shape)] - local).abs().max().item())
    return worst


def table_keys(prefix: str) -> List[str]:
    return [f"{prefix}ebc.embedding_bags.{t.name}.weight" for t in TABLES]
