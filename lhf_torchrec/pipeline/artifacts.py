"""Files between pipeline steps: access profiles and learned embeddings, as safetensors.

Mappings have their own format (:func:`lhf_torchrec.save_mappings`). Everything is written
atomically and read without unpickling; a file of the wrong kind, or one missing a table the run
needs, is an error that names the file and the table.
"""

import json
import os
from typing import Dict, Iterable

import torch

from lhf_torchrec.files import atomic_write
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.profile import IdProfile

_PROFILES = "lhf_torchrec.profiles/1"
_EMBEDDINGS = "lhf_torchrec.embeddings/1"


def _save(path: str, kind: str, tensors: Dict[str, torch.Tensor], tables: Dict[str, Dict]) -> None:
    from safetensors.torch import save

    header = {"format": kind, "tables": json.dumps(tables, sort_keys=True)}
    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=header))


def _load(path: str, kind: str):
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tables = json.loads(header.get("tables", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if header.get("format") != kind:
        raise ValueError(f"{path}: holds {header.get('format')!r}, expected {kind!r}")
    return tensors, tables


def save_profiles(path: str, profiles: Dict[str, IdProfile]) -> None:
    tensors, tables = {}, {}
    for name, p in profiles.items():
        tensors[f"{name}/ids"] = torch.from_numpy(p.ids)
        tensors[f"{name}/counts"] = torch.from_numpy(p.counts)
        tables[name] = {"total": p.total, "capacity": p.capacity, "error_bound": p.error_bound}
    _save(path, _PROFILES, tensors, tables)


def load_profiles(path: str) -> Dict[str, IdProfile]:
    tensors, tables = _load(path, _PROFILES)
    return {
        name: IdProfile(tensors[f"{name}/ids"].numpy(), tensors[f"{name}/counts"].numpy(), int(meta["total"]),
                        meta["capacity"], int(meta["error_bound"]))
        for name, meta in tables.items()
    }


def save_embeddings(path: str, embeddings: Dict[str, IdEmbeddings]) -> None:
    tensors, tables = {}, {}
    for name, e in embeddings.items():
        tensors[f"{name}/ids"] = torch.from_numpy(e.ids)
        tensors[f"{name}/vectors"] = e.vectors.detach().cpu().float()
        tables[name] = {"dim": e.dim}
    _save(path, _EMBEDDINGS, tensors, tables)


def load_embeddings(path: str) -> Dict[str, IdEmbeddings]:
    tensors, tables = _load(path, _EMBEDDINGS)
    return {name: IdEmbeddings(tensors[f"{name}/ids"].numpy(), tensors[f"{name}/vectors"]) for name in tables}


def require_tables(path: str, found: Iterable[str], needed: Iterable[str]) -> None:
    """Raises naming the file and the tables of the model that it lacks."""
    missing = sorted(set(needed) - set(found))
    if missing:
        raise ValueError(f"{path} has nothing for tables {missing} of this model (it has {sorted(found)})")
