"""The baselines as the trainer sees them: a :class:`~lhf_torchrec.training.compression.Compression`.

:class:`BaselineCompression` swaps a model's ``EmbeddingBagCollection`` (exact type, as DMP matches
sharders by exact type) for a :class:`ComposedEmbeddingBagCollection` around a *copy* of the fitted
remap, so one fitted baseline can build several models (seeds, resumed runs) that all start from
the fitted state.
"""

import copy
import logging
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.types import ModuleSharder

from lhf_torchrec.baselines.composed import ComposedEBCSharder, ComposedEmbeddingBagCollection, EmbeddingRemap

logger = logging.getLogger(__name__)


def _device_of(ebc: EmbeddingBagCollection) -> torch.device:
    for param in ebc.parameters():
        return param.device
    return torch.device(ebc.device)


def swap_in(model: nn.Module, remap: EmbeddingRemap) -> nn.Module:
    """Replaces the model's ``EmbeddingBagCollection`` holding ``remap``'s tables; returns the model
    (or the new module when ``model`` is that EBC itself)."""
    wanted = sorted(remap.configs)
    found = []

    def visit(path: str, module: nn.Module) -> None:
        if type(module) is EmbeddingBagCollection:
            found.append((path, module))
            return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    matching = [(p, m) for p, m in found if sorted(c.name for c in m.embedding_bag_configs()) == wanted]
    if len(matching) != 1:
        raise ValueError(
            f"'{remap.method}' was fitted for tables {wanted}; the model must have exactly one "
            f"EmbeddingBagCollection with exactly these tables, it has {len(matching)} "
            f"(EBCs at {[p or '<root>' for p, _ in found]})"
        )
    path, ebc = matching[0]
    if ebc.is_weighted():
        raise NotImplementedError(f"'{remap.method}' does not support weighted EmbeddingBagCollections")
    if [c.embedding_dim for c in ebc.embedding_bag_configs()] != [c.embedding_dim for c in remap.full_configs]:
        raise ValueError(f"the EBC at '{path or '<root>'}' has other embedding dims than '{remap.method}' was "
                         "fitted for")
    new = ComposedEmbeddingBagCollection(copy.deepcopy(remap), device=_device_of(ebc))
    if not path:
        return new
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
    logger.info("swapped %s for a '%s' ComposedEmbeddingBagCollection", path, remap.method)
    return model


@dataclass
class BaselineCompression:
    """A fitted baseline's remap in front of a stock EBC of its tables (see :mod:`lhf_torchrec.baselines`)."""

    remap: EmbeddingRemap

    def apply(self, model: nn.Module) -> None:
        swap_in(model, self.remap)

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        return [ComposedEBCSharder()]

    def fingerprint(self) -> Dict[str, str]:
        return {name: f"{self.remap.method}:{fp}" for name, fp in self.remap.fingerprint().items()}
