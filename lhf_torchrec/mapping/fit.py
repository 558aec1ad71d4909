"""``fit_mapping``: one call from data (and embeddings) to a fitted :class:`IdMapping`."""

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from lhf_torchrec.mapping.buckets import check_bucket_rows, fit_bucketed
from lhf_torchrec.mapping.budget import MAPPING_SHARE, plan_budget
from lhf_torchrec.mapping.embeddings import EmbeddingsLike
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.methods import METHODS, ProfileLike, as_profile, make_estimator
from lhf_torchrec.mapping.profile import IdProfile

# Profiled ids looked up at once when measuring the entries' share of accesses: a lookup's temporaries
# then stay in cache (chunks of 4M ids took 5x longer per id at 1e7 ids).
_CHUNK = 1 << 16


def fit_mapping(
    data: Optional[ProfileLike],
    method: str = "combination",
    num_rows: Optional[int] = None,
    embeddings: Optional[EmbeddingsLike] = None,
    seed: int = 0,
    *,
    total_bytes: Optional[int] = None,
    embedding_dim: Optional[int] = None,
    optimizer: str = "sgd",
    table: str = "table",
    mapping_share: float = MAPPING_SHARE,
    num_buckets: Optional[int] = None,
    **hyperparams,
) -> IdMapping:
    """Fits one table's mapping with ``method`` (see :mod:`lhf_torchrec.mapping.methods`).

    ``data`` is an :class:`IdProfile` or an array/tensor of raw id accesses. Give either
    ``num_rows`` or a budget (``total_bytes`` and ``embedding_dim``): then the number of rows is the
    largest whose table, optimizer state and mapping fit (:func:`plan_budget`, which may raise the
    learned methods' ``min_count`` so that their entries fit in ``mapping_share`` of the budget).
    ``hyperparams`` go to the estimator (see :mod:`lhf_torchrec.mapping.methods` for their
    defaults). ``embeddings`` (raw id -> vector, see :mod:`lhf_torchrec.mapping.embeddings`) are
    required by ``learned`` and ``combination``.

    ``num_buckets`` (B) fits a bucketed mapping (:mod:`lhf_torchrec.mapping.buckets`): the rows
    (``num_rows``, or the budget's rows rounded down) split into B buckets, the method is fitted in
    each, and every id's row lies in its bucket's rows. Fewer than 2 rows per bucket is an error
    (:class:`~lhf_torchrec.mapping.buckets.TooFewRowsForBuckets`, naming the B and rows that work).
    None (the default): one mapping over all rows.

    Example::

        mapping = fit_mapping(train_ids, method="frequency", num_rows=10_000)
        rows = mapping(torch.tensor([3, 1 << 40, -7]))      # every id lands in [0, 10_000)
    """
    if method not in METHODS:
        raise ValueError(f"unknown mapping method '{method}'; choose one of {sorted(METHODS)}")
    if (num_rows is None) == (total_bytes is None):
        raise ValueError(f"table '{table}': give exactly one of num_rows or total_bytes")
    if method == "hash" and data is None:
        profile = None
    else:
        profile = as_profile(data, table)
    num_rows, hyperparams = resolve_rows(profile, method, num_rows=num_rows, total_bytes=total_bytes,
                                         embedding_dim=embedding_dim, optimizer=optimizer, table=table,
                                         mapping_share=mapping_share, num_buckets=num_buckets, seed=seed,
                                         **hyperparams)
    if num_buckets is None:
        estimator = make_estimator(method, num_rows, seed=seed, **hyperparams)
        mapping = estimator.fit(profile, embeddings, table=table).mapping_
    else:
        check_bucket_rows(num_rows, num_buckets, table)
        mapping = fit_bucketed(method, num_rows, num_buckets, profile, embeddings, seed=seed, table=table,
                               **hyperparams)
    record_entry_share(mapping, profile)
    return mapping


