"""Trains TorchRec's DLRM with learned-hash tables: the entry point of a torchrun / torchx job.

The flags follow TorchRec's DLRM example (``torchrec_dlrm/dlrm_main.py``); the training itself is
:func:`lhf_torchrec.pipeline.run.run_training`, the same as ``lhf train``. Every rank runs this script
with the same arguments; rank 0 prints the test metrics and writes ``--results``.

Example (2 CPU processes, the embedded synthetic data, tables compressed 10x by the "combination" method)::

    torchrun --standalone --nproc_per_node 2 examples/dlrm/dlrm_main.py --synthetic --embedding_dim 16 \\
        --dense_arch_layer_sizes 64,16 --over_arch_layer_sizes 64,32,1 --batch_size 512 \\
        --method combination --compression 10 --results runs/dlrm.json
"""

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

import torch.distributed as dist

from lhf_torchrec.arguments import (
    COMPRESSION,
    LEARN_DIMS,
    SEED,
    check_outputs,
    comma_list,
    float_in,
    input_path,
    int_in,
    output_dir,
    output_file,
)
from lhf_torchrec.mapping.budget import OPTIMIZERS
from lhf_torchrec.pipeline.artifacts import RESULTS_FORMAT
from lhf_torchrec.pipeline.methods import mapping_method_names
from lhf_torchrec.pipeline.datasets import DatasetSpec
from lhf_torchrec.pipeline.run import run_training
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.trainer import TrainConfig

# TorchRec's names for the interaction layer -> ModelConfig.interaction.
INTERACTION_TYPES = {"original": "dot", "dcn": "dcn"}


_comma_ints = comma_list(int_in(1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train TorchRec's DLRM with learned-hash compressed embedding tables (torchrun / torchx).",
        epilog="Batch sizes are per rank: the global batch is --batch_size x world size.",
    )
    data = parser.add_argument_group("data (one source; default --synthetic)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true",
                        help="the embedded synthetic Criteo-shaped data (the default)")
    source.add_argument("--in_memory_binary_criteo_path", type=input_path, metavar="DIR",
                        help="directory of TorchRec's preprocessed day_*_{dense,sparse,labels}.npy files")
    source.add_argument("--criteo_tsv_path", type=input_path, nargs="+", metavar="FILE",
                        help="raw Criteo Kaggle / Terabyte TSV files, in time order")
    data.add_argument("--synthetic_rows", type=int_in(1), default=300_000, help="synthetic: rows to generate")
    data.add_argument("--synthetic_scale", type=float_in(0, low_open=True), default=0.003,
                      help="synthetic: Criteo Kaggle cardinalities x this")
    data.add_argument("--synthetic_seed", type=SEED, default=0, help="synthetic: generator seed")
    data.add_argument("--num_embeddings_per_feature", type=_comma_ints, metavar="N,N,...",
                      help="full table size per feature (default: each feature's id space)")

    model = parser.add_argument_group("model")
    model.add_argument("--embedding_dim", type=int_in(1), default=64)
    model.add_argument("--dense_arch_layer_sizes", type=_comma_ints, metavar="N,...,EMBEDDING_DIM",
                       help="dense arch layer sizes; the last must equal --embedding_dim "
                            "(default 512,256,EMBEDDING_DIM)")
    model.add_argument("--over_arch_layer_sizes", type=_comma_ints, default=[512, 512, 256, 1], metavar="N,...,1",
                       help="over arch layer sizes, ending in 1 (default 512,512,256,1)")
    model.add_argument("--interaction_type", choices=sorted(INTERACTION_TYPES), default="original",
                       help="original: DLRM's dot interaction; dcn: DLRM_DCN's low-rank cross net")
    model.add_argument("--dcn_num_layers", type=int_in(1), default=3, help="dcn: cross layers")
    model.add_argument("--dcn_low_rank_dim", type=int_in(1), default=512, help="dcn: rank of each cross layer")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int_in(1), default=1)
    train.add_argument("--batch_size", type=int_in(1), default=1024, help="per rank")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad",
                       help="fused optimizer of the tables (the MLPs use Adam)")
    train.add_argument("--learning_rate", type=float_in(0, low_open=True), default=0.05,
                       help="learning rate of the tables")
    train.add_argument("--dense_learning_rate", type=float_in(0, low_open=True), default=1e-3,
                       help="learning rate of the MLPs")
    train.add_argument("--seed", type=SEED, default=0, help="model init and data order")
    train.add_argument("--validation_freq_within_epoch", type=int_in(1), metavar="STEPS",
                       help="validate every STEPS training steps (default: at the end of each epoch)")
    train.add_argument("--max_steps", type=int_in(0), default=0, help="stop after this many steps (0: no limit)")
    train.add_argument("--checkpoint_dir", type=output_dir, metavar="DIR", help="DCP checkpoints (a directory every rank can reach)")
    train.add_argument("--checkpoint_freq_within_epoch", type=int_in(1), metavar="STEPS",
                       help="checkpoint every STEPS steps (default: at the end of each epoch)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint_dir")
    train.add_argument("--overwrite", action="store_true", help="delete the checkpoints already in --checkpoint_dir")
    train.add_argument("--print_progress", action="store_true", help="progress bar on rank 0")

    compression = parser.add_argument_group("compression")
    mapping = compression.add_mutually_exclusive_group()
    mapping.add_argument("--mappings", type=input_path, metavar="FILE", help="fitted mappings from `lhf fit`")
    mapping.add_argument("--method", choices=mapping_method_names(), default="full",
                         help="fit this mapping method on the training split before training (default: full tables)")
    compression.add_argument("--compression", type=COMPRESSION, default=10.0,
                             help="with --method: full bytes / (table + mapping bytes)")
    compression.add_argument("--learn_dim", type=int_in(*LEARN_DIMS), default=8,
                             help="with --method learned/combination: dim of the learned id embeddings")
    parser.add_argument("--results", type=output_file(RESULTS_FORMAT), metavar="FILE", help="write validation history and test metrics as JSON (rank 0)")
    return parser


