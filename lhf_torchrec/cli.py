"""``lhf``: the command line of lhf-torchrec.

One subcommand per pipeline step; each has an ``_add_<name>_parser(subparsers)`` that declares its
arguments and sets ``handler`` to a function ``(args) -> exit code`` that calls the library. Add a
subcommand by writing both and listing the parser function in ``_SUBCOMMANDS``.

Example::

    lhf plan --preset criteo-1tb --world-size 128 --compression 10
"""

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from typing import Callable, List, Optional

from lhf_torchrec.arguments import (
    COMPRESSION,
    LEARN_DIMS,
    SEED,
    check_outputs,
    comma_list,
    fit_setting,
    fit_settings_of,
    float_in,
    input_path,
    int_in,
    output_dir,
    output_file,
)

EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


def _quiet_torchrec() -> None:
    """TorchRec's planner logs warnings meant for training jobs (dry-run estimates, topology factory)."""
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# ------------------------------------------------------------------------------------------ plan


def _add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.mapping.budget import OPTIMIZERS
    from lhf_torchrec.distributed.presets import PRESETS

    parser = subparsers.add_parser(
        "plan",
        help="per-rank memory of a model before and after compression, from TorchRec's planner",
        description=(
            "Plans the model's embedding tables with TorchRec's sharding planner, before and after "
            "learned-hash compression, and prints per-rank memory (tables, optimizer state, buffers, "
            "mappings) and cluster-wide totals that count every mapping replica and shard. A table's "
            "mapping is co-sharded with its rows (row_wise, each rank holds the mapping of its buckets) "
            "when it is bucketed, has one probe, the world size divides its bucket count and it has at "
            "least 2 rows per bucket; else it is replicated on every rank. Runs without a GPU for any "
            "topology. Exits with 1 if the compressed model does not fit, saying on which ranks and by how much."
        ),
        epilog=(
            'Table-size JSON (--tables): {"C1": 1460, "C2": 583} or [{"name": "C1", "num_embeddings": 1460, '
            '"embedding_dim": 64, "feature_names": ["C1"]}, ...] (embedding_dim and feature_names optional). '
            "Memory sizes are in GB of 2^30 bytes, as TorchRec's planner reports them."
        ),
    )
    tables = parser.add_mutually_exclusive_group(required=True)
    tables.add_argument("--preset", choices=sorted(PRESETS), help="26 Criteo tables with their cardinalities")
    tables.add_argument("--tables", type=input_path, metavar="FILE", help="table sizes as JSON (schema below)")
    after = parser.add_mutually_exclusive_group(required=True)
    after.add_argument(
        "--compression", type=COMPRESSION, metavar="RATIO",
        help="full table bytes / compressed bytes (mappings counted), with synthetic mappings",
    )
    after.add_argument("--mappings", type=input_path, metavar="FILE", help="fitted mappings (save_mappings file) for the tables")
    parser.add_argument("--world-size", type=int_in(1, MAX_PLAN_WORLD_SIZE), required=True,
                        help=f"number of ranks, up to {MAX_PLAN_WORLD_SIZE} (planning time grows with it)")
    parser.add_argument("--local-world-size", type=int_in(1), default=None,
                        help="ranks per host (default min(8, world size))")
    parser.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: tables in HBM (no GPU needed to plan); cpu: tables in DDR")
    parser.add_argument("--hbm-gb", type=float_in(0, low_open=True), default=80.0, help="HBM per rank (default 80)")
    parser.add_argument("--ddr-gb", type=float_in(0, low_open=True), default=128.0, help="DDR per rank (default 128)")
    parser.add_argument("--embedding-dim", type=int_in(1), default=128,
                        help="embedding dim of every table (default 128)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad",
                        help="fused optimizer whose state is counted (default rowwise_adagrad)")
    parser.add_argument("--batch-size", type=int_in(1), default=512, help="batch size per rank (default 512)")
    parser.add_argument("--entry-fraction", type=float_in(0, 1), default=0.1,
                        help="synthetic mappings: share of each table's ids with a stored entry (default 0.1)")
    parser.add_argument("--num-buckets", type=int_in(1), default=None, metavar="B",
                        help="synthetic mappings: bucket them in B buckets, as `lhf fit --num-buckets B` (tables "
                             "with fewer than 2 rows per bucket stay unbucketed); default: the world size, the "
                             "fewest buckets that co-shard on it")
    parser.add_argument("--replicated", action="store_true",
                        help="replicate every mapping on every rank (no co-sharding), to compare")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object (bytes as integers) and nothing else on stdout")
    parser.add_argument("--reserve", type=float_in(0, 1, high_open=True), default=0.15,
                        help="share of HBM kept free by TorchRec's heuristic reservation, in [0, 1) (default 0.15)")
    parser.add_argument("--rank-rows", type=int_in(0), default=16,
                        help="print one row per rank up to this world size, else a summary (default 16)")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from lhf_torchrec.distributed.planner import plan_report
    from lhf_torchrec.distributed.presets import load_tables, preset_tables
    from lhf_torchrec.mapping import load_mappings

    if args.local_world_size is not None and args.local_world_size > args.world_size:
        raise ValueError(f"--local-world-size {args.local_world_size} exceeds --world-size {args.world_size}")
    if args.num_buckets is not None and (args.mappings or args.replicated):
        raise ValueError("--num-buckets is for synthetic mappings (--compression) planned with co-sharding; "
                         "fitted mappings carry their own (lhf fit --num-buckets)")
    tables = (
        preset_tables(args.preset, args.embedding_dim) if args.preset else load_tables(args.tables, args.embedding_dim)
    )
    if args.world_size >= _SLOW_PLAN_WORLD_SIZE:
        print(f"lhf plan: planning {args.world_size} ranks, before and after compression, takes minutes "
              f"(measured on 2 busy CPU cores: ~1 min at 256 ranks, ~3.5 min at 1024)", file=sys.stderr)
    report = plan_report(
        tables,
        world_size=args.world_size,
        local_world_size=args.local_world_size,
        compression=args.compression,
        mappings=load_mappings(args.mappings) if args.mappings else None,
        cosharding=not args.replicated,
        num_buckets=args.num_buckets,
        compute_device=args.compute_device,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        entry_fraction=args.entry_fraction,
        reserve_fraction=args.reserve,
    )
    print(json.dumps(report.as_dict()) if args.json else report.format(max_rank_rows=args.rank_rows))
    if not report.fits:
        print(f"lhf plan: error: after compression, {report.after.error}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


# ------------------------------------------------------------------------------------------ shared arguments


#: lhf plan: TorchRec's planner is tested up to 1024 ranks (~3.5 min on 2 busy CPU cores).
MAX_PLAN_WORLD_SIZE = 1024
_SLOW_PLAN_WORLD_SIZE = 256


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from lhf_torchrec.pipeline.datasets import DATASET_KINDS

    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=DATASET_KINDS, default="synthetic",
                       help="dataset kind (default: the embedded synthetic Criteo-shaped data)")
    group.add_argument("--data-path", type=input_path, nargs="+", default=[], metavar="PATH",
                       help="TSV/CSV files, or the directory of npy day files")
    group.add_argument("--rows", type=int_in(1), default=300_000, help="synthetic: rows to generate")
    group.add_argument("--scale", type=float_in(0, low_open=True), default=0.003,
                       help="synthetic: Criteo Kaggle cardinalities x scale")
    group.add_argument("--data-seed", type=SEED, default=0, help="synthetic: generator seed")
    group.add_argument("--csv-spec", type=input_path, metavar="FILE",
                       help='csv: a JSON column spec, e.g. {"label": "clicked", "categorical": ["user", "ad"], '
                            '"dense": ["price"], "transforms": {"price": ["log1p", "standardize"]}, "name": "shop"} '
                            '(also "delimiter", "header", "column_names"; see docs/quickstart.md)')
    group.add_argument("--num-embeddings-per-feature", type=comma_list(int_in(1)), metavar="N,N,...",
                       help="table sizes (default: from the data: integer-coded ids their id space, string, "
                            "hashed or sparse ids a vocabulary; Criteo TSV its 2^32 hash space, reached through a "
                            "vocabulary)")
    group.add_argument("--split", type=comma_list(float_in(0, 1)), default=[0.8, 0.1, 0.1], metavar="TRAIN,VAL,TEST",
                       help="fractions of rows, in order (default 0.8,0.1,0.1)")
    group.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="malformed lines: stop with an error naming file and line, or skip and count them")


