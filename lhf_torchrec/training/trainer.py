"""Training a (learned-hash) DLRM the TorchRec way, on one CPU or many GPUs.

:class:`Trainer` shards the model with ``DistributedModelParallel`` and the planner, trains it with
``TrainPipelineSparseDist`` (fused FBGEMM optimizer for the tables, a dense optimizer for the MLPs),
validates periodically, and checkpoints with ``torch.distributed.checkpoint``.

Checkpoints hold tensors only (model, optimizer state, progress), so loading one never unpickles
anything; beside them ``lhf_checkpoint.json`` describes the model (architecture, tables, mapping
fingerprints) and what the result depends on (batch size, learning rates, seed, world size, the
training data), with a checksum and the size of every file of the checkpoint. Loading a
checkpoint of another model, or resuming with other settings, is an error that names the
difference. A checkpoint directory is written as ``step_N.partial`` and renamed to ``step_N`` once
every rank has finished, so a killed run leaves only complete checkpoints and loses at most the
steps since the last one. ``resume=True`` continues from the latest complete and intact
checkpoint (a corrupted one is reported and skipped): data order is a fixed function of
(seed, epoch), so a resumed run trains on exactly the batches the uninterrupted run would have.
A directory that already holds checkpoints is never written over without ``resume`` or
``overwrite``.
"""

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm.auto import tqdm

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.planner import LearnedHashPlanner, model_cosharded_tables
from lhf_torchrec.files import atomic_write, check_output_dir
from lhf_torchrec.mapping.budget import OPTIMIZERS
from lhf_torchrec.training.compression import (
    TABLE_WEIGHT_KEY,
    Compression,
    reset_table_optimizer_state,
    write_table_weights,
)
from lhf_torchrec.training.metrics import binary_metrics
from lhf_torchrec.training.model import ModelConfig, build_dlrm
from lhf_torchrec.training.runtime import Runtime, init_runtime

logger = logging.getLogger(__name__)

CHECKPOINT_META = "lhf_checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHECKPOINT_FORMAT = "lhf_torchrec.checkpoint/2"
#: Batches whose ids and labels fingerprint the training data in a checkpoint.
_DATA_FINGERPRINT_BATCHES = 2


