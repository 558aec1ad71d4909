"""How a model's tables are compressed, as the trainer sees it: swap modules in, shard them.

:class:`LearnedHashing` is this project's compression (mappings in front of smaller tables); the
baselines of the quality benchmark that need other modules (e.g. QR embeddings) implement the same
:class:`Compression` protocol, so every method trains through the same DMP, planner, optimizer and
checkpoints.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Protocol

from torch import nn
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

    # Optional, for methods that rewrite their state during training (CCE's clustering rounds):
    #   callback_steps(steps_per_epoch) -> Iterable[int]: global steps after which to call back;
    #   on_callback(trainer): called on every rank after each of those steps, with the training
    #   pipeline drained, before that step's validation and checkpoint.


@dataclass
class LearnedHashing:
    """Learned-hash EBCs with these mappings (table name -> :class:`IdMapping`)."""

    mappings: Mapping[str, IdMapping]

    def apply(self, model: nn.Module) -> None:
        if self.mappings:
            apply_learned_hashing(model, dict(self.mappings))

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        return [LearnedHashEBCSharder()]

    def fingerprint(self) -> Dict[str, str]:
        return {name: m.fingerprint for name, m in sorted(self.mappings.items())}
