"""One training job from files: the body of ``lhf train`` / ``lhf evaluate`` and of ``examples/dlrm``.

Every rank of a torchrun / torchx job runs the same call; the data spec, the mapping file and the
configs must be the same on every rank (the sharder checks the mappings).
"""

import json
import logging
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.planner import CoshardedTable
from lhf_torchrec.files import atomic_write
from lhf_torchrec.mapping.fit import check_fit_settings
from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping, load_mappings
from lhf_torchrec.mapping.methods import MIN_COUNT
from lhf_torchrec.mapping.tables import check_budget_split
from lhf_torchrec.pipeline.artifacts import RESULTS_FORMAT
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.pipeline.methods import FitInputs, fit_method, get_method
from lhf_torchrec.pipeline.steps import learn_model, profile_tables, share_tables
from lhf_torchrec.pipeline.table_choice import TABLE_SETTINGS, fit_per_table
from lhf_torchrec.training.compression import LearnedHashing
from lhf_torchrec.training.metrics import untrained_warning
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.runtime import init_runtime
from lhf_torchrec.training.trainer import TrainConfig, Trainer, check_checkpoint_dir, latest_checkpoint

logger = logging.getLogger(__name__)


def run_training(
    dataset: DatasetSpec,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    mappings_path: Optional[str] = None,
    method: str = "full",
    compression: float = 10.0,
    budget_split: str = "table",
    num_buckets: Optional[int] = None,
    per_table: bool = False,
    fit_settings: Optional[Mapping[str, Any]] = None,
    learn_dim: int = 8,
    results_path: Optional[str] = None,
    evaluate_only: bool = False,
) -> Dict[str, Any]:
    """Trains (or, with ``evaluate_only``, loads the latest checkpoint of) a DLRM and tests it.

    The tables are compressed by the mappings in ``mappings_path``, or else by ``method`` fitted
    here on the training split at ``compression`` (``"full"``: uncompressed, with a vocabulary
    where ids are sparse; ``budget_split``: how its bytes go to the tables,
    :func:`~lhf_torchrec.mapping.tables.table_budgets`; ``num_buckets``: bucketed mappings). Bucketed
    mappings (one row per id) whose bucket count the world size divides co-shard row-wise with their tables
    (:class:`~lhf_torchrec.training.compression.LearnedHashing` ``cosharded_world_size``); the
    others keep replicated remaps. ``per_table``: each table's bytes, rare tail and clustering floor
    are chosen on the validation split (:func:`~lhf_torchrec.pipeline.table_choice.fit_per_table`; a
    learned method). ``fit_settings``: the method's fit settings (:func:`~lhf_torchrec.mapping.fit.fit_settings`;
    with ``per_table`` not those it chooses). Returns (and on rank 0 writes to ``results_path``) the validation
    history and test metrics, and a ``warning`` (logged too) when the model learned nothing
    (:func:`~lhf_torchrec.training.metrics.untrained_warning`).
    """
    runtime = init_runtime()
    if not evaluate_only:
        check_checkpoint_dir(train_config)  # before any work: never train for nothing
    fit_settings = dict(fit_settings or {})
    check_budget_split(budget_split)
    if fit_settings and not mappings_path:  # before the data, the profile and the learn step
        check_fit_settings(method, fit_settings)
        chosen_per_table = sorted({k for setting in TABLE_SETTINGS.values() for k in setting} & set(fit_settings))
        if per_table and chosen_per_table:
            raise ValueError(f"a per-table choice sets {', '.join(chosen_per_table)} for each table: do not also give "
                             f"them as fit settings")
    data = load_split(dataset, model_config.embedding_dim, progress=runtime.is_main)
    table_settings: Dict[str, str] = {}  # the setting each table chose (per_table)
    if mappings_path:
        mappings = load_mappings(mappings_path)
        names = [t.name for t in data.tables]
        unknown = sorted(set(mappings) - set(names))
        if unknown:
            raise ValueError(f"{mappings_path} maps tables {unknown}, which this dataset's model does not have "
                             f"(its tables: {names})")
        if runtime.is_main:
            warn_unseen_ids(mappings_path, mappings, data.train, data.tables, train_config.batch_size)
    else:
        if not get_method(method).maps_ids:
            raise ValueError(f"method '{method}' is not a mapping method; train it with lhf bench quality")
        if per_table and not get_method(method).needs_embeddings:
            raise ValueError(f"a per-table choice scores with the learn step's model: it needs a method that learns "
                             f"embeddings (learned, combination), not '{method}'")
        if num_buckets is not None and runtime.world_size > 1 and num_buckets % runtime.world_size == 0:
            # Each rank keeps only its buckets' share of the profiles (fit_mappings plans and fits from it).
            profiles = share_tables(data.train, data.tables, num_buckets, train_config.seed)
        else:
            profiles = profile_tables(data.train, data.tables)
        learned = None
        if get_method(method).needs_embeddings:
            # The learn step keeps the ids from the fit's clustering floor (the budget only raises it).
            learned = learn_model(data.train, data.tables, profiles, dim=learn_dim, train_config=train_config,
                                  min_count=fit_settings.get("min_count", MIN_COUNT), runtime=runtime)
        bucketed = {} if num_buckets is None else {"num_buckets": num_buckets}
        if per_table:
            fitted, table_settings = fit_per_table(learned, data.validation, data.tables, profiles, method,
                                                   compression=compression, optimizer=train_config.optimizer,
                                                   seed=train_config.seed, budget_split=budget_split, **bucketed,
                                                   **fit_settings)
        else:
            fitted = fit_method(method, data.tables, profiles, FitInputs(learned.embeddings if learned else None),
                                compression=compression, optimizer=train_config.optimizer, seed=train_config.seed,
                                budget_split=budget_split, **bucketed, **fit_settings)
        mappings = fitted.compression.mappings
        del learned, fitted  # the learn model is not needed to train
    # Bucketed mappings whose bucket count the world size divides co-shard with their (row-wise) tables.
    tables_compression = LearnedHashing(mappings, cosharded_world_size=runtime.world_size)
    cosharded = set(tables_compression.cosharded_tables)
    if runtime.is_main and cosharded:
        logger.info("co-sharded mappings (row-wise with their tables): %s", tables_compression.cosharded_tables)
    trainer = Trainer(model_config, train_config, data.tables, len(data.train.dense_names), tables_compression,
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
        format=RESULTS_FORMAT,
        dataset=dataset.record(),
        model=asdict(model_config),
        train=asdict(train_config),
        world_size=runtime.world_size,
        cosharded_tables=tables_compression.cosharded_tables,
        table_settings=table_settings,
        fit_settings={} if mappings_path else fit_settings,
        budget_split=None if mappings_path or method == "full" else budget_split,
        # What the mappings cost the whole job: a replicated mapping once per rank, with what its remap
        # adds to apply it (fused.runtime_bytes), a co-sharded one once (its layout, spread over the ranks).
        mapping_bytes=sum(CoshardedTable.of(name, m).nbytes if name in cosharded
                          else (m.nbytes + runtime_bytes(m)) * runtime.world_size for name, m in mappings.items()),
        table_rows={t.name: (mappings[t.name].num_rows if t.name in mappings else t.num_embeddings)
                    for t in data.tables},
    )
    if runtime.is_main:
        logger.info("test %s", outcome["test"])
        if results_path:
            with atomic_write(results_path) as f:
                f.write(json.dumps(outcome, indent=1).encode())
    return outcome



