"""Files between pipeline steps: access profiles and learned embeddings, as safetensors.

Mappings have their own format (:func:`lhf_torchrec.save_mappings`). Everything is written
atomically and read without unpickling; every table carries a sha256 checksum of its tensors and
metadata that loading verifies. A file of the wrong kind, a corrupted table, or a file missing a
table the run needs is an error that names the file and the table.
"""

import dataclasses
import json
import os
from typing import Dict, Iterable, List, Tuple

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.distributed.fit import ProfileShare, own_share, share_profile
from lhf_torchrec.files import atomic_write, read_safetensors, safetensors_checksum, tensors_checksum
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.profile import IdProfile

PROFILES_FORMAT = "lhf_torchrec.profiles/1"
EMBEDDINGS_FORMAT = "lhf_torchrec.embeddings/1"
#: ``lhf train --results``: metrics as JSON, with this ``"format"``.
RESULTS_FORMAT = "lhf_torchrec.results/1"


def _table_tensors(tensors: Dict[str, torch.Tensor], table: str) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.split("/", 1)[0] == table}


def _save(path: str, kind: str, tensors: Dict[str, torch.Tensor], tables: Dict[str, Dict]) -> None:
    from safetensors.torch import save

    checksums = {name: tensors_checksum(_table_tensors(tensors, name), meta) for name, meta in tables.items()}
    header = {"format": kind, "tables": json.dumps(tables), "checksums": json.dumps(checksums)}
    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=header))


def _load(path: str, kind: str):
    header, tensors = read_safetensors(path)
    tables, checksums = _tables_of(path, kind, header)
    for name, meta in tables.items():
        _check_table(path, name, checksums, tensors_checksum(_table_tensors(tensors, name), meta))
    return tensors, tables


def _tables_of(path: str, kind: str, header: Dict[str, str]) -> Tuple[Dict, Dict]:
    """(tables' metadata, their checksums) from a file's header, which must declare ``kind``."""
    try:
        tables = json.loads(header.get("tables", "{}"))
        checksums = json.loads(header.get("checksums", "{}"))
    except ValueError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if header.get("format") != kind:
        raise ValueError(f"{path}: holds {header.get('format')!r}, expected {kind!r}")
    return tables, checksums


def _check_table(path: str, name: str, checksums: Dict, checksum: str) -> None:
    if name not in checksums:
        raise ValueError(f"{path}: table '{name}' has no checksum (written by an older version?); re-create the file")
    if checksum != checksums[name]:
        raise ValueError(f"{path}: checksum mismatch for table '{name}': the file is corrupted or was edited")


def save_profiles(path: str, profiles: Dict[str, IdProfile], tables: List[EmbeddingBagConfig]) -> None:
    """Profiles with the configs of the tables they profile (so ``lhf fit`` needs no data)."""
    tensors, meta = {}, {}
    for t in tables:
        p = profiles[t.name]
        tensors[f"{t.name}/ids"] = torch.from_numpy(p.ids)
        tensors[f"{t.name}/counts"] = torch.from_numpy(p.counts)
        meta[t.name] = {"total": p.total, "capacity": p.capacity, "error_bound": p.error_bound,
                        "num_embeddings": t.num_embeddings, "feature_names": list(t.feature_names)}
    _save(path, PROFILES_FORMAT, tensors, meta)


def load_profiles(path: str, embedding_dim: int) -> Tuple[Dict[str, IdProfile], List[EmbeddingBagConfig]]:
    """The profiles and their tables (with ``embedding_dim``), as :func:`save_profiles` wrote them."""
    tensors, meta = _load(path, PROFILES_FORMAT)
    profiles = {
        name: IdProfile(tensors[f"{name}/ids"].numpy(), tensors[f"{name}/counts"].numpy(), int(m["total"]),
                        m["capacity"], int(m["error_bound"]))
        for name, m in meta.items()
    }
    tables = [EmbeddingBagConfig(name=name, embedding_dim=embedding_dim, num_embeddings=int(m["num_embeddings"]),
                                 feature_names=list(m["feature_names"])) for name, m in meta.items()]
    return profiles, tables


def load_profile_shares(
    path: str, embedding_dim: int, num_buckets: int, seed: int = 0
) -> Tuple[Dict[str, ProfileShare], List[EmbeddingBagConfig]]:
    """Each rank's :class:`~lhf_torchrec.distributed.fit.ProfileShare` of the profiles in ``path``
    (collective, under a process group whose world size divides ``num_buckets``), and their tables.

    Each rank reads 1/W of every table's (id, count) pairs and sends them to the ranks that own their
    buckets, so no rank holds a whole profile; the checksums are verified by reading every table in
    chunks (bounded memory) on every rank. Heavy-hitter profiles (which the exchange refuses) are
    read whole and each rank keeps its share.
    """
    from safetensors import SafetensorError, safe_open

    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file {path} does not exist")
    shares: Dict[str, ProfileShare] = {}
    try:
        with safe_open(path, framework="pt") as f:
            tables, checksums = _tables_of(path, PROFILES_FORMAT, f.metadata() or {})
            for name, meta in tables.items():
                names = [k for k in f.keys() if k.split("/", 1)[0] == name]
                _check_table(path, name, checksums, safetensors_checksum(f, names, meta))
            for name, meta in tables.items():
                ids, counts = f.get_slice(f"{name}/ids"), f.get_slice(f"{name}/counts")
                if meta["capacity"] is not None:  # a heavy-hitter summary: bounded, read whole
                    whole = IdProfile(ids[:].numpy(), counts[:].numpy(), int(meta["total"]), meta["capacity"],
                                      int(meta["error_bound"]))
                    shares[name] = own_share(whole, num_buckets, seed, table=name)
                    continue
                size = ids.get_shape()[0]
                low, high = rank * size // world_size, (rank + 1) * size // world_size
                part = counts[low:high].numpy()
                share = share_profile(IdProfile(ids[low:high].numpy(), part, int(part.sum())), num_buckets, seed,
                                      table=name)
                summary = dataclasses.replace(share.summary, total=int(meta["total"]))
                shares[name] = dataclasses.replace(share, summary=summary)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return shares, [EmbeddingBagConfig(name=name, embedding_dim=embedding_dim, num_embeddings=int(m["num_embeddings"]),
                                       feature_names=list(m["feature_names"])) for name, m in tables.items()]


def save_embeddings(path: str, embeddings: Dict[str, IdEmbeddings]) -> None:
    tensors, tables = {}, {}
    for name, e in embeddings.items():
        tensors[f"{name}/ids"] = torch.from_numpy(e.ids)
        tensors[f"{name}/vectors"] = e.vectors.detach().cpu().float()
        tables[name] = {"dim": e.dim}
    _save(path, EMBEDDINGS_FORMAT, tensors, tables)


def load_embeddings(path: str) -> Dict[str, IdEmbeddings]:
    tensors, tables = _load(path, EMBEDDINGS_FORMAT)
    return {name: IdEmbeddings(tensors[f"{name}/ids"].numpy(), tensors[f"{name}/vectors"]) for name in tables}


def require_tables(path: str, found: Iterable[str], needed: Iterable[str]) -> None:
    """Raises naming the file and the tables of the model that it lacks."""
    missing = sorted(set(needed) - set(found))
    if missing:
        raise ValueError(f"{path} has nothing for tables {missing} of this model (it has {sorted(found)})")
