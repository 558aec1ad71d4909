"""Put remapped EBCs into an existing TorchRec model, in place.

``apply_learned_hashing`` (the learned hash: mappings by table name, any number of EBCs), its
co-sharded variant ``apply_cosharded_learned_hashing`` and ``apply_remap`` (any
:class:`EmbeddingRemap`, for the one EBC that has exactly its tables) share the walk over the model
and the device rules.

Every ``EmbeddingBagCollection`` of the model that holds a table named in ``mappings`` becomes a
:class:`LearnedHashEmbeddingBagCollection` with the same tables, features, device and
``is_weighted``. Mapped tables are rebuilt compressed (``num_embeddings`` = the mapping's rows);
tables without a mapping keep their module, hence their weights.

Only modules whose type is exactly ``EmbeddingBagCollection`` are swapped: TorchRec's
``DistributedModelParallel`` and planner pick a sharder by exact type, and the forward of a subclass
may do things the wrapper would drop. A subclass holding a mapped table is therefore an error rather
than a silent skip (its tables would stay full size and unsharded).
"""

import copy
import logging
from typing import Callable, Collection, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.cosharded import CoShardedLearnedHashEBC, cosharding_refusal
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection, compressed_configs
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap, RemappedEmbeddingBagCollection

logger = logging.getLogger(__name__)


def _ebc_device(ebc: EmbeddingBagCollection) -> torch.device:
    # A model moved with .to() keeps the EBC's construction-time `device`: the weights tell the truth.
    for param in ebc.parameters():
        return param.device
    return torch.device(ebc.device)


def _find_collections(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]:
    """(EBCs and EBC subclasses, remapped EBCs) of ``model`` by module path; does not enter either."""
    ebcs: List[Tuple[str, nn.Module]] = []
    swapped: List[Tuple[str, nn.Module]] = []

    def visit(path: str, module: nn.Module) -> None:
        if isinstance(module, RemappedEmbeddingBagCollection):
            swapped.append((path, module))
            return
        if isinstance(module, EmbeddingBagCollection):
            ebcs.append((path, module))
            return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return ebcs, swapped


# Builds a swapped EBC's twin: (the old EBC, its tables' mappings, the tables' device) -> new module.
TwinBuilder = Callable[[EmbeddingBagCollection, Mapping[str, IdMapping], torch.device], nn.Module]


