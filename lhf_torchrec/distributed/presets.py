"""Table sets to plan with: the Criteo presets and table-size files.

A preset or a file only gives the number of ids per table; :func:`table_configs` turns sizes into
``EmbeddingBagConfig``s (one feature per table, named like the table).

Table-size JSON, either form::

    {"C1": 1460, "C2": 583}                                   # name -> num_embeddings
    [{"name": "C1", "num_embeddings": 1460},                  # a list of tables, where
     {"name": "C2", "num_embeddings": 583, "embedding_dim": 64,
      "feature_names": ["C2", "C2_hist"]}]                    # embedding_dim and feature_names are optional
"""

import json
from typing import Dict, List, Sequence

from torch import nn
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.criteo import CRITEO_KAGGLE_CARDINALITIES, CRITEO_TERABYTE_CARDINALITIES

PRESETS: Dict[str, Sequence[int]] = {
    "criteo-kaggle": CRITEO_KAGGLE_CARDINALITIES,
    "criteo-1tb": CRITEO_TERABYTE_CARDINALITIES,
}


def table_configs(sizes: Sequence[dict], embedding_dim: int) -> List[EmbeddingBagConfig]:
    """Configs of tables given as dicts with ``name``, ``num_embeddings`` and optionally
    ``embedding_dim`` (else ``embedding_dim``) and ``feature_names`` (else ``[name]``)."""
    configs = []
    for spec in sizes:
        name, rows = spec["name"], spec["num_embeddings"]
        dim = spec.get("embedding_dim", embedding_dim)
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"table '{name}': num_embeddings must be an integer >= 1, got {rows!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"table '{name}': embedding_dim must be an integer >= 1, got {dim!r}")
        configs.append(
            EmbeddingBagConfig(
                name=name, embedding_dim=dim, num_embeddings=rows,
                feature_names=list(spec.get("feature_names", [name])),
            )
        )
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"table names must be unique, got {names}")
    reserved = sorted(n for n in names if hasattr(nn.ModuleDict, n))
    if reserved:
        raise ValueError(
            f"table names {reserved} are not usable: EmbeddingBagCollection keeps tables in an nn.ModuleDict, "
            "whose methods of the same name they would shadow"
        )
    if not configs:
        raise ValueError("no tables given")
    return configs


def preset_tables(preset: str, embedding_dim: int) -> List[EmbeddingBagConfig]:
    """The 26 tables C1..C26 of a preset (``criteo-kaggle`` or ``criteo-1tb``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
    sizes = [{"name": f"C{i + 1}", "num_embeddings": n} for i, n in enumerate(PRESETS[preset])]
    return table_configs(sizes, embedding_dim)


def load_tables(path: str, embedding_dim: int) -> List[EmbeddingBagConfig]:
    """Tables from a table-size JSON file (see the module docstring for the schema)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        sizes = [{"name": name, "num_embeddings": rows} for name, rows in data.items()]
    elif isinstance(data, list) and all(isinstance(s, dict) for s in data):
        missing = [i for i, s in enumerate(data) if "name" not in s or "num_embeddings" not in s]
        if missing:
            raise ValueError(f"{path}: entries {missing} lack 'name' or 'num_embeddings'")
        sizes = data
    else:
        raise ValueError(
            f'{path}: expected {{"name": num_embeddings, ...}} or a list of '
            '{"name": ..., "num_embeddings": ...} objects'
        )
    return table_configs(sizes, embedding_dim)
