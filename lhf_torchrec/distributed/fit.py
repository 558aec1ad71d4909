"""Distributed fitting of bucketed mappings: each rank fits the buckets it owns.

A bucketed mapping (:mod:`lhf_torchrec.mapping.buckets`) is fitted bucket by bucket, each bucket
on its own ids only, so W ranks can split the work: bucket b belongs to rank ``b * W // B`` (the
rank whose row-wise shard holds the bucket's rows, so W must divide B). Under a process group:

1. each rank profiles its part of the data (an exact :class:`IdProfile` of its rows);
2. :func:`exchange_profiles` sends every (id, count) to the rank that owns the id's bucket, which
   sums the counts of all ranks: the rank then holds the exact merged profile of its buckets' ids,
   and nobody holds the whole profile;
3. :func:`fit_owned_buckets` fits those buckets (k-means included) with the same per-bucket code
   as :func:`~lhf_torchrec.mapping.buckets.fit_bucketed`;
4. the result is either gathered on every rank (:func:`gather_mapping`, or :func:`gather_keyed_fits` then
   ``assemble_keyed``: a replicated :class:`IdMapping`, equal, fingerprint included, to
   ``fit_bucketed`` on the merged profile) or
   kept as the rank's shard (:func:`shard_mapping`: its buckets' entries, and the hash regions and
   entry counts of every bucket, which a co-sharded remap's layout needs).

:func:`fit_bucketed_distributed` chains 2-4. Fitting time and memory per rank follow the rank's
share of the ids (about 1/W of them, for a bucket hash that spreads ids evenly). A replicated mapping
is, by definition, whole on every rank: each rank keys its own entries by bucket hash and checks them
(errors name the id and are raised on every rank), then holds the gathered keys and int32 rows (12
bytes per entry of the whole mapping) and assembles the mapping from them in their gathered order,
with the perfect hash build's own arrays (about 11 bytes per entry at its peak, as much as the finished
table: docs/performance.md "Distributed fit"); a shard avoids both.

At a memory budget (the pipeline, ``lhf fit`` / ``lhf train --num-buckets`` under torchrun) the
rows come from :func:`~lhf_torchrec.mapping.budget.plan_budget`, which reads the count histogram
and every bucket's row split: :class:`RankBudgetStatistics` computes both from the rank's
:class:`ProfileShare` (:func:`share_profile`: the exchange, plus a :class:`~lhf_torchrec.mapping.profile.ProfileSummary` of the
whole profile) and combines them with collectives, so every rank gets the plan of the merged
profile without holding it. :func:`cosharded_remap` builds a rank's co-sharded remap straight from
its :class:`MappingShard`.

Heavy-hitter profiles (``capacity``) are refused: their summaries shrink against the global counts,
which no rank has; merge them on one process (:meth:`IdProfile.merge`) and fit with ``fit_bucketed``.

:func:`merge_across_ranks` merges whole profiles on every rank (what ``lhf profile`` writes).

Collectives run on CPU tensors under gloo and on the current CUDA device under NCCL.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from lhf_torchrec.mapping.buckets import (
    BucketFits,
    KeyedFits,
    assemble_keyed,
    bucket_profiles,
    bucket_split,
    check_bucket_rows,
    cosharded_slots,
    fit_bucket_range,
    keyed_fits,
    total_split,
)
from lhf_torchrec.mapping.budget import BudgetStatistics
from lhf_torchrec.mapping.embeddings import EmbeddingsLike
from lhf_torchrec.mapping.fit import accesses_with_entry
from lhf_torchrec.mapping.hashing import bucket_hashes, input_hash_size
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.methods import MappingEstimator, RowSplit, make_estimator
from lhf_torchrec.mapping.profile import IdProfile, ProfileSummary
from lhf_torchrec.modules.cosharded import CoShardedIdRemap

ProcessGroup = Optional[dist.ProcessGroup]


# Rounds of the profile exchange: each sends and merges about 1/ROUNDS of a rank's pairs at a time.
EXCHANGE_ROUNDS = 8
_INT64_MAX = (1 << 63) - 1


def check_world_size(world_size: int, num_buckets: int, table: str = "table") -> None:
    """Raises unless ``world_size`` ranks can own whole buckets: W must divide B."""
    if world_size < 1 or num_buckets % world_size:
        raise ValueError(f"table '{table}': a world size of {world_size} ranks does not divide {num_buckets} buckets; "
                         f"distributed fitting gives each rank whole buckets (use a bucket count that is a multiple "
                         f"of {world_size})")


def owned_buckets(rank: int, world_size: int, num_buckets: int) -> range:
    """The buckets of ``rank``: ``[rank * B / W, (rank + 1) * B / W)``, those whose rows its row-wise shard holds."""
    per_rank = num_buckets // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def bucket_owners(ids: np.ndarray, num_buckets: int, world_size: int, seed: int) -> np.ndarray:
    """The rank owning each id's bucket (the bucket of its bucket hash h, as :func:`bucket_profiles` has it)."""
    owners = bucket_hashes(ids, num_buckets, seed)  # becomes the owners in place: one array as large as the ids
    owners //= input_hash_size(num_buckets) // num_buckets
    owners *= world_size
    owners //= num_buckets
    return owners


