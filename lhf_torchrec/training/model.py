"""The DLRM models the pipeline trains: TorchRec's own ``DLRM`` / ``DLRM_DCN``, tables swapped by mappings."""

import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import data_type_to_dtype

from lhf_torchrec.training.compression import Compression

_MAX_TENSOR_BYTES = (1 << 63) - 1  # torch's storage sizes are int64


@dataclass
class ModelConfig:
    """Architecture, in the terms of TorchRec's DLRM example."""

    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32, 1])
    interaction: str = "dot"  # "dot" (DLRM) or "dcn" (DLRM_DCN)
    dcn_num_layers: int = 2
    dcn_low_rank_dim: int = 16

    def __post_init__(self) -> None:
        if self.interaction not in ("dot", "dcn"):
            raise ValueError(f"interaction must be 'dot' or 'dcn', got {self.interaction!r}")
        if self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"the over arch must end in 1 output, got {self.over_arch_layer_sizes}")


def table_name(feature: str) -> str:
    """One table per feature, named as in TorchRec's DLRM example."""
    return f"t_{feature}"


def make_tables(
    feature_names: Sequence[str], num_embeddings_per_feature: Sequence[int], embedding_dim: int
) -> List[EmbeddingBagConfig]:
    """The full-size tables: one per categorical feature."""
    if len(feature_names) != len(num_embeddings_per_feature):
        raise ValueError(
            f"{len(feature_names)} features but {len(num_embeddings_per_feature)} table sizes given"
        )
    tables = [
        EmbeddingBagConfig(name=table_name(f), embedding_dim=embedding_dim, num_embeddings=int(n), feature_names=[f])
        for f, n in zip(feature_names, num_embeddings_per_feature)
    ]
    check_addressable(tables)
    return tables


def check_addressable(tables: Sequence[EmbeddingBagConfig]) -> None:
    """Raises a ValueError naming the table and its features when a table has no rows or more bytes
    than a tensor can address: torch cannot build it, not even on the meta device (e.g. a table sized
    from a 2^63 hash space)."""
    for t in tables:
        element_bytes = data_type_to_dtype(t.data_type).itemsize
        if t.num_embeddings < 1 or t.num_embeddings * t.embedding_dim * element_bytes > _MAX_TENSOR_BYTES:
            raise ValueError(
                f"table '{t.name}' (features {list(t.feature_names)}): {t.num_embeddings:,} rows x "
                f"{t.embedding_dim} cannot be allocated; size it from the data's ids (a vocabulary, the "
                f"default for CSV files) or give a smaller --num-embeddings-per-feature"
            )


def build_dlrm(
    config: ModelConfig,
    tables: List[EmbeddingBagConfig],
    num_dense: int,
    compression: Optional[Compression] = None,
    *,
    dense_device: torch.device = torch.device("cpu"),
    table_device: torch.device = torch.device("meta"),
) -> DLRMTrain:
    """A ``DLRMTrain`` with ``tables`` on ``table_device`` (meta: DMP allocates only the shards),
    compressed by ``compression`` (e.g. :class:`LearnedHashing`)."""
    if any(t.embedding_dim != config.embedding_dim for t in tables):
        raise ValueError(f"every table must have embedding_dim {config.embedding_dim}")
    check_addressable(tables)
    ebc = EmbeddingBagCollection(tables=tables, device=table_device)
    # DLRM's dot interaction needs the dense arch to end at the embedding dim.
    dense_sizes = list(config.dense_arch_layer_sizes) + [config.embedding_dim]
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=dense_sizes,
        over_arch_layer_sizes=list(config.over_arch_layer_sizes),
        dense_device=dense_device,
    )
    with warnings.catch_warnings():
        # Without dense features (a CSV of ids only) the dense arch's first layer has no inputs and torch
        # warns, at every model built, that initializing its empty weight does nothing: that is expected.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        if config.interaction == "dcn":
            model = DLRM_DCN(dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank_dim, **common)
        else:
            model = DLRM(**common)
    if compression is not None:
        compression.apply(model)
    return DLRMTrain(model)