def _dataset(args: argparse.Namespace):
    from lhf_torchrec.pipeline.datasets import DatasetSpec

    return DatasetSpec(args.data, list(args.data_path), rows=args.rows, scale=args.scale, seed=args.data_seed,
                       csv_spec=args.csv_spec, num_embeddings_per_feature=args.num_embeddings_per_feature,
                       split=tuple(args.split), on_error=args.on_error)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (TorchRec DLRM)")
    group.add_argument("--embedding-dim", type=int_in(1), default=16)
    group.add_argument("--dense-arch-layer-sizes", type=comma_list(int_in(1)), default=[64], metavar="N,...",
                       help="hidden sizes of the dense arch (the embedding dim is appended)")
    group.add_argument("--over-arch-layer-sizes", type=comma_list(int_in(1)), default=[64, 32, 1], metavar="N,...,1")
    group.add_argument("--interaction", choices=("dot", "dcn"), default="dot", help="DLRM or DLRM_DCN")


def _model_config(args: argparse.Namespace):
    from lhf_torchrec.training.model import ModelConfig

    return ModelConfig(embedding_dim=args.embedding_dim, dense_arch_layer_sizes=args.dense_arch_layer_sizes,
                       over_arch_layer_sizes=args.over_arch_layer_sizes, interaction=args.interaction)