def _device(group: ProcessGroup) -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_to_all(arrays: np.ndarray, send_sizes: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """Sends ``arrays[sum(send_sizes[:r]) : ...]`` to rank r; returns what every rank sent here, in rank order."""
    device = _device(group)
    sizes = torch.from_numpy(send_sizes.astype(np.int64)).to(device)
    recv_sizes = torch.empty_like(sizes)
    dist.all_to_all_single(recv_sizes, sizes, group=group)
    recv_sizes = recv_sizes.cpu()
    out = torch.empty(int(recv_sizes.sum()), dtype=torch.int64, device=device)
    dist.all_to_all_single(out, torch.from_numpy(arrays).to(device), recv_sizes.tolist(),
                           send_sizes.tolist(), group=group)
    return out.cpu().numpy()


def _gather(array: np.ndarray, group: ProcessGroup) -> Tuple[np.ndarray, List[int]]:
    """(every rank's integer ``array`` concatenated in rank order, each rank's length); lengths may
    differ, the first dimension varies, every rank's array has the same dtype. Each rank's part is
    broadcast straight into its place in one result buffer: no padded copies, no per-rank list to
    concatenate (an all_gather of unequal sizes would hold W padded copies, plus their concatenation,
    plus gloo's flat buffer of them)."""
    device = _device(group)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    bounds = np.cumsum([0] + lengths).tolist()
    whole = torch.empty((bounds[-1],) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    whole[bounds[rank]:bounds[rank + 1]] = tensor.to(device)
    for source in range(world_size):
        if lengths[source]:  # every rank knows the lengths: all skip the same broadcasts
            dist.broadcast(whole[bounds[source]:bounds[source + 1]], group=group, group_src=source)
    return whole.cpu().numpy(), lengths


def _gather_concat(array: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """Every rank's ``array`` concatenated in rank order (:func:`_gather`)."""
    return _gather(array, group)[0]


def _all_gather(array: np.ndarray, group: ProcessGroup) -> List[np.ndarray]:
    """Every rank's ``array``, in rank order: views into :func:`_gather`'s one buffer."""
    whole, lengths = _gather(array, group)
    return np.split(whole, np.cumsum(lengths)[:-1])


def sum_across_ranks(array: np.ndarray, *, group: ProcessGroup = None) -> np.ndarray:
    """The element-wise sum of every rank's 1-d int64 ``array`` (of one length on every rank). Collective."""
    return _gather_concat(array.astype(np.int64)[None, :], group).sum(axis=0)


def exchange_profiles(
    profile: IdProfile, num_buckets: int, seed: int = 0, *, table: str = "table", group: ProcessGroup = None
) -> IdProfile:
    """The merged profile of the ids in this rank's buckets, from every rank's local ``profile``.

    Collective: every rank calls it with its own exact profile (empty if it saw no data). Each
    rank receives the (id, count) pairs of its buckets from every rank and sums them: the result is
    the merged profile restricted to the rank's buckets (``total`` counts their accesses only).

    In :data:`EXCHANGE_ROUNDS` rounds, each of the ids in one part of the ranks' common id range: an id
    is in the same round on every rank, so each round's merged ids are sorted and above the previous
    round's, and go straight into one result buffer sized from the counts every rank will send. Memory
    per rank besides its local profile: an owner byte per local id, the result (16 bytes per id
    received) and one round's pairs sent, received and merged.
    """
    world_size = dist.get_world_size(group)
    check_world_size(world_size, num_buckets, table)
    if not profile.exact:
        raise ValueError(f"table '{table}': distributed fitting needs exact profiles, got a heavy-hitter summary "
                         f"(capacity={profile.capacity}): its counts shrink against the global stream, which no "
                         f"rank has; merge the summaries on one process (IdProfile.merge) and fit with fit_bucketed")
    ends = _round_ends(profile.ids, group)
    owners = bucket_owners(profile.ids, num_buckets, world_size, seed).astype(np.min_scalar_type(world_size - 1))
    # sent[k, r]: this rank's pairs of round k for rank r; what every rank sends here sizes the result.
    sent = np.stack([np.bincount(owners[a:b], minlength=world_size) for a, b in zip(ends[:-1], ends[1:])])
    received = int(_all_to_all(np.ascontiguousarray(sent.T).reshape(-1), np.full(world_size, EXCHANGE_ROUNDS),
                               group).sum())
    ids, counts = np.empty(received, np.int64), np.empty(received, np.int64)
    filled = 0
    for k, (a, b) in enumerate(zip(ends[:-1], ends[1:])):
        order = np.argsort(owners[a:b], kind="stable")  # ids stay sorted within each destination
        round_ids = _all_to_all(profile.ids[a:b][order], sent[k], group)
        round_counts = _all_to_all(profile.counts[a:b][order], sent[k], group)
        del order
        merged = _summed_by_id(round_ids, round_counts)
        ids[filled:filled + merged.num_ids] = merged.ids
        counts[filled:filled + merged.num_ids] = merged.counts
        filled += merged.num_ids
    del owners
    ids, counts = ids[:filled], counts[:filled]
    if 2 * filled < received:  # mostly repeated ids: keep the distinct ones, not the buffer for every pair
        ids, counts = ids.copy(), counts.copy()
    return IdProfile(ids, counts, int(counts.sum()))


def _round_ends(ids: np.ndarray, group: ProcessGroup) -> List[int]:
    """Where each exchange round's ids end in this rank's sorted ``ids``: the ranks' common id range
    [lowest, highest] cut into :data:`EXCHANGE_ROUNDS` equal parts (the same cuts on every rank). Ids spread
    over their range (dense ids, hashed ids) put ~1/ROUNDS of the pairs in each round; ids bunched in a part
    of it fall into fewer rounds (the same result, less memory saved)."""
    bounds = np.array([int(ids[0]), int(ids[-1])] if ids.size else [_INT64_MAX, -_INT64_MAX - 1], np.int64)
    every = _all_gather(bounds, group)
    lowest, highest = min(int(b[0]) for b in every), max(int(b[1]) for b in every)
    if lowest > highest:  # no rank has an id
        return [0] * (EXCHANGE_ROUNDS + 1)
    span = highest - lowest + 1
    cuts = [lowest + span * k // EXCHANGE_ROUNDS for k in range(1, EXCHANGE_ROUNDS)]
    return [0, *np.searchsorted(ids, np.array(cuts, np.int64)).tolist(), ids.size]


def _summed_by_id(ids: np.ndarray, counts: np.ndarray) -> IdProfile:
    """The profile of (id, count) pairs in which an id may repeat (the ranks' sorted runs, end to end):
    each id once, its counts summed in int64 (exact at any count). Sorts ``ids`` and ``counts`` in
    place (the caller's buffers: a sorted copy would hold both, as the caller still refers to them)."""
    order = np.argsort(ids, kind="stable")  # a merge of the W sorted runs
    ids[:] = ids[order]
    counts[:] = counts[order]
    del order
    first = np.empty(ids.size, dtype=bool)
    first[:1] = True
    np.not_equal(ids[1:], ids[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    del first
    summed = np.add.reduceat(counts, starts) if starts.size else counts
    return IdProfile(ids[starts], summed, int(summed.sum()))


def fit_owned_buckets(
    method: str,
    num_rows: int,
    num_buckets: int,
    profile: IdProfile,
    embeddings: Optional[EmbeddingsLike] = None,
    *,
    seed: int = 0,
    table: str = "table",
    group: ProcessGroup = None,
    **hyperparams,
) -> BucketFits:
    """Fits this rank's buckets. ``profile`` holds (at least) every profiled id of those buckets with
    its merged count: :func:`exchange_profiles`'s result, or the whole merged profile (ids of other
    buckets are ignored). ``embeddings`` must cover the learned methods' ids of these buckets."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_world_size(world_size, num_buckets, table)
    check_bucket_rows(num_rows, num_buckets, table)
    mine = owned_buckets(rank, world_size, num_buckets)
    owners = bucket_owners(profile.ids, num_buckets, world_size, seed)
    keep = owners == rank
    if not keep.all():  # a whole profile: keep this rank's ids (and recount total over them)
        profile = IdProfile(profile.ids[keep], profile.counts[keep], int(profile.counts[keep].sum()),
                            profile.capacity, profile.error_bound)
    profiles = bucket_profiles(profile, num_buckets, seed)[mine.start:mine.stop]
    return fit_bucket_range(method, num_rows, num_buckets, profiles, embeddings, first_bucket=mine.start, seed=seed,
                            table=table, **hyperparams)


_SPLIT_FIELDS = ("num_rows", "num_hot", "num_clustered", "num_hashed", "num_entries", "hash_offset", "hash_rows",
                 "probes")


def _gather_splits(splits: List[RowSplit], group: ProcessGroup) -> List[RowSplit]:
    """Every bucket's row split, from each rank's ``splits`` of its buckets (a contiguous range, in rank order)."""
    local = np.array([[getattr(s, f) for f in _SPLIT_FIELDS] for s in splits], np.int64).reshape(-1, 8)
    return [RowSplit(*map(int, row)) for row in _gather_concat(local, group)]


def _raise_if_any(error: Optional[ValueError], group: ProcessGroup) -> None:
    """Raises, on every rank, the first rank's ``error`` (in rank order) if any rank has one (collective):
    a check that only the rank holding the bad entry can make fails on all ranks, none of them left
    waiting in the next collective."""
    message = np.frombuffer(str(error).encode(), np.uint8) if error is not None else np.zeros(0, np.uint8)
    whole, lengths = _gather(message, group)
    if any(lengths):
        first = next(r for r, n in enumerate(lengths) if n)
        start = sum(lengths[:first])
        raise ValueError(whole[start:start + lengths[first]].tobytes().decode() +
                         ("" if first == dist.get_rank(group) else f" (raised on rank {first})"))


def gather_keyed_fits(
    fits: BucketFits, num_rows: int, num_buckets: int, *, seed: int = 0, table: str = "table",
    group: ProcessGroup = None,
) -> KeyedFits:
    """Every bucket's entries keyed by bucket hash on every rank, from each rank's
    :func:`fit_owned_buckets` (collective): each rank keys and checks its own entries (errors name the
    id, raised on every rank: :func:`~lhf_torchrec.mapping.buckets.keyed_fits`), then the int64 keys and
    int32 rows are gathered. Memory per rank: 12 bytes per entry of the whole mapping (received in
    place), besides the rank's own fits and their keyed copy (12 bytes per own entry)."""
    try:
        local, error = keyed_fits(fits, num_rows, num_buckets, seed=seed, table=table), None
    except ValueError as e:
        local, error = None, e
    _raise_if_any(error, group)
    return KeyedFits(0, _gather_splits(local.splits, group), _gather_concat(local.keys, group),
                     _gather_concat(local.rows, group), _gather_concat(local.entry_counts, group))


def gather_mapping(
    method: str, num_rows: int, num_buckets: int, fits: BucketFits, *, seed: int = 0, table: str = "table",
    group: ProcessGroup = None, **hyperparams,
) -> IdMapping:
    """The whole mapping on every rank (replicated), from each rank's :func:`fit_owned_buckets`.
    Collective; ``hyperparams`` as fitted.

    Memory per rank: the gathered keyed entries (12 bytes each) and the perfect hash build over them
    (the output is replicated), while the rank's own ``fits`` are held; to free them for the assembly,
    :func:`gather_keyed_fits`, drop them, then :func:`~lhf_torchrec.mapping.buckets.assemble_keyed`
    (what :func:`fit_bucketed_distributed` does).
    """
    whole = gather_keyed_fits(fits, num_rows, num_buckets, seed=seed, table=table, group=group)
    return assemble_keyed(method, num_rows, num_buckets, whole, seed=seed, table=table, **hyperparams)


@dataclass(frozen=True)
class MappingShard:
    """One rank's part of a bucketed mapping fitted in a distributed way.

    ``fits`` holds the entries of the rank's buckets only; ``splits`` (hash regions and layout) and
    ``entry_counts`` cover every bucket: a co-sharded remap's shape depends on the fullest bucket
    (:func:`~lhf_torchrec.mapping.buckets.cosharded_slots`), so every rank needs all bucket counts.
    """

    table: str
    method: str
    num_rows: int
    num_buckets: int
    seed: int
    params: dict
    fits: BucketFits
    splits: List[RowSplit]
    entry_counts: np.ndarray

    @property
    def buckets(self) -> range:
        return range(self.fits.first_bucket, self.fits.end_bucket)

    @property
    def bucket_hash_regions(self) -> torch.Tensor:
        """(B, 2) int32: each bucket's hash region (offset, rows), as ``IdMapping.bucket_hash_regions``."""
        return torch.tensor([[s.hash_offset, s.hash_rows] for s in self.splits], dtype=torch.int32)

    @property
    def layout(self):
        return total_split(self.splits).layout()


def shard_mapping(
    method: str, num_rows: int, num_buckets: int, fits: BucketFits, *, seed: int = 0, table: str = "table",
    group: ProcessGroup = None, **hyperparams,
) -> MappingShard:
    """This rank's :class:`MappingShard` (collective: every bucket's split and entry count are gathered)."""
    splits = _gather_splits(fits.splits, group)
    entry_counts = _gather_concat(fits.entry_counts, group)
    params = make_estimator(method, num_rows // num_buckets, seed=seed, **hyperparams).get_params()
    return MappingShard(table, method, num_rows, num_buckets, seed, params, fits, splits, entry_counts)


def fit_bucketed_distributed(
    method: str,
    num_rows: int,
    num_buckets: int,
    profile: IdProfile,
    embeddings: Optional[EmbeddingsLike] = None,
    *,
    seed: int = 0,
    table: str = "table",
    gather: bool = True,
    group: ProcessGroup = None,
    **hyperparams,
) -> Union[IdMapping, MappingShard]:
    """:func:`~lhf_torchrec.mapping.buckets.fit_bucketed` over a process group, from each rank's local
    exact ``profile`` (collective). ``gather``: the whole mapping on every rank, equal to
    ``fit_bucketed(method, num_rows, num_buckets, merged profile, ...)``; else this rank's
    :class:`MappingShard`. ``embeddings`` must cover this rank's buckets' ids (learned methods).

    Example (under torchrun, with a gloo or NCCL group)::

        local = profile_batches(my_part_of_the_data)["C1"]
        mapping = fit_bucketed_distributed("frequency", 1 << 20, 64, local, table="t_C1")
    """
    check_bucket_rows(num_rows, num_buckets, table)
    owned = exchange_profiles(profile, num_buckets, seed, table=table, group=group)
    fits = fit_owned_buckets(method, num_rows, num_buckets, owned, embeddings, seed=seed, table=table, group=group,
                             **hyperparams)
    del owned  # freed before the gather and the assembly, the peak of a replicated fit
    if not gather:
        return shard_mapping(method, num_rows, num_buckets, fits, seed=seed, table=table, group=group, **hyperparams)
    whole = gather_keyed_fits(fits, num_rows, num_buckets, seed=seed, table=table, group=group)
    del fits  # the rank's entries are among the gathered ones
    return assemble_keyed(method, num_rows, num_buckets, whole, seed=seed, table=table, **hyperparams)


# ------------------------------------------------------------------ the pipeline's per-rank shares


@dataclass(frozen=True)
class ProfileShare:
    """One rank's share of a table's merged profile, for a bucketed fit across ranks.

    ``profile``: the merged counts of the ids of the rank's buckets (:func:`exchange_profiles`, or
    :func:`own_share` of a whole profile);
    ``summary``: what the table rules read of the whole merged profile, which no rank holds.
    """

    profile: IdProfile
    summary: ProfileSummary
    num_buckets: int
    seed: int


def share_profile(
    profile: IdProfile, num_buckets: int, seed: int = 0, *, table: str = "table", group: ProcessGroup = None
) -> ProfileShare:
    """This rank's :class:`ProfileShare` from its local exact ``profile`` (collective)."""
    owned = exchange_profiles(profile, num_buckets, seed, table=table, group=group)
    return ProfileShare(owned, summarize_across_ranks(owned, group=group), num_buckets, seed)


def own_share(profile: IdProfile, num_buckets: int, seed: int = 0, *, table: str = "table",
              group: ProcessGroup = None) -> ProfileShare:
    """This rank's :class:`ProfileShare` of a whole merged ``profile`` that every rank holds (no collective)."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_world_size(world_size, num_buckets, table)
    keep = bucket_owners(profile.ids, num_buckets, world_size, seed) == rank
    owned = IdProfile(profile.ids[keep], profile.counts[keep], int(profile.counts[keep].sum()), profile.capacity,
                      profile.error_bound)
    return ProfileShare(owned, profile.summary(), num_buckets, seed)


def summarize_across_ranks(owned: IdProfile, *, group: ProcessGroup = None) -> ProfileSummary:
    """The :class:`ProfileSummary` of the union of every rank's ``owned`` profile, whose ids are
    disjoint (:func:`exchange_profiles`' results). Collective."""
    local = np.array([[owned.num_ids, owned.total, owned.min_id, owned.max_id]], np.int64)
    parts = _gather_concat(local, group)
    seen = parts[parts[:, 0] > 0]
    if not seen.size:
        return ProfileSummary(0, int(parts[:, 1].sum()), 0, 0)
    return ProfileSummary(int(parts[:, 0].sum()), int(parts[:, 1].sum()), int(seen[:, 2].min()), int(seen[:, 3].max()))


def gather_profile(share: ProfileShare, min_count: int = 1, *, group: ProcessGroup = None) -> IdProfile:
    """The merged profile's ids seen at least ``min_count`` times (1: the whole profile), with their
    counts, on every rank, from every rank's share (collective); ``total`` stays the whole profile's.
    For what is not fitted bucket by bucket: a full-size table's vocabulary, a budget too small for
    buckets, the learn step's well-observed ids."""
    keep = share.profile.counts >= min_count
    ids = _gather_concat(share.profile.ids[keep], group)
    counts = _gather_concat(share.profile.counts[keep], group)
    order = np.argsort(ids)
    return IdProfile(ids[order], counts[order], share.summary.total)


def record_entry_share_across_ranks(mapping: IdMapping, share: ProfileShare, *, group: ProcessGroup = None) -> None:
    """Sets ``mapping.entry_share`` as :func:`~lhf_torchrec.mapping.fit.record_entry_share` does on the
    whole profile: each rank counts its share's accesses with an entry (collective)."""
    if share.summary.total > 0:
        hits = np.array([[accesses_with_entry(mapping, share.profile)]], np.int64)
        mapping.entry_share = round(float(_gather_concat(hits, group).sum()) / share.summary.total, 6)


class RankBudgetStatistics(BudgetStatistics):
    """A bucketed budget's statistics from this rank's buckets, combined across ranks with
    collectives: :func:`~lhf_torchrec.mapping.budget.plan_budget` then gives, on every rank, the plan
    of the whole merged profile, while each rank holds only its share.

    The count histogram is the sum of the ranks' histograms (their ids are disjoint); each try of
    a table size fits the splits of the rank's own buckets and all-gathers every bucket's split.
    Every rank must call ``plan_budget`` with the same arguments (its calls are collective).
    """

    def __init__(self, share: ProfileShare, *, table: str = "table", group: ProcessGroup = None) -> None:
        self.share, self.table, self.group = share, table, group
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        check_world_size(world_size, share.num_buckets, table)
        #: The rank's buckets and their profiles (a fit of the planned rows reuses them: ``fit_bucket_range``).
        self.own_buckets = owned_buckets(rank, world_size, share.num_buckets)
        self.own_profiles = bucket_profiles(share.profile, share.num_buckets, share.seed)[
            self.own_buckets.start:self.own_buckets.stop]

    @property
    def profile(self) -> IdProfile:
        raise ValueError(f"table '{self.table}': an unbucketed budget ranks every id and needs the whole profile; "
                         f"plan it from the merged profile (gather_profile)")

    @property
    def num_ids(self) -> int:
        return self.share.summary.num_ids

    def count_histogram(self) -> Tuple[np.ndarray, np.ndarray]:
        values, ids = np.unique(self.share.profile.counts, return_counts=True)
        pairs = _gather_concat(np.stack([values, ids.astype(np.int64)], axis=1), self.group)
        merged, inverse = np.unique(pairs[:, 0], return_inverse=True)
        return merged, np.bincount(inverse, weights=pairs[:, 1], minlength=merged.size).astype(np.int64)

    def bucket_splits(self, estimator: MappingEstimator, num_buckets: int, seed: int) -> List[RowSplit]:
        if (num_buckets, seed) != (self.share.num_buckets, self.share.seed):
            raise ValueError(f"table '{self.table}': the profile was shared by {self.share.num_buckets} buckets "
                             f"(seed {self.share.seed}), not {num_buckets} (seed {seed})")
        return _gather_splits([bucket_split(estimator, p, self.table) for p in self.own_profiles], self.group)


def cosharded_remap(shard: MappingShard, device: Optional[torch.device] = None) -> CoShardedIdRemap:
    """This rank's :class:`~lhf_torchrec.modules.cosharded.CoShardedIdRemap` straight from its
    :class:`MappingShard`: the module that TorchRec's sharder cuts for the rank's rows from the module
    of the gathered mapping (same buffers), without the gathered mapping. Local (no collective).

    It holds the rank's buckets only, so it goes where a row-wise shard's module goes: e.g. copy its
    buffers into the sharded module of a model built with a placeholder (or load them from a checkpoint).
    """
    probes = shard.splits[0].probes
    if probes != 1:
        raise ValueError(f"table '{shard.table}': the mapping cannot co-shard with its table: {probes} probes per id "
                         f"(method '{shard.method}')")
    fits = shard.fits
    keys = torch.from_numpy(bucket_hashes(fits.entry_ids, shard.num_buckets, shard.seed))
    order = torch.argsort(keys, stable=True)
    mine = shard.buckets
    split = total_split(shard.splits)
    description = {"table_name": shard.table, "method": shard.method, "params": shard.params,
                   "num_rows": shard.num_rows, "num_entries": int(shard.entry_counts.sum()), "seed": shard.seed,
                   "hash_offset": split.hash_offset, "hash_rows": split.hash_rows, "probes": 1,
                   "layout": split.layout(), "num_buckets": shard.num_buckets}
    return CoShardedIdRemap.from_bucket_entries(
        shard.num_rows, shard.num_buckets, shard.seed, keys[order], torch.from_numpy(fits.entry_rows)[order],
        torch.from_numpy(fits.entry_counts), shard.bucket_hash_regions[mine.start:mine.stop],
        slots_per_row=cosharded_slots(shard.num_rows, shard.num_buckets, int(shard.entry_counts.max())),
        description=description, first_bucket=mine.start, device=device)


__all__ = [
    "MappingShard",
    "ProfileShare",
    "RankBudgetStatistics",
    "check_world_size",
    "cosharded_remap",
    "exchange_profiles",
    "fit_bucketed_distributed",
    "fit_owned_buckets",
    "gather_keyed_fits",
    "gather_mapping",
    "gather_profile",
    "merge_across_ranks",
    "own_share",
    "owned_buckets",
    "record_entry_share_across_ranks",
    "shard_mapping",
    "share_profile",
    "summarize_across_ranks",
]


def merge_across_ranks(profile: IdProfile, *, table: str = "table", group: ProcessGroup = None) -> IdProfile:
    """The merge of every rank's ``profile``, on every rank (collective).

    Exact profiles: equal to the profile of all ranks' data in one process; ranks sum the counts of
    a 1/W share of the ids each (:func:`exchange_profiles`), then gather the shares. Heavy-hitter
    summaries: merged in rank order (:meth:`IdProfile.merge`; the undercount bound of mergeable
    summaries still holds, the counters may differ from one process's stream).
    """
    world_size = dist.get_world_size(group)
    if not profile.exact:
        merged: Optional[IdProfile] = None
        for ids, counts, bounds in zip(_all_gather(profile.ids, group), _all_gather(profile.counts, group),
                                       _all_gather(np.array([profile.total, profile.error_bound]), group)):
            part = IdProfile(ids, counts, int(bounds[0]), profile.capacity, int(bounds[1]))
            merged = part if merged is None else merged.merge(part)
        return merged
    share = exchange_profiles(profile, world_size, seed=0, table=table, group=group)
    ids = _gather_concat(share.ids, group)
    counts = _gather_concat(share.counts, group)
    order = np.argsort(ids)
    total = int(_gather_concat(np.array([profile.total]), group).sum())
    return IdProfile(ids[order], counts[order], total)
