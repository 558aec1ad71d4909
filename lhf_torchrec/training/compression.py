"""How a model's tables are compressed, as the trainer sees it: swap modules in, shard them.

:class:`LearnedHashing` is this project's compression (mappings in front of smaller tables); the
baselines of the quality benchmark that need other modules (e.g. QR embeddings) implement the same
:class:`Compression` protocol, so every method trains through the same DMP, planner, optimizer and
checkpoints.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Protocol

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.types import ModuleSharder

from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.swap import apply_learned_hashing


class Compression(Protocol):
    def apply(self, model: nn.Module) -> None:
        """Swaps the model's EmbeddingBagCollections (built on meta) for compressed modules, in place."""

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        """Sharders for the modules ``apply`` puts in (the stock EBC sharder is always added)."""

    def fingerprint(self) -> Dict[str, str]:
        """What must match for a checkpoint to load: e.g. table name -> mapping fingerprint."""

    # Optional: initialize(trainer), called once on every rank after sharding, before training (a
    # resumed run then loads its checkpoint over it).
    # Optional, for methods that rewrite their state during training (CCE's clustering rounds):
    #   callback_steps(steps_per_epoch) -> Iterable[int]: global steps after which to call back;
    #   on_callback(trainer): called on every rank after each of those steps, with the training
    #   pipeline drained, before that step's validation and checkpoint.


@dataclass
class LearnedHashing:
    """Learned-hash EBCs with these mappings (table name -> :class:`IdMapping`).

    ``initial_weights`` (table name -> rows x dim), when given, replace TorchRec's random init of
    those compressed tables (see :func:`lhf_torchrec.pipeline.steps.warm_start_rows`).
    """

    mappings: Mapping[str, IdMapping]
    initial_weights: Optional[Mapping[str, torch.Tensor]] = None

    def apply(self, model: nn.Module) -> None:
        if self.mappings:
            apply_learned_hashing(model, dict(self.mappings))

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        return [LearnedHashEBCSharder()]

    def fingerprint(self) -> Dict[str, str]:
        return {name: m.fingerprint for name, m in sorted(self.mappings.items())}

    def initialize(self, trainer) -> None:
        if self.initial_weights:
            copy_into_shards(trainer.model, self.initial_weights)


def copy_into_shards(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Writes full table weights (table name -> rows x dim) into the local shards of a sharded model."""
    pattern = re.compile(r"embedding_bags\.([^.]+)\.weight$")
    found = set()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            match = pattern.search(key)
            if not match or match.group(1) not in weights:
                continue
            full = weights[match.group(1)]
            if tuple(full.shape) != tuple(value.shape):
                raise ValueError(f"table '{match.group(1)}': initial weights of shape {tuple(full.shape)} for a "
                                 f"table of shape {tuple(value.shape)}")
            shards = ([(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
                      if isinstance(value, ShardedTensor) else [((0, 0), value)])
            for (row, col), local in shards:
                local.copy_(full[row:row + local.shape[0], col:col + local.shape[1]])
            found.add(match.group(1))
    missing = sorted(set(weights) - found)
    if missing:
        raise ValueError(f"initial weights given for tables {missing}, which the model does not have")