#: Training batches sampled by :func:`warn_unseen_ids`.
COVERAGE_SAMPLE_BATCHES = 8


def warn_unseen_ids(
    source_name: str,
    mappings: Mapping[str, IdMapping],
    train: CTRSource,
    tables: List[EmbeddingBagConfig],
    batch_size: int,
) -> Dict[str, float]:
    """Warns, per table, when far fewer training id accesses have an entry in the mapping than had
    one on the data it was fitted on (a mapping fitted on other data: most ids are merely hashed).

    Samples the first :data:`COVERAGE_SAMPLE_BATCHES` training batches; returns the share of
    sampled accesses without an entry per table with a recorded ``entry_share``.
    """
    values: Dict[str, List[torch.Tensor]] = {}
    batches = train.batches(batch_size)
    for _, batch in zip(range(COVERAGE_SAMPLE_BATCHES), batches):
        for feature, jagged in batch.sparse_features.to_dict().items():
            values.setdefault(feature, []).append(jagged.values())
    unseen: Dict[str, float] = {}
    for t in tables:
        mapping = mappings.get(t.name)
        sampled = [v for f in t.feature_names for v in values.get(f, [])]
        if mapping is None or mapping.entry_share is None or mapping.num_entries == 0 or not sampled:
            continue
        ids = torch.cat(sampled)
        if not ids.numel():
            continue
        unseen[t.name] = 1.0 - float(mapping.has_entry(ids).float().mean())
        expected = 1.0 - mapping.entry_share
        if (1.0 - unseen[t.name]) < 0.5 * mapping.entry_share:
            logger.warning(
                "%s: table '%s': %.0f%% of the id accesses in a sample of the training data (%d) have no entry in "
                "its mapping, against %.0f%% on the data the mapping was fitted on: it was fitted on other data, "
                "and those ids are only hashed", source_name, t.name, 100 * unseen[t.name], ids.numel(),
                100 * expected)
    return unseen