def dataset_spec(args: argparse.Namespace) -> DatasetSpec:
    if args.in_memory_binary_criteo_path:
        kind, paths = "criteo-npy", [args.in_memory_binary_criteo_path]
    elif args.criteo_tsv_path:
        kind, paths = "criteo-tsv", list(args.criteo_tsv_path)
    else:
        kind, paths = "synthetic", []
    return DatasetSpec(kind, paths, rows=args.synthetic_rows, scale=args.synthetic_scale, seed=args.synthetic_seed,
                       num_embeddings_per_feature=args.num_embeddings_per_feature)


def model_config(args: argparse.Namespace) -> ModelConfig:
    dense = args.dense_arch_layer_sizes or [512, 256, args.embedding_dim]
    # TorchRec's flag includes the dense arch's output, which the dot interaction needs to be the embedding dim.
    if dense[-1] != args.embedding_dim:
        raise ValueError(f"--dense_arch_layer_sizes must end with --embedding_dim ({args.embedding_dim}), "
                         f"got {','.join(map(str, dense))}")
    return ModelConfig(embedding_dim=args.embedding_dim, dense_arch_layer_sizes=dense[:-1],
                       over_arch_layer_sizes=args.over_arch_layer_sizes,
                       interaction=INTERACTION_TYPES[args.interaction_type],
                       dcn_num_layers=args.dcn_num_layers, dcn_low_rank_dim=args.dcn_low_rank_dim)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer,
                       sparse_lr=args.learning_rate, dense_lr=args.dense_learning_rate, seed=args.seed,
                       eval_every_steps=args.validation_freq_within_epoch or 0,
                       checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every_steps=args.checkpoint_freq_within_epoch or 0,
                       resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps,
                       progress=args.print_progress)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint_dir")
    # force: importing TorchRec already configured the root logger. FBGEMM logs at INFO on the root
    # logger, so only our own progress (validation, test metrics) is INFO, and only on rank 0.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    logging.getLogger("lhf_torchrec").setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # TorchRec and torch.distributed warn about their own deprecated calls on every rank.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        check_outputs(args)
        outcome = run_training(dataset_spec(args), model_config(args), train_config(args),
                               mappings_path=args.mappings, method=args.method, compression=args.compression,
                               learn_dim=args.learn_dim, results_path=args.results)
    except (ValueError, OSError) as e:
        print(f"dlrm_main: error: {e}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        test = outcome["test"]
        print(f"world size {outcome['world_size']}, {outcome['steps']} steps: test logloss {test['logloss']:.5f}  "
              f"AUC {test['auc']:.5f}  NE {test['ne']:.5f}  ({test['examples']:,} examples)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