def _add_train_arguments(parser: argparse.ArgumentParser, *, writes_checkpoints: bool = True) -> None:
    from lhf_torchrec.mapping.budget import OPTIMIZERS

    group = parser.add_argument_group("training")
    group.add_argument("--batch-size", type=int_in(1), default=1024, help="per rank")
    group.add_argument("--epochs", type=int_in(1), default=1)
    group.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad",
                       help="fused optimizer of the tables (its state counts in the memory budget)")
    group.add_argument("--sparse-lr", type=float_in(0, low_open=True), default=0.05, help="learning rate of the tables")
    group.add_argument("--dense-lr", type=float_in(0, low_open=True), default=1e-3,
                       help="learning rate of the MLPs (Adam)")
    group.add_argument("--seed", type=SEED, default=0)
    group.add_argument("--eval-every", type=int_in(0), default=0, help="validate every N steps (0: each epoch)")
    if writes_checkpoints:
        group.add_argument("--checkpoint-dir", type=output_dir, metavar="DIR")
        group.add_argument("--checkpoint-every", type=int_in(0), default=0,
                           help="checkpoint every N steps (0: each epoch)")
        group.add_argument("--resume", action="store_true",
                           help="continue from the latest checkpoint in --checkpoint-dir")
        group.add_argument("--overwrite", action="store_true",
                           help="delete the checkpoints already in --checkpoint-dir and start over")
    else:
        group.add_argument("--checkpoint-dir", type=input_path, metavar="DIR", required=True,
                           help="the training run's checkpoints")
        parser.set_defaults(checkpoint_every=0, resume=False, overwrite=False)
    group.add_argument("--max-steps", type=int_in(0), default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_config(args: argparse.Namespace):
    from lhf_torchrec.training.trainer import TrainConfig

    return TrainConfig(batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer,
                       sparse_lr=args.sparse_lr, dense_lr=args.dense_lr, seed=args.seed,
                       eval_every_steps=args.eval_every, checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every_steps=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
                       max_steps=args.max_steps, progress=not args.no_progress,
                       unseen_id_rate=getattr(args, "unseen_id_rate", 0.0))


def _methods() -> List[str]:
    from lhf_torchrec.pipeline.methods import mapping_method_names

    return mapping_method_names()


# ------------------------------------------------------------------------------------------ profile


def _add_profile_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.pipeline.artifacts import PROFILES_FORMAT

    parser = subparsers.add_parser(
        "profile", help="count id accesses per table on the training split",
        description=(
            "Counts id accesses per table on the training split. Under torchrun each rank counts its share "
            "of the rows and rank 0 writes the merged profiles (exact ones equal one process's)."
        ),
    )
    _add_data_arguments(parser)
    counting = parser.add_mutually_exclusive_group()
    counting.add_argument("--capacity", type=int_in(1), help="heavy-hitter mode: keep at most this many ids per table")
    counting.add_argument("--spill-dir", type=input_path, metavar="DIR",
                          help="exact counts through bounded memory: spill each chunk's counts to a temporary "
                               "directory under DIR (removed afterwards) and merge them bucket by bucket")
    parser.add_argument("--out", type=output_file(PROFILES_FORMAT), required=True, metavar="FILE",
                        help="profiles (safetensors)")
    parser.set_defaults(handler=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    import torch

    from lhf_torchrec.pipeline.artifacts import save_profiles
    from lhf_torchrec.pipeline.datasets import load_split
    from lhf_torchrec.pipeline.steps import profile_tables
    from lhf_torchrec.training.runtime import init_runtime

    runtime = init_runtime()
    data = load_split(_dataset(args), embedding_dim=1, progress=runtime.is_main)
    profiles = profile_tables(data.train, data.tables, capacity=args.capacity, spill_dir=args.spill_dir)
    if runtime.is_main:
        save_profiles(args.out, profiles, data.tables)
    torch.distributed.barrier()  # every rank returns once the file is there
    if not runtime.is_main:
        return EXIT_OK
    print(f"{'table':<10} {'ids':>10} {'accesses':>12} {'seen once':>10}")
    for t in data.tables:
        p = profiles[t.name]
        once = float((p.counts == 1).mean()) if p.num_ids else 0.0
        print(f"{t.name:<10} {p.num_ids:>10,} {p.total:>12,} {once:>10.1%}")
    print(f"wrote {args.out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ learn


def _add_learn_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.mapping.methods import MIN_COUNT
    from lhf_torchrec.pipeline.artifacts import EMBEDDINGS_FORMAT

    parser = subparsers.add_parser("learn", help="learn low-dimensional id embeddings with a short full-table run")
    _add_data_arguments(parser)
    _add_train_arguments(parser)
    parser.add_argument("--profiles", type=input_path, required=True, metavar="FILE", help="from lhf profile")
    parser.add_argument("--dim", type=int_in(*LEARN_DIMS), default=8,
                        help=f"embedding dim to learn ({LEARN_DIMS[0]}..{LEARN_DIMS[1]})")
    parser.add_argument("--min-count", type=int_in(1), default=MIN_COUNT,
                        help="learn the ids seen at least this often: at most the clustering floor of the fits that "
                             "use the embeddings (lhf fit --param min_count=N); the ids of a lower floor have no "
                             "embedding and are hashed (default: the methods' floor, %(default)s)")
    parser.add_argument("--out", type=output_file(EMBEDDINGS_FORMAT), required=True, metavar="FILE",
                        help="embeddings (safetensors)")
    parser.set_defaults(handler=_run_learn)


def _run_learn(args: argparse.Namespace) -> int:
    from lhf_torchrec.pipeline.artifacts import load_profiles, require_tables, save_embeddings
    from lhf_torchrec.pipeline.datasets import load_split
    from lhf_torchrec.pipeline.steps import learn_model
    from lhf_torchrec.training.runtime import init_runtime

    runtime = init_runtime()
    data = load_split(_dataset(args), embedding_dim=args.dim, progress=runtime.is_main)
    profiles, _ = load_profiles(args.profiles, args.dim)
    require_tables(args.profiles, profiles, [t.name for t in data.tables])
    embeddings = learn_model(data.train, data.tables, profiles, dim=args.dim, epochs=args.epochs,
                             min_count=args.min_count, train_config=_train_config(args), runtime=runtime).embeddings
    if runtime.is_main:
        save_embeddings(args.out, embeddings)
        print(f"wrote {args.out}: {args.dim}-d embeddings of {sum(e.ids.size for e in embeddings.values()):,} ids")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ fit


def _add_fit_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.mapping.budget import OPTIMIZERS
    from lhf_torchrec.mapping.id_mapping import MAPPINGS_FORMAT

    parser = subparsers.add_parser(
        "fit", help="fit mappings at a memory budget (mapping bytes counted)",
        description=(
            "Fits one mapping per compressed table at a memory budget. Under torchrun with --num-buckets B (the "
            "world size dividing B) each rank reads 1/W of the profiles and keeps the counts of its own buckets' "
            "ids, the ranks plan the budgets together (the same plans as one process's), each fits only its own "
            "buckets (bucket b on rank b * W / B, k-means included) and rank 0 writes the gathered mappings, equal "
            "to one process's. Unbucketed mappings are fitted on every rank from the whole profiles, as in one "
            "process."
        ),
    )
    parser.add_argument("--profiles", type=input_path, required=True, metavar="FILE", help="from lhf profile")
    parser.add_argument("--embeddings", type=input_path, metavar="FILE", help="from lhf learn (learned and combination)")
    parser.add_argument("--method", choices=_methods(), default="combination")
    parser.add_argument("--compression", type=COMPRESSION, default=10.0,
                        help="full table bytes / (table + mapping bytes) of the compressed tables")
    _add_budget_split_argument(parser)
    parser.add_argument("--embedding-dim", type=int_in(1), default=16)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad",
                        help="whose state counts in the budget")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--num-buckets", type=int_in(1), metavar="B",
                        help="bucketed mappings (to co-shard them row-wise with their tables; every planned world "
                             "size must divide B): rows rounded down to a multiple of B, each id stays in its "
                             "bucket's rows; tables with fewer than 2*B rows stay unbucketed (default: no buckets)")
    _add_param_argument(parser)
    parser.add_argument("--out", type=output_file(MAPPINGS_FORMAT), required=True, metavar="FILE",
                        help="mappings (safetensors)")
    parser.set_defaults(handler=_run_fit)


def _add_budget_split_argument(parser: argparse.ArgumentParser, applies: str = "") -> None:
    from lhf_torchrec.mapping.tables import ACCESS_SPLIT_FLOOR, BUDGET_SPLITS

    parser.add_argument("--budget-split", choices=BUDGET_SPLITS, default="table",
                        help=f"{applies}how the compression's bytes go to the tables: 'table' (default): each "
                             f"compressed table at 1/compression of its full bytes; 'access': their total, split "
                             f"across the tables by the share of a table's accesses an id's row takes (tables of few, "
                             f"often seen ids grow, up to full size; no table below {ACCESS_SPLIT_FLOOR * 100:.0f}%% "
                             f"of its own budget; it helps where small tables carry the signal and hurts where they "
                             f"do not: compare both on validation; docs/method.md, 'Splitting the budget across "
                             f"tables')")


def _add_param_argument(parser: argparse.ArgumentParser, applies: str = "") -> None:
    from lhf_torchrec.mapping.fit import fit_settings
    from lhf_torchrec.mapping.methods import METHODS

    accepted = "; ".join(f"{m}: {', '.join(fit_settings(m))}" for m in METHODS if fit_settings(m))
    parser.add_argument("--param", type=fit_setting, action="append", dest="params", metavar="NAME=VALUE",
                        help=f"{applies}a setting of the method's fit, repeatable ({accepted}); e.g. --param "
                             "hashed_fraction=0 --param min_count=30 (the setting 'tail 1 row, floor 30' of lhf bench "
                             "quality --select, whose report gives each chosen setting's flags). Default: the "
                             "method's defaults")


def _params(args: argparse.Namespace) -> dict:
    """The --param settings of a command that fits ``args.method`` (checked against the method by the fit's
    caller before any work: ``check_fit_settings``)."""
    settings = fit_settings_of(args.params)
    if settings and (args.method == "full" or getattr(args, "mappings", None)):
        raise ValueError("--param sets the fit of a compressed --method (fitted here), not of 'full' tables or "
                         "of --mappings")
    return settings


def _run_fit(args: argparse.Namespace) -> int:
    import torch

    from lhf_torchrec.mapping import save_mappings
    from lhf_torchrec.mapping.fit import check_fit_settings
    from lhf_torchrec.mapping.tables import full_table_bytes
    from lhf_torchrec.pipeline.artifacts import load_embeddings, load_profile_shares, load_profiles, require_tables
    from lhf_torchrec.pipeline.methods import FitInputs, fit_method, get_method
    from lhf_torchrec.training.runtime import init_runtime

    runtime = init_runtime()
    if args.num_buckets is not None and args.method == "full":
        raise ValueError("--num-buckets applies to the compressed mapping methods, not 'full'")
    if args.budget_split != "table" and args.method == "full":
        raise ValueError("--budget-split splits the bytes of the compressed mapping methods, not of 'full' tables")
    settings = _params(args)
    if settings:
        check_fit_settings(args.method, settings)  # before the profiles are read
    if args.num_buckets is not None and runtime.world_size > 1 and args.num_buckets % runtime.world_size == 0:
        # Each rank reads and keeps only its buckets' share of the profiles.
        profiles, tables = load_profile_shares(args.profiles, args.embedding_dim, args.num_buckets, args.seed)
        summaries = {name: share.summary for name, share in profiles.items()}
    else:
        profiles, tables = load_profiles(args.profiles, args.embedding_dim)
        summaries = profiles
    embeddings = None
    if get_method(args.method).needs_embeddings:
        if not args.embeddings:
            raise ValueError(f"method '{args.method}' needs --embeddings (from lhf learn)")
        embeddings = load_embeddings(args.embeddings)
        require_tables(args.embeddings, embeddings, [t for t in summaries if summaries[t].num_ids])
    budget_settings = {} if args.num_buckets is None else {"num_buckets": args.num_buckets}
    fitted = fit_method(args.method, tables, profiles, FitInputs(embeddings), compression=args.compression,
                        optimizer=args.optimizer, seed=args.seed, budget_split=args.budget_split, **budget_settings,
                        **settings)
    mappings = fitted.compression.mappings
    if runtime.is_main:
        save_mappings(args.out, mappings)
    torch.distributed.barrier()  # every rank returns once the file is there
    if not runtime.is_main:
        return EXIT_OK
    full = full_table_bytes(tables, summaries, args.optimizer)
    print(f"{'table':<10} {'rows':>10} {'hot':>8} {'clustered':>10} {'hashed':>8} {'entries':>9} {'mapping':>11} "
          f"storage{'  buckets' if args.num_buckets else ''}")
    for t in tables:
        m = mappings.get(t.name)
        if m is None:
            print(f"{t.name:<10} {fitted.rows[t.name]:>10,} {'(full size, no mapping)':>50}")
            continue
        lay = m.layout
        print(f"{t.name:<10} {m.num_rows:>10,} {lay.get('hot', 0):>8,} {lay.get('clustered', 0):>10,} "
              f"{lay.get('hashed', 0):>8,} {m.num_entries:>9,} {m.nbytes:>10,}B {m.storage:<7}"
              + (f"  {m.num_buckets or 'none'}" if args.num_buckets else ""))
    if settings:
        print(f"{args.method} with {', '.join(f'{k}={v}' for k, v in settings.items())}")
    print(f"{args.method}: {fitted.total_bytes:,} bytes (tables + {args.optimizer} state {fitted.table_bytes:,}, "
          f"mappings {fitted.mapping_bytes:,}) vs full {full:,} bytes: {full / fitted.total_bytes:.2f}x smaller")
    print(f"wrote {args.out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ train / evaluate


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.pipeline.artifacts import RESULTS_FORMAT

    parser = subparsers.add_parser(
        "train", help="train a DLRM with compressed tables (or full ones)",
        description=(
            "Trains TorchRec's DLRM on the training split, validates each epoch and tests the result. Warns "
            "(and writes 'warning' into --results) when the model learned nothing: validation NE >= 1 or "
            "AUC <= 0.5, with the number of steps it had; give more --epochs or a smaller --batch-size."
        ),
    )
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_train_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mappings", type=input_path, metavar="FILE", help="from lhf fit")
    source.add_argument("--method", choices=_methods(), default="full",
                        help="fit this method here on the training split instead (default: full tables)")
    parser.add_argument("--compression", type=COMPRESSION, default=10.0, help="with --method")
    _add_budget_split_argument(parser, "with --method: ")
    parser.add_argument("--unseen-id-rate", type=float_in(0, 1, high_open=True), default=0.0, metavar="P",
                        help="replace this share of the compressed tables' training ids by ids never seen, so the "
                             "hash rows that new ids land in are trained for them (docs/results.md, 'Unseen ids in "
                             "training'; default 0: off)")
    parser.add_argument("--num-buckets", type=int_in(1), metavar="B",
                        help="with --method: bucketed mappings; under torchrun, tables whose bucket count the world "
                             "size divides keep their mapping with their rows (co-sharded row-wise), as do bucketed "
                             "--mappings, and each rank profiles its share of the rows and fits only its own "
                             "buckets (default: no buckets; unbucketed mappings are fitted on every rank)")
    parser.add_argument("--per-table", action="store_true",
                        help="with --method combination or learned: choose each table's bytes (within the same "
                             "total), then its rare tail (10%% of the rows or one shared row) and clustering floor, on "
                             "the validation split, scored by the learn step's model (docs/method.md, 'Per-table "
                             "choice')")
    _add_param_argument(parser, "with --method: ")
    parser.add_argument("--results", type=output_file(RESULTS_FORMAT), metavar="FILE", help="write the metrics as JSON")
    parser.set_defaults(handler=_run_train, evaluate_only=False)


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.pipeline.artifacts import RESULTS_FORMAT

    parser = subparsers.add_parser("evaluate", help="test metrics of the latest checkpoint of a training run")
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_train_arguments(parser, writes_checkpoints=False)
    parser.add_argument("--mappings", type=input_path, metavar="FILE", help="the mappings the run trained with")
    parser.add_argument("--results", type=output_file(RESULTS_FORMAT), metavar="FILE", help="write the metrics as JSON")
    parser.set_defaults(handler=_run_train, evaluate_only=True, method="full", compression=1.0, num_buckets=None,
                        per_table=False, params=None, budget_split="table")


def _run_train(args: argparse.Namespace) -> int:
    from lhf_torchrec.pipeline.run import run_training
    from lhf_torchrec.training.runtime import init_runtime

    if args.num_buckets is not None and (args.mappings or args.method == "full"):
        raise ValueError("--num-buckets applies to a compressed --method fitted here (bucketed --mappings co-shard "
                         "as they are)")
    if args.budget_split != "table" and (args.mappings or args.method == "full"):
        raise ValueError("--budget-split splits the bytes of a compressed --method fitted here (--mappings carry their "
                         "own sizes)")
    if args.per_table and (args.mappings or args.method == "full"):
        raise ValueError("--per-table chooses the settings of a --method fitted here (combination or learned)")
    settings = _params(args)  # run_training checks them before it reads the data
    outcome = run_training(_dataset(args), _model_config(args), _train_config(args), mappings_path=args.mappings,
                           method=args.method, compression=args.compression, budget_split=args.budget_split,
                           num_buckets=args.num_buckets, per_table=args.per_table, fit_settings=settings,
                           results_path=args.results, evaluate_only=args.evaluate_only)
    if init_runtime().is_main:
        for table, setting in outcome.get("table_settings", {}).items():
            print(f"table {table}: {setting} (chosen on validation)")
        test = outcome["test"]
        print(f"test: logloss {test['logloss']:.5f}  AUC {test['auc']:.5f}  NE {test['ne']:.5f}  "
              f"({test['examples']:,} examples)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ demo


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.pipeline.demo import DemoConfig

    default = DemoConfig()
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on the embedded synthetic data: 4 methods vs full tables at equal bytes"
    )
    parser.add_argument("--rows", type=int_in(1), default=default.rows)
    parser.add_argument("--scale", type=float_in(0, low_open=True), default=default.scale)
    parser.add_argument("--compression", type=COMPRESSION, default=default.compression)
    parser.add_argument("--epochs", type=int_in(1), default=default.epochs)
    parser.add_argument("--seed", type=SEED, default=default.seed)
    parser.add_argument("--out-dir", type=output_dir, default=default.out_dir)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from lhf_torchrec.pipeline.demo import DemoConfig, run_demo

    run_demo(DemoConfig(rows=args.rows, scale=args.scale, compression=args.compression, epochs=args.epochs,
                        seed=args.seed, out_dir=args.out_dir))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ bench


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (quality: every method at equal total bytes)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    quality = benches.add_parser(
        "quality", help="test logloss/AUC/NE of every method at 4x/10x/50x, several seeds and datasets",
        description=(
            "Without --data: the synthetic default and MovieLens-100k. With --data: that dataset only (a CSV "
            "needs no table sizes: see --csv-spec). A progress bar counts the runs (with an ETA) and each "
            "finished run logs one line. If the full-table model learns nothing (validation NE >= 1 or "
            "AUC <= 0.5), a warning says so and the report marks the dataset: give more --epochs or a "
            "smaller --batch-size; likewise where NE and AUC are undefined (a diverged model, a validation "
            "split of one label). A report already in --out-dir is never replaced without --overwrite."
        ),
    )
    _add_data_arguments(quality)
    quality.set_defaults(data=None)
    quality.add_argument("--quick", action="store_true",
                         help="smoke run of every method at 10x with seed 0 (on the tiny synthetic set unless "
                              "--data is given; --compressions, --seeds and the rest still apply)")
    quality.add_argument("--methods", nargs="+", choices=_quality_methods(), metavar="METHOD",
                         help="only these methods, by label (default: all): "
                              + ", ".join(map(repr, _quality_methods())).replace("%", "%%"))
    quality.add_argument("--compressions", type=comma_list(COMPRESSION), metavar="R,...", help="default 4,10,50 (--quick: 10)")
    quality.add_argument("--seeds", type=comma_list(SEED), metavar="S,...", help="default 0,1,2 (--quick: 0)")
    quality.add_argument("--epochs", type=int_in(1), default=1)
    quality.add_argument("--best-epoch", action="store_true",
                         help="report the epoch with the best validation logloss (best of --epochs)")
    quality.add_argument("--equal-passes", action="store_true",
                         help="the methods without a learn step (hash, frequency, QR, MCH, CCE, full...) train "
                              "--epochs + 1 epochs: as many gradient passes over the training split as the "
                              "methods that learn embeddings first make (their learn step + --epochs; no change "
                              "when none of --methods does); "
                              "composes with --best-epoch (best of each method's own epochs)")
    _add_budget_split_argument(quality, "for every method: ")
    quality.add_argument("--embedding-dim", type=int_in(1), default=16)
    quality.add_argument("--batch-size", type=int_in(1), default=None,
                         help="per rank, for every dataset (default: 1024, MovieLens 256)")
    quality.add_argument("--select", action="store_true",
                         help="choose each method's hyper-parameters on the validation split: train every "
                              "setting of its grid (lhf_torchrec/bench/selection.py), report the test metrics "
                              "of the setting with the best validation logloss (--methods: of these methods)")
    quality.add_argument("--out-dir", type=output_dir, default=None,
                         help="default runs/quality/ (--quick: runs/quality-quick/, --select: runs/selection/)")
    quality.add_argument("--overwrite", action="store_true",
                         help="replace the report already in --out-dir (else the benchmark refuses before training)")
    quality.set_defaults(handler=_run_bench_quality)


def _quality_methods() -> List[str]:
    from lhf_torchrec.bench.quality import QUALITY_METHODS

    return [m if isinstance(m, str) else m.label for m in QUALITY_METHODS]


def _quality_config(args: argparse.Namespace):
    from lhf_torchrec.bench.quality import QualityConfig, quick_config

    config = quick_config() if args.quick else QualityConfig()
    if args.data is not None:
        config.datasets = [_dataset(args)]
    if args.batch_size is not None:  # given: one size for every dataset; else each dataset's default
        config.batch_size, config.default_batch_size = {}, args.batch_size
    config.compressions = args.compressions or config.compressions
    config.seeds = args.seeds or config.seeds
    config.epochs, config.best_epoch, config.equal_passes = args.epochs, args.best_epoch, args.equal_passes
    config.budget_split = args.budget_split
    config.embedding_dim = args.embedding_dim
    config.out_dir = args.out_dir or ("runs/selection" if args.select and not args.quick else config.out_dir)
    return config


def _run_bench_quality(args: argparse.Namespace) -> int:
    from lhf_torchrec.bench.quality import QUALITY_METHODS, check_report_dir, run_quality, run_selection
    from lhf_torchrec.bench.selection import SELECTION_GRIDS

    config = _quality_config(args)
    check_report_dir(config.out_dir, args.overwrite)
    if sys.argv[1:3] == ["bench", "quality"]:
        config.command = "lhf bench quality " + shlex.join(sys.argv[3:])
    elif os.path.basename(sys.argv[0]) == "quality.py":
        config.command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    logging.getLogger("lhf_torchrec.bench.quality").setLevel(logging.INFO)  # one line per finished run
    if args.select:
        no_grid = [m for m in args.methods or () if m not in SELECTION_GRIDS]
        if no_grid:
            raise ValueError(f"--select: no selection grid for {', '.join(no_grid)}; methods with one: "
                             f"{', '.join(SELECTION_GRIDS)}")
        run_selection(config, args.methods or ())
        return EXIT_OK
    wanted = args.methods or _quality_methods()
    methods = [m for m in QUALITY_METHODS if (m if isinstance(m, str) else m.label) in wanted]
    run_quality(config, methods)
    return EXIT_OK


# ------------------------------------------------------------------------------------------ main

_SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    _add_profile_parser,
    _add_learn_parser,
    _add_fit_parser,
    _add_train_parser,
    _add_evaluate_parser,
    _add_plan_parser,
    _add_demo_parser,
    _add_bench_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lhf", description="Learned hash functions for TorchRec embedding tables.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # force: an import may already have configured the root logger with a bare format.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    _quiet_torchrec()
    try:
        check_outputs(args)
        return args.handler(args)
    except (ValueError, OSError) as e:
        print(f"lhf {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
