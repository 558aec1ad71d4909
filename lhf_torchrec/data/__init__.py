"""Data layer: CTR rows in memory or streamed from files, as TorchRec ``Batch``es.

* :class:`CTRData` (in memory) and file-backed :class:`StreamingSource`\\ s share the
  :class:`CTRSource` interface: ``batches(batch_size, shuffle=, seed=, epoch=, rank=, world_size=)``
  yields ``torchrec.datasets.utils.Batch`` with a KeyedJaggedTensor; ``chunks``, ``slice``.
* :func:`time_split`: contiguous train/validation/test row ranges, in memory or streamed.
* Sources: :func:`make_synthetic_criteo` (default, with ground truth), raw Criteo TSV
  (:class:`CriteoTSV`), TorchRec npy day files (:class:`CriteoNpyDays`), generic CSV/TSV
  (:class:`CSVSource`), MovieLens-100k (:func:`load_movielens_100k`).

Example::

    from lhf_torchrec.data import make_synthetic_criteo, time_split

    synthetic = make_synthetic_criteo(1_000_000)
    train, val, test = time_split(synthetic.data, (0.8, 0.1, 0.1))
    for batch in train.batches(1024, shuffle=True, epoch=0, rank=rank, world_size=world_size):
        ...
"""

from lhf_torchrec.data.criteo import (
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_TERABYTE_CARDINALITIES,
    CAT_NAMES,
    INT_NAMES,
    CriteoNpyDays,
    CriteoTSV,
    criteo_dense_transform,
    criteo_npy_paths,
    read_criteo_tsv,
    write_criteo_npy_days,
    write_criteo_tsv,
)
from lhf_torchrec.data.ctr_data import CTRData, feature_columns, shuffle_order, sparse_to_kjt
from lhf_torchrec.data.files import DataFormatError, ParseReport
from lhf_torchrec.data.movielens import fetch_movielens_100k, load_movielens_100k
from lhf_torchrec.data.source import CTRSource, StreamingSource, split_bounds, time_split
from lhf_torchrec.data.synthetic import SyntheticCriteo, SyntheticCriteoConfig, SyntheticTruth, make_synthetic_criteo
from lhf_torchrec.data.tabular import CSVSource, CSVSpec, categorical_id, read_csv

__all__ = [
    "CAT_NAMES",
    "CRITEO_KAGGLE_CARDINALITIES",
    "CRITEO_TERABYTE_CARDINALITIES",
    "CSVSource",
    "CSVSpec",
    "CTRData",
    "CTRSource",
    "CriteoNpyDays",
    "CriteoTSV",
    "DataFormatError",
    "INT_NAMES",
    "ParseReport",
    "StreamingSource",
    "SyntheticCriteo",
    "SyntheticCriteoConfig",
    "SyntheticTruth",
    "categorical_id",
    "criteo_dense_transform",
    "criteo_npy_paths",
    "feature_columns",
    "fetch_movielens_100k",
    "load_movielens_100k",
    "make_synthetic_criteo",
    "read_criteo_tsv",
    "read_csv",
    "shuffle_order",
    "sparse_to_kjt",
    "split_bounds",
    "time_split",
    "write_criteo_npy_days",
    "write_criteo_tsv",
]