def fit_settings(method: str) -> Tuple[str, ...]:
    """The settings :func:`fit_mapping` takes for ``method`` besides its data, rows or budget, seed and buckets:
    the estimator's hyper-parameters (its constructor's keywords) and, for the learned methods, whose
    clustering floor the budget raises, ``mapping_share``."""
    if method not in METHODS:
        raise ValueError(f"unknown mapping method '{method}'; choose one of {sorted(METHODS)}")
    estimator = METHODS[method]
    keywords = [name for name, p in inspect.signature(estimator.__init__).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "seed"]
    return tuple(keywords + (["mapping_share"] if estimator.needs_embeddings else []))


def check_fit_settings(method: str, settings: Mapping[str, Any]) -> None:
    """Raises, before any work, what :func:`fit_mapping` would raise on ``settings`` at fit time: a name
    ``method`` does not take (the error lists those it takes) or a value out of range (the estimator's
    and the budget's own checks, run on a small made-up profile; their errors name the table
    '(every table)')."""
    known = fit_settings(method)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"method '{method}' has no setting {', '.join(map(repr, unknown))}; its settings: "
                         f"{', '.join(known) or 'none'}")
    probe = IdProfile.from_ids(np.repeat(np.arange(100, dtype=np.int64), np.arange(1, 101)))
    plan_budget(probe, embedding_dim=1, total_bytes=1 << 20, method=method, table="(every table)", **settings)


def resolve_rows(
    profile: Optional[IdProfile],
    method: str,
    *,
    num_rows: Optional[int],
    total_bytes: Optional[int],
    embedding_dim: Optional[int],
    optimizer: str,
    table: str,
    mapping_share: float,
    num_buckets: Optional[int],
    seed: int,
    **hyperparams,
) -> Tuple[int, Dict]:
    """(rows, estimator hyper-parameters) of a :func:`fit_mapping` call: ``num_rows`` and
    ``hyperparams`` as given, or those of the budget ``total_bytes`` (:func:`plan_budget`)."""
    if total_bytes is None:
        return num_rows, hyperparams
    if embedding_dim is None:
        raise ValueError(f"table '{table}': a total_bytes budget needs embedding_dim")
    if profile is None:
        raise ValueError(f"table '{table}': a total_bytes budget needs data to profile")
    plan = plan_budget(
        profile, embedding_dim=embedding_dim, total_bytes=total_bytes, method=method,
        optimizer=optimizer, table=table, mapping_share=mapping_share, num_buckets=num_buckets, seed=seed,
        **hyperparams,
    )
    return plan.num_rows, plan.hyperparams


def record_entry_share(mapping: IdMapping, profile: Optional[IdProfile]) -> None:
    """Sets ``mapping.entry_share``: the share of the profile's accesses whose id has an entry."""
    if profile is not None and profile.total > 0:
        mapping.entry_share = round(float(accesses_with_entry(mapping, profile)) / profile.total, 6)


def accesses_with_entry(mapping: IdMapping, profile: IdProfile) -> int:
    """The profile's accesses whose id has an entry in ``mapping``."""
    if mapping.storage in ("sorted", "perfect_hash") and mapping.num_buckets is None:
        # The entries are the stored keys: look them up among the profile's sorted ids, not every id
        # among the keys (entries are usually far fewer than ids; frequency: 1 in 20).
        keys = mapping.stored_entries()[0].numpy()
        found = np.minimum(np.searchsorted(profile.ids, keys), profile.num_ids - 1)
        return int(profile.counts[found[profile.ids[found] == keys]].sum())
    # In chunks: a lookup of every profiled id at once makes several id-sized temporaries (GBs at 1e8).
    ids = torch.from_numpy(profile.ids)
    return sum(int(profile.counts[start:start + _CHUNK][mapping.has_entry(ids[start:start + _CHUNK]).numpy()].sum())
               for start in range(0, profile.num_ids, _CHUNK))
