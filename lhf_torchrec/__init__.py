"""lhf-torchrec: learned hash functions that compress TorchRec embedding tables.

The pieces, in the order a pipeline uses them:

* :mod:`lhf_torchrec.mapping`: profile id accesses, fit a mapping (``fit_mapping``), budgets;
"""

from lhf_torchrec.mapping import (
    IdEmbeddings,
    IdMapping,
    IdProfile,
    fit_mapping,
    load_mappings,
    plan_budget,
    save_mappings,
)
from lhf_torchrec.distributed.planner import plan_report
from lhf_torchrec.modules.swap import apply_learned_hashing

__all__ = [
    "IdEmbeddings",
    "IdMapping",
    "IdProfile",
    "apply_learned_hashing",
    "fit_mapping",
    "load_mappings",
    "plan_budget",
    "plan_report",
    "save_mappings",
]
