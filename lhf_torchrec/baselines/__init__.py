"""Baselines of the quality benchmark, compared with the learned hash at equal total bytes.

=========  ==========================================================================================
``qr``     quotient-remainder compositional embeddings, multiplicative (Shi et al., KDD 2020):
           :mod:`lhf_torchrec.baselines.qr`
``mch``    TorchRec's managed-collision hashing (``MCHManagedCollisionModule``), profiled on the
           training stream, then frozen: :mod:`lhf_torchrec.baselines.mch`
``cce``    clustered compositional embeddings (Tsang and Ahle, NeurIPS 2023), reimplemented from the
           paper, clustering during training: :mod:`lhf_torchrec.baselines.cce`
=========  ==========================================================================================

Each is fitted at a budget (:func:`fit_baseline` -> :class:`BaselineFit`, whose ``total_bytes`` count
tables, optimizer state, vocabularies and the baseline's own state) and trains through the same
:class:`~lhf_torchrec.training.trainer.Trainer` as every method (``fitted.compression`` is a
``Compression``): its tables are a stock ``EmbeddingBagCollection`` trained by the same fused table
optimizer, behind a remap that runs in ``input_dist`` (:mod:`lhf_torchrec.baselines.composed`).

Example::

    profiles = profile_tables(split.train, split.tables)
    fitted = fit_baseline("qr", split.tables, profiles, split.train, compression=8, optimizer="rowwise_adagrad")
    trainer = Trainer(model_config, train_config, split.tables, num_dense, fitted.compression)

CCE clusters *during* training: :class:`~lhf_torchrec.baselines.cce.CCECompression` defines the
optional ``callback_steps`` / ``on_callback`` of the ``Compression`` protocol, which the trainer
calls after those steps with its pipeline drained, before validation and checkpoints.
"""

from typing import List, Mapping

from torchrec import EmbeddingBagConfig

from lhf_torchrec.baselines.budget import BaselineFit, TableBudget, table_budgets
from lhf_torchrec.baselines.cce import CCECompression, CCERemap, fit_cce
from lhf_torchrec.baselines.composed import (
    ComposedEBCSharder,
    ComposedEmbeddingBagCollection,
    EmbeddingRemap,
    ShardedComposedEBC,
)
from lhf_torchrec.baselines.compression import BaselineCompression
from lhf_torchrec.baselines.mch import FrozenMCH, MCHRemap, fit_mch, profile_mch
from lhf_torchrec.baselines.qr import QRRemap, QRSplit, fit_qr, qr_split
from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.mapping.profile import IdProfile

BASELINES = ("qr", "mch", "cce")


def fit_baseline(
    method: str,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    train: CTRSource,
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    batch_size: int = 1024,
    **hyperparams,
) -> BaselineFit:
    """Fits baseline ``method`` on every table at ``1 / compression`` of its full bytes.

    ``train`` is read only by ``mch`` (profiled in batches of ``batch_size``, the global training
    batch); ``hyperparams`` go to :func:`fit_qr`, :func:`fit_mch` or :func:`fit_cce`.
    """
    common = dict(compression=compression, optimizer=optimizer, seed=seed, **hyperparams)
    if method == "qr":
        return fit_qr(tables, profiles, **common)
    if method == "mch":
        return fit_mch(tables, profiles, train, batch_size=batch_size, **common)
    if method == "cce":
        return fit_cce(tables, profiles, **common)
    raise ValueError(f"unknown baseline '{method}'; choose one of {', '.join(BASELINES)}")


__all__ = [
    "BASELINES",
    "BaselineCompression",
    "BaselineFit",
    "CCECompression",
    "CCERemap",
    "ComposedEBCSharder",
    "ComposedEmbeddingBagCollection",
    "EmbeddingRemap",
    "FrozenMCH",
    "MCHRemap",
    "QRRemap",
    "QRSplit",
    "ShardedComposedEBC",
    "TableBudget",
    "fit_baseline",
    "fit_cce",
    "fit_mch",
    "fit_qr",
    "profile_mch",
    "qr_split",
    "table_budgets",
]
