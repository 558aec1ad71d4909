"""One training job from files: the body of ``lhf train`` / ``lhf evaluate`` and of ``examples/dlrm``.

Every rank of a torchrun / torchx job runs the same call; the data spec, the mapping file and the
configs must be the same on every rank (the sharder checks the mappings).
"""

import json
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, Optional

from lhf_torchrec.files import atomic_write
from lhf_torchrec.mapping.id_mapping import load_mappings
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.mapping.methods import METHODS
from lhf_torchrec.pipeline.steps import fit_mappings, learn_embeddings, profile_tables
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.metrics import untrained_warning
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import init_runtime
from lhf_torchrec.training.trainer import TrainConfig, Trainer, latest_checkpoint

logger = logging.getLogger(__name__)


def run_training(
    dataset: DatasetSpec,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    mappings_path: Optional[str] = None,
    method: str = "full",
    compression: float = 10.0,
    learn_dim: int = 8,
    results_path: Optional[str] = None,
    evaluate_only: bool = False,
) -> Dict[str, Any]:
    """Trains (or, with ``evaluate_only``, loads the latest checkpoint of) a DLRM and tests it.

    The tables are compressed by the mappings in ``mappings_path``, or else by ``method`` fitted
    here on the training split at ``compression`` (``"full"``: uncompressed, with a vocabulary
    where ids are sparse). Returns (and on rank 0 writes to ``results_path``) the validation
    history and test metrics, and a ``warning`` (logged too) when the model learned nothing
    (:func:`~lhf_torchrec.training.metrics.untrained_warning`).
    """
    runtime = init_runtime()
    data = load_split(dataset, model_config.embedding_dim, progress=runtime.is_main)
    if mappings_path:
        mappings = load_mappings(mappings_path)
        names = [t.name for t in data.tables]
        unknown = sorted(set(mappings) - set(names))
        if unknown:
            raise ValueError(f"{mappings_path} maps tables {unknown}, which this dataset's model does not have "
                             f"(its tables: {names})")
    else:
        profiles = profile_tables(data.train, data.tables)
        embeddings = None
        if method in METHODS and METHODS[method].needs_embeddings:
            embeddings = learn_embeddings(data.train, data.tables, profiles, dim=learn_dim,
                                          train_config=train_config, runtime=runtime)
        mappings = fit_mappings(data.tables, profiles, method, compression=compression,
                                optimizer=train_config.optimizer, embeddings=embeddings, seed=train_config.seed).mappings
    trainer = Trainer(model_config, train_config, data.tables, len(data.train.dense_names), LearnedHashing(mappings),
                      runtime)
    if evaluate_only:
        if not train_config.checkpoint_dir or latest_checkpoint(train_config.checkpoint_dir) is None:
            raise FileNotFoundError(f"no checkpoint to evaluate under {train_config.checkpoint_dir!r}")
        step = trainer.load_latest_checkpoint(train_config.checkpoint_dir)
        outcome: Dict[str, Any] = {"checkpoint_step": step}
    else:
        result = trainer.fit(data.train, data.validation)
        warning = untrained_warning("the model", result.validation[-1] if result.validation else None, result.steps)
        if warning and runtime.is_main:
            logger.warning("%s", warning)
        outcome = {"steps": result.steps, "train_seconds": result.train_seconds,
                   "mean_train_loss": result.mean_train_loss, "validation": result.validation,
                   "resumed_from_step": result.resumed_from_step, "warning": warning}
    outcome["test"] = trainer.evaluate(data.test)
    outcome.update(
        dataset=asdict(dataset),
        model=asdict(model_config),
        train=asdict(train_config),
        world_size=runtime.world_size,
        mapping_bytes=sum(m.nbytes for m in mappings.values()),
        table_rows={t.name: (mappings[t.name].num_rows if t.name in mappings else t.num_embeddings)
                    for t in data.tables},
    )
    if runtime.is_main:
        logger.info("test %s", outcome["test"])
        if results_path:
            os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
            with atomic_write(results_path) as f:
                f.write(json.dumps(outcome, indent=1).encode())
    return outcome

