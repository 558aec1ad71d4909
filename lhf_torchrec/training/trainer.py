"""Training a (learned-hash) DLRM the TorchRec way, on one CPU or many GPUs.

:class:`Trainer` shards the model with ``DistributedModelParallel`` and the planner, trains it with
``TrainPipelineSparseDist`` (fused FBGEMM optimizer for the tables, a dense optimizer for the MLPs),
validates periodically, and checkpoints with ``torch.distributed.checkpoint``.

Checkpoints hold tensors only (model, optimizer state, progress), so loading one never unpickles
anything; beside them ``lhf_checkpoint.json`` describes the model (architecture, tables, mapping
fingerprints), and loading a checkpoint of another model is an error that names the difference.
A checkpoint directory is written as ``step_N.partial`` and renamed to ``step_N`` once every rank
has finished, so a killed run leaves only complete checkpoints and loses at most the steps since
the last one. ``resume=True`` continues from the latest: data order is a fixed function of
(seed, epoch), so a resumed run trains on exactly the batches the uninterrupted run would have.
"""

import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm.auto import tqdm

from lhf_torchrec.data.source import CTRSource
from lhf_torchrec.distributed.planner import LearnedHashPlanner
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
    max_steps: int = 0  # 0: no limit
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{self.optimizer}'; choose one of {sorted(OPTIMIZERS)}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size} and {self.epochs}")


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    validation: List[Dict[str, Any]] = field(default_factory=list)
    mean_train_loss: float = float("nan")
    resumed_from_step: Optional[int] = None


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different model (architecture, tables or mappings)."""


class Trainer:
    """Shards ``build_dlrm(model_config, tables, num_dense, compression)`` and trains it.

    The tables' optimizer (``TrainConfig.optimizer``) is fused into the backward pass with TorchRec's
    ``apply_optimizer_in_backward``, so the planner counts its state; the MLPs use Adam.

    Example::

        trainer = Trainer(ModelConfig(embedding_dim=16), TrainConfig(batch_size=512), tables, num_dense=13,
                          compression=LearnedHashing(load_mappings("mappings.safetensors")))
        result = trainer.fit(train, validation)
        test_metrics = trainer.evaluate(test)    # {"logloss", "auc", "ne", "examples"}
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

    # ------------------------------------------------------------------ training
    def fit(self, train: CTRSource, validation: Optional[CTRSource] = None) -> TrainResult:
        """Trains for ``epochs`` (or ``max_steps``), validating and checkpointing on the way."""
        cfg = self.config
        result = TrainResult(steps=0, train_seconds=0.0)
        if cfg.resume and cfg.checkpoint_dir:
            result.resumed_from_step = self.load_latest_checkpoint(cfg.checkpoint_dir)
        per_epoch = steps_per_epoch(len(train), cfg.batch_size, self.runtime.world_size)
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
    @torch.no_grad()
    def evaluate(self, data: CTRSource, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Metrics over all of ``data`` (every rank evaluates its slice; the same result on every rank)."""
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
        return binary_metrics(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))

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
        return {
            "format": "lhf_torchrec.checkpoint/1",
            "model_config": asdict(self.model_config),
            "tables": {t.name: {"num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim,
                                "features": list(t.feature_names)} for t in self.tables},
            "compression": self.compression.fingerprint() if self.compression is not None else {},
            "optimizer": self.config.optimizer,
        }

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
            meta = {**self._describe(), "step": self.step, "world_size": self.runtime.world_size}
            with open(os.path.join(partial, CHECKPOINT_META), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        dist.barrier()
        return final

    def load_checkpoint(self, path: str) -> int:
        """Loads a checkpoint directory written by :meth:`save_checkpoint`; returns its step."""
        meta_path = os.path.join(path, CHECKPOINT_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} is not a complete lhf_torchrec checkpoint (no {CHECKPOINT_META})")
        with open(meta_path) as f:
            saved = json.load(f)
        ours = self._describe()
        for key in ours:
            if saved.get(key) != ours[key]:
                detail = _first_difference(saved.get(key), ours[key], key)
                raise CheckpointMismatchError(f"checkpoint {path} was written by another model: {detail}")
        # Lazy optimizer state must exist before it can be loaded into.
        self.optimizer.init_state()
        full_state = self.optimizer.state_dict()
        state = self._state()
        state["optimizer"] = full_state["state"]
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP raises a CheckpointException wrapping each rank's error
            raise CheckpointMismatchError(f"checkpoint {path} does not fit this model: {e}") from e
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(full_state)
        progress = state["progress"]
        self.step = int(progress["step"])
        self._epoch = int(progress["epoch"])
        self._batch_in_epoch = int(progress["batch_in_epoch"])
        return self.step

    def load_latest_checkpoint(self, directory: str) -> Optional[int]:
        """Loads the newest complete checkpoint under ``directory``; None when there is none."""
        latest = latest_checkpoint(directory)
        if latest is None:
            logger.info("no checkpoint under %s: starting from scratch", directory)
            return None
        return self.load_checkpoint(latest)


def latest_checkpoint(directory: str) -> Optional[str]:
    """The complete ``step_N`` checkpoint with the largest N (``.partial`` ones are ignored)."""
    if not os.path.isdir(directory):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _STEP_DIR.match(name))]
    return os.path.join(directory, max(steps)[1]) if steps else None


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Training steps per epoch: full global batches only (training drops the last partial one)."""
    return num_rows // (batch_size * world_size)


def _first_difference(saved: Any, ours: Any, path: str) -> str:
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours)):
            if saved.get(key) != ours.get(key):
                return _first_difference(saved.get(key), ours.get(key), f"{path}.{key}")
    return f"'{path}' is {saved!r} in the checkpoint but {ours!r} in this model"