def apply_learned_hashing(
    model: nn.Module,
    mappings: Mapping[str, IdMapping],
    *,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Swaps the ``EmbeddingBagCollection`` s of ``model`` that hold a mapped table; returns the model.

    Args:
        model: a TorchRec model (e.g. ``torchrec.models.dlrm.DLRM``), or an EBC itself (then the
            returned module is the new one: a module cannot replace itself in place).
        mappings: table name -> fitted :class:`IdMapping`, for tables of any EBC in the model.
        device: device of the compressed tables; by default each EBC's own (``meta`` stays ``meta``
            for deferred initialization under DMP; the mappings then stay where they are).

    Raises:
        ValueError: the model has no EBC; ``mappings`` is empty or names a table no EBC of the model
            has, a table already compressed, or a table name two EBCs share; or a swapped EBC rejects
            its mapping (see :func:`compressed_configs`).
        TypeError: a subclass of ``EmbeddingBagCollection`` holds a mapped table.

    Example::

        model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")), ...)
        apply_learned_hashing(model, {"t_cat_0": fit_mapping(ids, method="frequency", num_rows=10_000)})
        model = DistributedModelParallel(model, sharders=[LearnedHashEBCSharder(fused_params=...)], ...)
    """
    return _swap_learned_hashing(model, mappings, device, _learned_hash_twin)


def apply_cosharded_learned_hashing(
    model: nn.Module,
    mappings: Mapping[str, IdMapping],
    *,
    cosharded_tables: Optional[Collection[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """:func:`apply_learned_hashing`, with a :class:`CoShardedLearnedHashEBC` for every swapped EBC:
    its tables in ``cosharded_tables`` (default: every table whose mapping can co-shard, bucketed and
    one row per id) keep their mapping with their rows (shard them row-wise with
    ``CoShardedEBCSharder``), the others a replicated remap. Raises as :func:`apply_learned_hashing`,
    and ``ValueError`` for a table in ``cosharded_tables`` whose mapping cannot co-shard.

    Example::

        apply_cosharded_learned_hashing(model, fit_mappings(..., num_buckets=64).compression.mappings)
        model = DistributedModelParallel(model, sharders=[CoShardedEBCSharder(...), LearnedHashEBCSharder(...)], ...)
    """
    chosen = None if cosharded_tables is None else set(cosharded_tables)
    if chosen is not None:
        unknown = sorted(chosen - set(mappings))
        if unknown:
            raise ValueError(f"tables {unknown} are to co-shard but have no mapping (mappings: {sorted(mappings)})")
        refused = {name: cosharding_refusal(mappings[name]) for name in sorted(chosen)}
        refused = {name: why for name, why in refused.items() if why is not None}
        if refused:
            raise ValueError(f"tables that cannot co-shard with their mappings: {refused}")

    def twin(ebc: EmbeddingBagCollection, own: Mapping[str, IdMapping], target: torch.device) -> nn.Module:
        mine = None if chosen is None else [name for name in own if name in chosen]
        new = CoShardedLearnedHashEBC(ebc.embedding_bag_configs(), own, cosharded_tables=mine, device=target,
                                      is_weighted=ebc.is_weighted())
        if new.replicated is not None:
            _keep_unmapped_tables(ebc, new.replicated, own, target)
        return new

    return _swap_learned_hashing(model, mappings, device, twin)


def _swap_learned_hashing(
    model: nn.Module, mappings: Mapping[str, IdMapping], device: Optional[Union[str, torch.device]],
    make_twin: TwinBuilder,
) -> nn.Module:
    if not mappings:
        raise ValueError("apply_learned_hashing: no mappings given, nothing to swap")
    ebcs, swapped = _find_collections(model)
    if not ebcs and not swapped:
        raise ValueError(f"apply_learned_hashing: {type(model).__name__} has no EmbeddingBagCollection to swap")

    owners: Dict[str, List[str]] = {}
    for path, ebc in ebcs:
        for config in ebc.embedding_bag_configs():
            owners.setdefault(config.name, []).append(path or "<root>")
    for path, module in swapped:
        already = sorted(set(mappings) & {c.name for c in module.full_embedding_bag_configs()})
        if already:
            raise ValueError(
                f"tables {already} of module '{path or '<root>'}' are already compressed by a "
                f"{type(module).__name__}; apply_learned_hashing swaps plain EBCs only"
            )
    unknown = sorted(set(mappings) - set(owners))
    if unknown:
        raise ValueError(
            f"mappings given for tables {unknown}, which no EmbeddingBagCollection of the model has "
            f"(its tables: {sorted(owners)})"
        )
    shared = {name: paths for name, paths in owners.items() if name in mappings and len(paths) > 1}
    if shared:
        raise ValueError(
            f"mapped table names are used by more than one EmbeddingBagCollection: {shared}; "
            "a mapping by table name would be ambiguous, rename the tables"
        )

    # Validate every swap before making any: an error leaves the model as it was.
    planned: List[Tuple[str, EmbeddingBagCollection, Dict[str, IdMapping]]] = []
    for path, ebc in ebcs:
        own = {c.name: mappings[c.name] for c in ebc.embedding_bag_configs() if c.name in mappings}
        if not own:
            continue
        if type(ebc) is not EmbeddingBagCollection:
            raise TypeError(
                f"module '{path or '<root>'}' is a {type(ebc).__module__}.{type(ebc).__qualname__}, a subclass "
                f"of EmbeddingBagCollection, and holds mapped tables {sorted(own)}: its forward may differ from "
                "the EBC's and DMP shards by exact type, so it cannot be swapped safely. Swap it by hand "
                "or leave its tables out of the mappings"
            )
        compressed_configs(ebc.embedding_bag_configs(), own)
        planned.append((path, ebc, own))

    for path, ebc, own in planned:
        new = make_twin(ebc, own, torch.device(device) if device is not None else _ebc_device(ebc))
        if not path:
            return new
        _replace(model, path, new)
        logger.info("swapped %s for a %s (tables %s)", path, type(new).__name__, sorted(own))
    return model


def apply_remap(model: nn.Module, remapper: EmbeddingRemap) -> nn.Module:
    """Replaces the model's ``EmbeddingBagCollection`` that has exactly ``remapper``'s tables with a
    :class:`RemappedEmbeddingBagCollection` around a *copy* of ``remapper`` (one fitted remap can
    build several models that all start from the fitted state); returns the model (or the new
    module when ``model`` is that EBC itself)."""
    wanted = sorted(remapper.configs)
    ebcs, _ = _find_collections(model)
    found = [(p, m) for p, m in ebcs if type(m) is EmbeddingBagCollection]
    matching = [(p, m) for p, m in found if sorted(c.name for c in m.embedding_bag_configs()) == wanted]
    if len(matching) != 1:
        raise ValueError(
            f"'{remapper.method}' was fitted for tables {wanted}; the model must have exactly one "
            f"EmbeddingBagCollection with exactly these tables, it has {len(matching)} "
            f"(EBCs at {[p or '<root>' for p, _ in found]})"
        )
    path, ebc = matching[0]
    if ebc.is_weighted():
        raise NotImplementedError(f"'{remapper.method}' does not support weighted EmbeddingBagCollections")
    if [c.embedding_dim for c in ebc.embedding_bag_configs()] != [c.embedding_dim for c in remapper.full_configs]:
        raise ValueError(f"the EBC at '{path or '<root>'}' has other embedding dims than '{remapper.method}' was "
                         "fitted for")
    new = RemappedEmbeddingBagCollection(copy.deepcopy(remapper), device=_ebc_device(ebc))
    if not path:
        return new
    _replace(model, path, new)
    logger.info("swapped %s for a '%s' RemappedEmbeddingBagCollection", path, remapper.method)
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def _learned_hash_twin(
    ebc: EmbeddingBagCollection, mappings: Mapping[str, IdMapping], target: torch.device
) -> LearnedHashEmbeddingBagCollection:
    new = LearnedHashEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(), mappings=mappings, device=target, is_weighted=ebc.is_weighted()
    )
    _keep_unmapped_tables(ebc, new, mappings, target)
    return new


def _keep_unmapped_tables(
    ebc: EmbeddingBagCollection, new: LearnedHashEmbeddingBagCollection, mappings: Mapping[str, IdMapping],
    target: torch.device,
) -> None:
    """Tables without a mapping keep their module, its trained weights and all."""
    for config in new.full_embedding_bag_configs():
        old = ebc.embedding_bags[config.name]
        if config.name in mappings or (old.weight.device.type == "meta" and target.type != "meta"):
            continue
        new.ebc.embedding_bags[config.name] = old.to(target)