@dataclass
class TrainConfig:
    """How to train; ``batch_size`` is per rank, as in TorchRec."""

    batch_size: int = 1024
    epochs: int = 1
    optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    seed: int = 0
    shuffle: bool = True
    eval_every_steps: int = 0  # 0: validate at the end of each epoch only
    checkpoint_dir: Optional[str] = None
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    resume: bool = False
    overwrite: bool = False  # delete the checkpoints already in checkpoint_dir (else they are an error)
    max_steps: int = 0  # 0: no limit
    progress: bool = True
    # Share of the training ids of learned-hash tables replaced by ids never seen (:func:`with_unseen_ids`).
    unseen_id_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{self.optimizer}'; choose one of {sorted(OPTIMIZERS)}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size} and {self.epochs}")
        if not 0.0 <= self.unseen_id_rate < 1.0:
            raise ValueError(f"unseen_id_rate must lie in [0, 1), got {self.unseen_id_rate}")


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    validation: List[Dict[str, Any]] = field(default_factory=list)
    mean_train_loss: float = float("nan")
    resumed_from_step: Optional[int] = None


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different model (architecture, tables or mappings), or, when
    resuming, with other settings or data."""


class CheckpointCorruptError(ValueError):
    """A checkpoint whose files are unreadable, truncated or edited."""


def check_checkpoint_dir(config: TrainConfig) -> None:
    """Before training: ``checkpoint_dir`` must be a writable directory, and checkpoints already
    in it are refused unless the run resumes them or ``overwrite`` deletes them."""
    directory = config.checkpoint_dir
    if not directory:
        return
    check_output_dir(directory, flag="checkpoint directory")
    if config.resume and config.overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the checkpoints or replace them")
    found = checkpoints(directory)
    if found and not (config.resume or config.overwrite):
        raise ValueError(
            f"checkpoint directory {directory} already holds {len(found)} checkpoint(s) of an earlier run "
            f"(latest: {os.path.basename(found[-1])}); resume them (--resume), replace them (--overwrite), "
            f"or choose another directory"
        )


class Trainer:
    """Shards ``build_dlrm(model_config, tables, num_dense, compression)`` and trains it.

    The tables' optimizer (``TrainConfig.optimizer``) is fused into the backward pass with TorchRec's
    ``apply_optimizer_in_backward``, so the planner counts its state; the MLPs use Adam.

    Example::

        trainer = Trainer(ModelConfig(embedding_dim=16), TrainConfig(batch_size=512), tables, num_dense=13,
                          compression=LearnedHashing(load_mappings("mappings.safetensors")))
        result = trainer.fit(train, validation)
        test_metrics = trainer.evaluate(test)    # {"logloss", "auc", "ne", "examples", "click_rate"}
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        tables: List[EmbeddingBagConfig],
        num_dense: int,
        compression: Optional[Compression] = None,
        runtime: Optional[Runtime] = None,
    ) -> None:
        self.model_config = model_config
        self.config = train_config
        self.tables = list(tables)
        self.compression = compression
        self.runtime = runtime or init_runtime()
        torch.manual_seed(train_config.seed)  # dense init: the same on every rank and every run
        unsharded = build_dlrm(model_config, self.tables, num_dense, compression, dense_device=self.runtime.device)
        apply_optimizer_in_backward(
            OPTIMIZERS[train_config.optimizer].cls, unsharded.model.sparse_arch.parameters(), {"lr": train_config.sparse_lr}
        )
        sharders = (compression.sharders() if compression is not None else []) + [EmbeddingBagCollectionSharder()]
        planner = LearnedHashPlanner(
            topology=Topology(
                world_size=self.runtime.world_size,
                local_world_size=self.runtime.local_world_size,
                compute_device=self.runtime.device.type,
            ),
            batch_size=train_config.batch_size,
            # The tables the model keeps co-sharded: planned row-wise, their mapping in their shards.
            cosharded=model_cosharded_tables(unsharded),
        )
        self.plan = planner.collective_plan(unsharded, sharders, dist.GroupMember.WORLD)
        self.model = DistributedModelParallel(unsharded, device=self.runtime.device, plan=self.plan, sharders=sharders)
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(self.model.named_parameters())),
            lambda params: torch.optim.Adam(params, lr=train_config.dense_lr),
        )
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, dense])
        if compression is not None:
            compression.initialize(self)
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.runtime.device)
        self.step = 0
        self._batch_in_epoch = 0
        self._epoch = 0
        self._callback_steps: FrozenSet[int] = frozenset()
        self._data_fingerprint: Optional[Dict[str, Any]] = None  # set by fit()

    # ------------------------------------------------------------------ training
    def fit(self, train: CTRSource, validation: Optional[CTRSource] = None) -> TrainResult:
        """Trains for ``epochs`` (or ``max_steps``), validating and checkpointing on the way."""
        cfg = self.config
        result = TrainResult(steps=0, train_seconds=0.0)
        per_epoch = steps_per_epoch(train.num_examples(), cfg.batch_size, self.runtime.world_size)
        if per_epoch == 0:
            raise ValueError(f"the training data has {train.num_examples():,} examples, fewer than one global batch "
                             f"({cfg.batch_size} per rank x {self.runtime.world_size} ranks); give a smaller "
                             f"--batch-size")
        if cfg.checkpoint_dir:
            self._data_fingerprint = data_fingerprint(train, cfg.batch_size)
            check_checkpoint_dir(cfg)
            if cfg.overwrite:
                self._delete_checkpoints(cfg.checkpoint_dir)
            if cfg.resume:
                result.resumed_from_step = self.load_latest_checkpoint(cfg.checkpoint_dir, resume=True)
        self._callback_steps = (frozenset(self.compression.callback_steps(per_epoch)) if self.compression is not None
                                else frozenset())
        total = per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.epochs)
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.runtime.is_main))
        losses: List[float] = []
        for epoch in range(self._epoch, cfg.epochs):
            if self._done(total):
                break
            batches = train.batches(cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, epoch=epoch, drop_last=True,
                                    rank=self.runtime.rank, world_size=self.runtime.world_size)
            if cfg.unseen_id_rate > 0:  # before the skip of a resumed epoch: the same draws either way
                batches = with_unseen_ids(batches, self._learned_hash_features(), cfg.unseen_id_rate, torch.Generator()
                                          .manual_seed(_unseen_id_seed(cfg.seed, epoch, self.runtime.rank)))
            batches = itertools.islice(batches, self._batch_in_epoch, None)
            finished_epoch = False
            while not self._done(total):
                segment = self._segment_length(total)
                start = time.perf_counter()
                trained = self._train_segment(itertools.islice(batches, segment), losses, bar)
                result.train_seconds += time.perf_counter() - start
                finished_epoch = trained < segment or self._batch_in_epoch >= per_epoch
                if finished_epoch or self._done(total):
                    break
                self._at_boundary(validation, result)
            if finished_epoch:
                self._epoch, self._batch_in_epoch = epoch + 1, 0
            self._at_boundary(validation, result, force=True)
        bar.close()
        result.steps = self.step
        result.mean_train_loss = float(np.mean(losses)) if losses else float("nan")
        return result

    def _learned_hash_features(self) -> FrozenSet[str]:
        """The features whose tables have an ``IdMapping`` (``unseen_id_rate`` needs some)."""
        mapped = set(getattr(self.compression, "mappings", None) or {})
        features = frozenset(f for t in self.tables if t.name in mapped for f in t.feature_names)
        if not features:
            raise ValueError(f"unseen_id_rate={self.config.unseen_id_rate} replaces ids of learned-hash tables, and "
                             f"this model has none (compression: {type(self.compression).__name__})")
        return features

    def _done(self, total: int) -> bool:
        return self.step >= total

    def _segment_length(self, total: int) -> int:
        """Steps until the next validation, checkpoint or compression callback (the pipeline drains there)."""
        length = total - self.step
        for every in (self.config.eval_every_steps, self.config.checkpoint_every_steps):
            if every:
                length = min(length, every - self.step % every)
        length = min([length] + [s - self.step for s in self._callback_steps if s > self.step])
        return max(1, length)

    def _train_segment(self, batches: Iterator, losses: List[float], bar) -> int:
        self.model.train()
        trained = 0
        while True:
            try:
                loss, _logits, _labels = self.pipeline.progress(batches)
            except StopIteration:
                return trained
            trained += 1
            self.step += 1
            self._batch_in_epoch += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)

    def _at_boundary(self, validation: Optional[CTRSource], result: TrainResult, force: bool = False) -> None:
        cfg = self.config
        if self.step in self._callback_steps:
            # Before validation and checkpoint: a checkpoint at this step holds the state after it.
            self.compression.on_callback(self)
        if validation is not None and (force or (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0)):
            metrics = self.evaluate(validation)
            result.validation.append({"step": self.step, **metrics})
            logger.info("step %d validation %s", self.step, metrics)
        if cfg.checkpoint_dir and (force or (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0)):
            self.save_checkpoint(cfg.checkpoint_dir)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data: CTRSource, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Metrics over all of ``data`` (every rank evaluates its slice; the same result on every rank)."""
        return binary_metrics(*self.predict(data, batch_size))

    @torch.no_grad()
    def predict(self, data: CTRSource, batch_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of every example of ``data``, float32 on CPU, the same on every rank (each
        rank predicts its slice; the slices are gathered in rank order)."""
        self.model.eval()
        batches = data.batches(batch_size or self.config.batch_size, rank=self.runtime.rank,
                               world_size=self.runtime.world_size)
        logits, labels = [], []
        while True:
            try:
                _loss, batch_logits, batch_labels = self.pipeline.progress(batches)
            except StopIteration:
                break
            logits.append(batch_logits.float().cpu())
            labels.append(batch_labels.float().cpu())
        self.model.train()
        local = (torch.cat(logits) if logits else torch.zeros(0), torch.cat(labels) if labels else torch.zeros(0))
        gathered: List[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(gathered, local)
        return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])

    # ------------------------------------------------------------------ weights
    def table_weights(self) -> Dict[str, torch.Tensor]:
        """Every table's full weight (rows x dim) on rank 0 (an empty dict elsewhere); all ranks must call."""
        out: Dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            match = TABLE_WEIGHT_KEY.search(key)
            if not match:
                continue
            if isinstance(value, ShardedTensor):
                full = torch.empty(value.size(), dtype=value.dtype) if self.runtime.is_main else None
                value.gather(dst=0, out=full)
            else:
                full = value.detach().cpu()
            if self.runtime.is_main:
                out[match.group(1)] = full
        return out

    def write_table_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        """Writes full table weights (table name -> rows x dim, the same on every rank) into this
        rank's shards; every rank must call."""
        write_table_weights(self.model, weights)

    def reset_table_optimizer_state(self, tables: List[str]) -> None:
        """Zeros the fused optimizer's state of ``tables`` (e.g. after their weights were rewritten)."""
        reset_table_optimizer_state(self.model, tables)

    # ------------------------------------------------------------------ checkpoints
    def _describe(self) -> Dict[str, Any]:
        """What a checkpoint's model is: loading it into another model is an error."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "model_config": asdict(self.model_config),
            "tables": {t.name: {"num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim,
                                "features": list(t.feature_names)} for t in self.tables},
            "compression": self.compression.fingerprint() if self.compression is not None else {},
            "optimizer": self.config.optimizer,
        }

    def _result_settings(self) -> Dict[str, Any]:
        """What else the result of a run depends on: resuming with anything different is an error."""
        cfg = self.config
        return {"batch_size": cfg.batch_size, "sparse_lr": cfg.sparse_lr, "dense_lr": cfg.dense_lr, "seed": cfg.seed,
                "shuffle": cfg.shuffle, "world_size": self.runtime.world_size, "data": self._data_fingerprint,
                # only when set: checkpoints written before the setting existed still resume
                **({"unseen_id_rate": cfg.unseen_id_rate} if cfg.unseen_id_rate else {})}

    def _delete_checkpoints(self, directory: str) -> None:
        if self.runtime.is_main:
            for path in checkpoints(directory, partial=True):
                logger.warning("--overwrite: deleting checkpoint %s", path)
                shutil.rmtree(path)
        dist.barrier()

    def _state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict()["state"],
            "progress": {
                "step": torch.tensor(self.step),
                "epoch": torch.tensor(self._epoch),
                "batch_in_epoch": torch.tensor(self._batch_in_epoch),
            },
        }

    def save_checkpoint(self, directory: str) -> str:
        """Writes ``directory/step_<step>`` (all ranks must call); returns its path."""
        final = os.path.join(directory, f"step_{self.step:09d}")
        partial = final + ".partial"
        if self.runtime.is_main:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=partial)
        dist.barrier()
        if self.runtime.is_main:
            meta = {**self._describe(), "settings": self._result_settings(), "step": self.step,
                    "files": {name: os.path.getsize(os.path.join(partial, name)) for name in sorted(os.listdir(partial))}}
            meta["checksum"] = _json_checksum(meta)
            with atomic_write(os.path.join(partial, CHECKPOINT_META)) as f:
                f.write(json.dumps(meta, indent=1, sort_keys=True).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        dist.barrier()
        return final

    def load_checkpoint(self, path: str, *, resume: bool = False) -> int:
        """Loads a checkpoint directory written by :meth:`save_checkpoint`; returns its step.

        With ``resume`` (called by :meth:`fit`) the settings the result depends on must match too.
        Raises :class:`CheckpointCorruptError` for unreadable, truncated or edited files and
        :class:`CheckpointMismatchError` for a checkpoint of another model or other settings.
        """
        saved = read_checkpoint_meta(path)
        ours = self._describe()
        for key in ours:
            if saved.get(key) != ours[key]:
                detail = _first_difference(saved.get(key), ours[key], key)
                raise CheckpointMismatchError(f"checkpoint {path} was written by another model: {detail}")
        if resume and saved.get("settings") != self._result_settings():
            detail = _first_difference(saved.get("settings"), self._result_settings(), "settings")
            raise CheckpointMismatchError(
                f"checkpoint {path} (step {saved.get('step')}) was written with other settings: {detail}; resume "
                f"with the same settings, or start a new run in another checkpoint directory")
        # Lazy optimizer state must exist before it can be loaded into.
        self.optimizer.init_state()
        full_state = self.optimizer.state_dict()
        state = self._state()
        state["optimizer"] = full_state["state"]
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP raises a CheckpointException wrapping each rank's error
            raise CheckpointCorruptError(
                f"checkpoint {path} (step {saved.get('step')}) could not be loaded: {_first_line(e)}") from e
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(full_state)
        progress = state["progress"]
        self.step = int(progress["step"])
        self._epoch = int(progress["epoch"])
        self._batch_in_epoch = int(progress["batch_in_epoch"])
        return self.step

    def load_latest_checkpoint(self, directory: str, *, resume: bool = False) -> Optional[int]:
        """Loads the newest intact checkpoint under ``directory``; None when there is none.

        A corrupted checkpoint is reported (path, step, what is wrong) and the previous one is
        tried; when every checkpoint is corrupted the error lists them.
        """
        found = checkpoints(directory)
        if not found:
            logger.info("no checkpoint under %s: starting from scratch", directory)
            return None
        problems = []
        for path in reversed(found):
            try:
                return self.load_checkpoint(path, resume=resume)
            except CheckpointCorruptError as e:
                logger.warning("%s; falling back to the previous checkpoint", e)
                problems.append(str(e))
        raise CheckpointCorruptError(f"no intact checkpoint under {directory}: " + "; ".join(problems))


def checkpoints(directory: str, *, partial: bool = False) -> List[str]:
    """The complete ``step_N`` checkpoints under ``directory``, oldest first (with ``partial``, also
    the ``.partial`` ones of a killed run)."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        base = name[: -len(".partial")] if partial and name.endswith(".partial") else name
        if match := _STEP_DIR.match(base):
            steps.append((int(match.group(1)), name))
    return [os.path.join(directory, name) for _, name in sorted(steps)]


