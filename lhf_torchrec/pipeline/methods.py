"""The method registry: every compression method by name, for every entry point.

The CLI (``lhf fit``, ``lhf train``), :func:`~lhf_torchrec.pipeline.compare.compare_methods` (the
demo and the quality benchmark) and ``examples/dlrm`` look methods up here. A :class:`Method` says
how to fit it on a model's tables at a budget and whether it needs learned embeddings; every fit
returns a :class:`~lhf_torchrec.training.compression.FittedTables`. ``full`` (the uncompressed
tables) is a method like the others.

=================  =========================================================================
``full``           every table full size, a vocabulary where ids are sparse (no compression)
``hash`` ...       the mapping methods of :mod:`lhf_torchrec.mapping.methods` (``hash``,
                   ``frequency``, ``double_hash``, ``learned``, ``combination``): one
                   :class:`~lhf_torchrec.mapping.id_mapping.IdMapping` per table
``qr``, ``mch``,   the other methods of :mod:`lhf_torchrec.baselines`
``cce``
=================  =========================================================================

Adding a method: one :class:`~lhf_torchrec.modules.remapped_ebc.EmbeddingRemap` subclass, a fit
function that returns a ``FittedTables``, and one entry in :data:`METHODS` (see docs/architecture.md).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

from torchrec import EmbeddingBagConfig

from lhf_torchrec.baselines import fit_cce, fit_mch, fit_qr
from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.methods import METHODS as MAPPING_METHODS
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.pipeline.steps import fit_full, fit_mappings
from lhf_torchrec.training.compression import FittedTables


@dataclass(frozen=True)
class FitInputs:
    """What a method may read besides the profiles: learned embeddings (methods that need them),
    the training stream and the global batch size (``mch`` profiles the stream)."""

    embeddings: Optional[Mapping[str, IdEmbeddings]] = None
    train: Optional[CTRSource] = None
    batch_size: int = 1024


# fit(tables, profiles, inputs, compression=..., optimizer=..., seed=..., budget_split=..., **hyperparams)
FitFunction = Callable[..., FittedTables]


@dataclass(frozen=True)
class Method:
    """A compression method: how to fit it at a budget, and what it needs."""

    name: str
    fit: FitFunction
    needs_embeddings: bool = False
    maps_ids: bool = False  # one IdMapping per table (warm start and ``lhf fit`` need it)


def _mapping_method(name: str) -> Method:
    def fit(tables, profiles, inputs, *, compression, optimizer, seed, budget_split, **hyperparams):
        return fit_mappings(tables, profiles, name, compression=compression, optimizer=optimizer,
                            embeddings=inputs.embeddings, seed=seed, budget_split=budget_split, **hyperparams)

    return Method(name, fit, needs_embeddings=MAPPING_METHODS[name].needs_embeddings, maps_ids=True)


def _fit_full(tables, profiles, inputs, *, compression, optimizer, seed, budget_split, **hyperparams):
    if hyperparams:
        raise TypeError(f"method 'full' takes no hyper-parameters, got {sorted(hyperparams)}")
    return fit_full(tables, profiles, optimizer=optimizer, seed=seed)


def _fit_qr(tables, profiles, inputs, *, compression, optimizer, seed, budget_split, **hyperparams):
    return fit_qr(tables, profiles, compression=compression, optimizer=optimizer, seed=seed, budget_split=budget_split,
                  **hyperparams)


def _fit_mch(tables, profiles, inputs, *, compression, optimizer, seed, budget_split, **hyperparams):
    if inputs.train is None:
        raise ValueError("method 'mch' profiles the training stream: give FitInputs(train=...)")
    return fit_mch(tables, profiles, inputs.train, compression=compression, optimizer=optimizer, seed=seed,
                   batch_size=inputs.batch_size, budget_split=budget_split, **hyperparams)


def _fit_cce(tables, profiles, inputs, *, compression, optimizer, seed, budget_split, **hyperparams):
    return fit_cce(tables, profiles, compression=compression, optimizer=optimizer, seed=seed, budget_split=budget_split,
                  **hyperparams)


METHODS: Dict[str, Method] = {
    "full": Method("full", _fit_full, maps_ids=True),
    **{name: _mapping_method(name) for name in MAPPING_METHODS},
    "qr": Method("qr", _fit_qr),
    "mch": Method("mch", _fit_mch),
    "cce": Method("cce", _fit_cce),
}


def get_method(name: str) -> Method:
    """The method called ``name`` (clear error for unknown names)."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def mapping_method_names() -> List[str]:
    """The methods whose result is one mapping per table (what ``lhf fit`` writes): full + mapping methods."""
    return [name for name, m in METHODS.items() if m.maps_ids]


def fit_method(
    name: str,
    tables: List[EmbeddingBagConfig],
    profiles: Mapping[str, IdProfile],
    inputs: FitInputs = FitInputs(),
    *,
    compression: float,
    optimizer: str = "sgd",
    seed: int = 0,
    budget_split: str = "table",
    **hyperparams,
) -> FittedTables:
    """Fits method ``name`` on every table at ``1 / compression`` of its full bytes (``full``: ignored;
    ``budget_split="access"``: their total split across the tables, the same for every method:
    :func:`~lhf_torchrec.mapping.tables.split_by_access`).

    ``hyperparams`` go to the method's estimator or fit function (their defaults are there).
    """
    method = get_method(name)
    if method.needs_embeddings and inputs.embeddings is None:
        raise ValueError(f"method '{name}' needs learned embeddings (lhf learn)")
    return method.fit(tables, profiles, inputs, compression=compression, optimizer=optimizer, seed=seed,
                      budget_split=budget_split, **hyperparams)
