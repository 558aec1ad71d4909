"""Other compression methods, compared with the learned hash at equal total bytes.

=========  ==========================================================================================
``qr``     quotient-remainder compositional embeddings, multiplicative (Shi et al., KDD 2020):
           :mod:`lhf_torchrec.baselines.qr`
``mch``    TorchRec's managed-collision hashing (``MCHManagedCollisionModule``), profiled on the
           training stream, then frozen: :mod:`lhf_torchrec.baselines.mch`
``cce``    clustered compositional embeddings (Tsang and Ahle, NeurIPS 2023), reimplemented from the
           paper, clustering during training: :mod:`lhf_torchrec.baselines.cce`
=========  ==========================================================================================

Each is an :class:`~lhf_torchrec.modules.remapped_ebc.EmbeddingRemap` in front of a stock
``EmbeddingBagCollection``, like the learned hash, and each ``fit_*`` returns a
:class:`~lhf_torchrec.training.compression.FittedTables` whose ``compression`` trains through the
same :class:`~lhf_torchrec.training.trainer.Trainer` as every method. They are registered as
methods in :mod:`lhf_torchrec.pipeline.methods`.

Example::

    profiles = profile_tables(split.train, split.tables)
    fitted = fit_qr(split.tables, profiles, compression=8, optimizer="rowwise_adagrad")
    trainer = Trainer(model_config, train_config, split.tables, num_dense, fitted.compression)
"""

from lhf_torchrec.baselines.cce import CCECompression, CCERemap, fit_cce
from lhf_torchrec.baselines.mch import FrozenMCH, MCHRemap, fit_mch, profile_mch
from lhf_torchrec.baselines.qr import QRRemap, QRSplit, fit_qr, qr_split

__all__ = [
    "CCECompression",
    "CCERemap",
    "FrozenMCH",
    "MCHRemap",
    "QRRemap",
    "QRSplit",
    "fit_cce",
    "fit_mch",
    "fit_qr",
    "profile_mch",
    "qr_split",
]
