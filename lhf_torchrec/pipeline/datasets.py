"""Which data a pipeline run uses: one spec for the embedded default and every reader.

=============  ===========================================================================
``synthetic``   the embedded default: Criteo-shaped rows with planted id groups (no download)
``criteo-tsv``  raw Criteo Kaggle / Terabyte TSV files (8-hex-char ids: a 2^32 id space)
``criteo-npy``  TorchRec's preprocessed ``day_*_{dense,sparse,labels}.npy`` files in a directory
``csv``         CSV/TSV files with a JSON column spec (see :func:`read_csv_spec`)
``movielens``   MovieLens-100k as CTR (fetched from the package index at first use)
=============  ===========================================================================

Rows are split in order into train / validation / test (time order for every source here).
The full-size tables are one per feature. Criteo TSV ids are 32-bit hashes: a table's
``num_embeddings`` is that hash space, never allocated (the full-table baseline keeps a vocabulary
of the ids it saw). CSV tables are sized from the data (:meth:`lhf_torchrec.data.CSVSource.table_sizes`):
integer-coded columns by their id space, every other column (strings, hashes, sparse integers) by
its vocabulary, so a user's file needs no table sizes. ``--num-embeddings-per-feature`` overrides
both. A CSV dataset is named after its file (or the spec's ``name``) in every report. CSV text is
parsed once into a binary cache (:meth:`lhf_torchrec.data.CSVSource.cache`, under ``$LHF_CACHE_DIR``
or ``~/.cache/lhf_torchrec``) that every later pass and run on the same files reads instead.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    split_bounds,
    time_split,
)
from lhf_torchrec.training.model import make_tables

logger = logging.getLogger(__name__)

DATASET_KINDS = ("synthetic", "criteo-tsv", "criteo-npy", "csv", "movielens")
CRITEO_HASH_SPACE = 1 << 32


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

    def record(self) -> Dict[str, Any]:
        """The spec as a run's results record it: ``rows`` and ``scale`` only for synthetic data, the one kind
        they describe (files are read whole)."""
        fields = asdict(self)
        if self.kind != "synthetic":
            del fields["rows"], fields["scale"]
        return fields


def read_csv_spec(path: str) -> CSVSpec:
    """A :class:`CSVSpec` from JSON: the fields of :class:`lhf_torchrec.data.CSVSpec`, e.g. ::

        {"label": "clicked", "categorical": ["user", "ad"], "dense": ["price", "age"],
         "transforms": {"price": ["log1p", "standardize"], "age": "standardize"}, "name": "shop-clicks"}
    """
    try:
        with open(path) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
        known = [f.name for f in dataclass_fields(CSVSpec) if f.init]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            # TorchRec calls id features "sparse"; the spec calls them "categorical", so say which is which.
            raise ValueError(f"unknown field(s) {unknown}; the fields are {known} (categorical = id features, "
                             f"the ones TorchRec calls sparse)")
        return CSVSpec(**fields)
    except FileNotFoundError:
        raise FileNotFoundError(f"CSV spec {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"CSV spec {path} is not valid: {e}") from e


def load_split(spec: DatasetSpec, embedding_dim: int, progress: bool = True) -> SplitData:
    """Opens the dataset, splits it, and describes its full-size tables."""
    name = spec.kind
    if spec.kind == "synthetic":
        synthetic = make_synthetic_criteo(spec.rows, SyntheticCriteoConfig(scale=spec.scale, seed=spec.seed),
                                          progress=progress)
        source = synthetic.data
        default_sizes = lambda: synthetic.truth.cardinalities  # noqa: E731
    elif spec.kind == "criteo-tsv":
        source = CriteoTSV(spec.paths, on_error=spec.on_error)
        default_sizes = lambda: [CRITEO_HASH_SPACE] * len(source.feature_names)  # noqa: E731
    elif spec.kind == "csv":
        csv_spec = read_csv_spec(spec.csv_spec)
        source = CSVSource(spec.paths, csv_spec, on_error=spec.on_error)
        # Parse the text once (every later pass reads the arrays), on one process per host: under
        # torchrun the other ranks of the host wait for local rank 0's cache.
        source.cache(progress=progress, build=int(os.environ.get("LOCAL_RANK", 0)) == 0)
        name = csv_spec.name or _files_name(spec.paths)
        if csv_spec.standardized:
            source.fit_standardization(*split_bounds(len(source), spec.split)[0])
            logger.info("%s: standardized with the training rows' (mean, std): %s", name, source.standardization)
        default_sizes = source.table_sizes
    else:
        if spec.kind == "criteo-npy":
            if len(spec.paths) != 1:
                raise ValueError(f"dataset 'criteo-npy' takes one directory, got {spec.paths}")
            source = CriteoNpyDays(spec.paths[0])
        else:
            source = load_movielens_100k()
        default_sizes = lambda: [max(1, n) for n in source.num_embeddings_per_feature()]  # noqa: E731
    where = f"dataset '{name}'" + (f" ({', '.join(map(str, spec.paths))})" if spec.paths else "")
    if len(source) == 0:
        raise ValueError(f"{where} has no data rows")
    if spec.num_embeddings_per_feature is not None:
        sizes = _checked_sizes(spec.num_embeddings_per_feature, source.feature_names)
        if isinstance(source, CTRData):  # in memory: one cheap pass (file sources are checked at lookup)
            _check_ids_fit(sizes, source)
    else:
        sizes = default_sizes()
    train, validation, test = time_split(source, spec.split)
    if len(train) == 0:
        raise ValueError(f"{where}: the training split of its {len(source)} rows is empty")
    return SplitData(name, train, validation, test, make_tables(source.feature_names, sizes, embedding_dim))


def _files_name(paths: Sequence[str]) -> str:
    """A dataset's name from its files: ``clicks`` for ``data/clicks.csv.gz``, ``a+b`` for two files."""
    stems = [Path(p).name.split(".")[0] or Path(p).name for p in paths]
    return "+".join(stems) if len(stems) <= 3 else f"{stems[0]}+{len(stems) - 1} more"


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