def latest_checkpoint(directory: str) -> Optional[str]:
    """The complete ``step_N`` checkpoint with the largest N (``.partial`` ones are ignored)."""
    found = checkpoints(directory)
    return found[-1] if found else None


def read_checkpoint_meta(path: str) -> Dict[str, Any]:
    """The verified ``lhf_checkpoint.json`` of checkpoint ``path``: checksum, and every file the
    checkpoint wrote present at its size. Raises :class:`CheckpointCorruptError` naming the
    checkpoint, its step and the problem."""
    meta_path = os.path.join(path, CHECKPOINT_META)
    step = _STEP_DIR.match(os.path.basename(path))
    where = f"checkpoint {path} (step {int(step.group(1)) if step else '?'})"
    if not os.path.isfile(meta_path):
        raise CheckpointCorruptError(f"{where} is not a complete lhf_torchrec checkpoint (no {CHECKPOINT_META})")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{where}: {CHECKPOINT_META} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("checksum") != _json_checksum(meta):
        raise CheckpointCorruptError(f"{where}: {CHECKPOINT_META} fails its checksum (corrupted, edited, or "
                                     f"written by an older version)")
    for name, size in meta["files"].items():
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            state = "is missing" if actual is None else f"has {actual:,} bytes, {size:,} written (truncated?)"
            raise CheckpointCorruptError(f"{where}: file {name} {state}")
    return meta


