"""MovieLens-100k as a CTR task, fetched from the package index at first use.

The GroupLens files ship inside the ``recbole`` wheel (``recbole/dataset_example/ml-100k/``); the
first call runs ``pip download --no-deps recbole==1.2.1`` with the current interpreter, checks the
three files against pinned SHA-256 digests and caches them under ``<cache>/ml-100k/``. The cache
is the ``cache_dir`` argument, else ``$LHF_CACHE_DIR``, else ``~/.cache/lhf_torchrec``. The data
is never part of this repository (GroupLens terms of use).

As CTR data (100,000 ratings, sorted by timestamp so that :func:`time_split` is a time split):

* label: rating >= 4 (55% of ratings);
* sparse: ``user_id``, ``item_id`` (the raw integer ids, 1..943 and 1..1682), ``age`` (bucket:
  <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender``, ``occupation``, ``zip_prefix`` (first 3
  characters), ``release_year`` (missing for one item); the last four as ids of their sorted
  vocabularies. ``genres`` is multi-valued (1 to 6 genres per movie);
* dense: ``age_z`` and ``release_year_z``, z-scores over the user and item tables (a missing year
  scores 0).
"""

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from lhf_torchrec.data.ctr_data import CTRData
from lhf_torchrec.data.files import PathLike, file_sha256, resolve_cache_dir
from lhf_torchrec.files import atomic_write

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k"
_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
_AGE_BUCKET_EDGES = (18, 25, 35, 45, 50, 56)
_NUM_GENRE_COLUMNS = 6
SPARSE_NAMES = ["user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year"] + [
    f"genre_{i}" for i in range(_NUM_GENRE_COLUMNS)
]
DENSE_NAMES = ["age_z", "release_year_z"]


class DownloadError(RuntimeError):
    """The MovieLens files could not be fetched (offline, or no pip in this environment)."""


def fetch_movielens_100k(cache_dir: PathLike | None = None) -> Path:
    """The directory holding ``ml-100k.{inter,user,item}``, downloading them on first use.

    Example::

        folder = fetch_movielens_100k()  # ~/.cache/lhf_torchrec/ml-100k
    """
    folder = resolve_cache_dir(cache_dir) / "ml-100k"
    if all((folder / name).is_file() and file_sha256(folder / name) == digest for name, digest in _SHA256.items()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading MovieLens-100k (recbole==%s wheel) into %s", RECBOLE_VERSION, folder)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        done = subprocess.run([*command, f"recbole=={RECBOLE_VERSION}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise DownloadError(
                f"could not download recbole=={RECBOLE_VERSION} with pip ({' '.join(command)}): "
                f"{done.stderr.strip()[-500:]}\nor put ml-100k.inter/.user/.item from that wheel in {folder}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name, digest in _SHA256.items():
                content = wheel.read(f"{_WHEEL_DIR}/{name}")
                if hashlib.sha256(content).hexdigest() != digest:
                    raise DownloadError(f"{name} in {wheels[0].name} does not match its pinned SHA-256")
                with atomic_write(folder / name) as f:
                    f.write(content)
    return folder


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(column names without their ``:type`` suffix, rows) of a RecBole atomic file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return header, [line.split("\t") for line in lines[1:] if line]


def _vocabulary_ids(values: list[str]) -> np.ndarray:
    """Ids of values in their sorted vocabulary; the empty string is missing (-1)."""
    vocabulary = {v: i for i, v in enumerate(sorted(set(values) - {""}))}
    return np.array([vocabulary.get(v, -1) for v in values], dtype=np.int64)


def _zscore(x: np.ndarray) -> np.ndarray:
    present = ~np.isnan(x)
    mean, std = x[present].mean(), x[present].std()
    return np.where(present, (x - mean) / std, 0.0)


def load_movielens_100k(cache_dir: PathLike | None = None) -> CTRData:
    """MovieLens-100k ratings as CTR rows in time order (see the module docstring).

    Example::

        data = load_movielens_100k()
        train, val, test = time_split(data, (0.8, 0.1, 0.1))
        tables = dict(zip(data.feature_names, data.num_embeddings_per_feature()))
    """
    folder = fetch_movielens_100k(cache_dir)
    _, inter = _read_table(folder / "ml-100k.inter")
    user_header, users = _read_table(folder / "ml-100k.user")
    item_header, items = _read_table(folder / "ml-100k.item")
    u = {name: [row[i] for row in users] for i, name in enumerate(user_header)}
    it = {name: [row[i] for row in items] for i, name in enumerate(item_header)}

    user_rows = {int(x): i for i, x in enumerate(u["user_id"])}
    ages = np.array(u["age"], dtype=np.float64)
    user_sparse = np.stack(
        [
            np.searchsorted(_AGE_BUCKET_EDGES, ages, side="right"),
            _vocabulary_ids(u["gender"]),
            _vocabulary_ids(u["occupation"]),
            _vocabulary_ids([z[:3] for z in u["zip_code"]]),
        ],
        axis=1,
    )
    user_dense = _zscore(ages)

    item_rows = {int(x): i for i, x in enumerate(it["item_id"])}
    years = [y if y.isdigit() else "" for y in it["release_year"]]
    genres = np.full((len(items), _NUM_GENRE_COLUMNS), -1, dtype=np.int64)
    genre_ids = {g: i for i, g in enumerate(sorted({g for gs in it["class"] for g in gs.split()}))}
    for row, names in enumerate(it["class"]):
        ids = [genre_ids[g] for g in names.split()][:_NUM_GENRE_COLUMNS]
        genres[row, : len(ids)] = ids
    item_sparse = np.concatenate([_vocabulary_ids(years)[:, None], genres], axis=1)
    item_dense = _zscore(np.array([float(y) if y else np.nan for y in years]))

    user_id = np.array([int(r[0]) for r in inter], dtype=np.int64)
    item_id = np.array([int(r[1]) for r in inter], dtype=np.int64)
    rating = np.array([float(r[2]) for r in inter])
    timestamp = np.array([int(float(r[3])) for r in inter], dtype=np.int64)
    order = np.lexsort((item_id, user_id, timestamp))
    user_id, item_id, rating = user_id[order], item_id[order], rating[order]
    urow = np.array([user_rows[x] for x in user_id])
    irow = np.array([item_rows[x] for x in item_id])

    genre_columns = list(range(len(SPARSE_NAMES) - _NUM_GENRE_COLUMNS, len(SPARSE_NAMES)))
    return CTRData(
        dense=np.stack([user_dense[urow], item_dense[irow]], axis=1),
        sparse=np.concatenate([user_id[:, None], item_id[:, None], user_sparse[urow], item_sparse[irow]], axis=1),
        labels=(rating >= 4).astype(np.float32),
        dense_names=DENSE_NAMES,
        sparse_names=SPARSE_NAMES,
        multi_valued={"genres": genre_columns},
    )