def _json_checksum(meta: Dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def data_fingerprint(train: CTRSource, batch_size: int) -> Dict[str, Any]:
    """Rows, features and a hash of the first batches (in order) of the training data."""
    digest = hashlib.sha256()
    for batch in itertools.islice(train.batches(batch_size), _DATA_FINGERPRINT_BATCHES):
        kjt = batch.sparse_features
        for tensor in (kjt.values(), kjt.lengths(), batch.dense_features, batch.labels):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"rows": len(train), "features": list(train.feature_names), "sample_sha256": digest.hexdigest()}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Ids drawn for ``unseen_id_rate``: uniform in [2^62, 2^63), far from counted ids and rarely a hashed string's id
# (an entry among n is drawn with probability n / 2^62 per draw).
_UNSEEN_IDS = (1 << 62, (1 << 63) - 1)


def with_unseen_ids(batches: Iterator[Batch], features: FrozenSet[str], rate: float,
                    generator: torch.Generator) -> Iterator[Batch]:
    """``batches`` with each id of ``features`` replaced, with probability ``rate``, by a random id never
    seen: it has no entry in its table's mapping, so it is hashed into the table's hash region (or the
    vocabulary's row for ids never seen), as an id new at serving time will be.

    Why: when almost every training id has an entry (low clustering floors, a short log), the hash
    rows are trained by almost no id, while the ids first seen after training all land there;
    replacing a few training ids by unseen ones trains those rows for them, as word dropout trains a
    language model's unknown-word vector (docs/results.md, "Unseen ids in training"). Other features
    and the labels are untouched; the draws follow ``generator`` (deterministic given its seed)."""
    for batch in batches:
        kjt = batch.sparse_features
        chosen = torch.tensor([k in features for k in kjt.keys()])
        in_features = torch.repeat_interleave(chosen, torch.tensor(kjt.length_per_key()),
                                              output_size=kjt.values().numel())
        replaced = torch.rand(kjt.values().shape, generator=generator).lt(rate).logical_and_(in_features)
        values = kjt.values().clone()
        values[replaced] = torch.randint(*_UNSEEN_IDS, (int(replaced.sum()),), generator=generator)
        yield Batch(batch.dense_features, KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(),
                                                            weights=kjt.weights_or_none()), batch.labels)


def _unseen_id_seed(seed: int, epoch: int, rank: int) -> int:
    """The generator seed of ``with_unseen_ids`` for one rank's epoch: distinct per (seed, epoch, rank)."""
    return int.from_bytes(hashlib.sha256(f"unseen ids {seed} {epoch} {rank}".encode()).digest()[:8], "big") >> 1


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Training steps per epoch: full global batches only (training drops the last partial one)."""
    return num_rows // (batch_size * world_size)


def _first_difference(saved: Any, ours: Any, path: str) -> str:
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours)):
            if saved.get(key) != ours.get(key):
                return _first_difference(saved.get(key), ours.get(key), f"{path}.{key}")
    return f"'{path}' is {saved!r} in the checkpoint but {ours!r} in this model"
