"""``lhf``: the command line of lhf-torchrec.

One subcommand per pipeline step; each has an ``_add_<name>_parser(subparsers)`` that declares its
arguments and sets ``handler`` to a function ``(args) -> exit code`` that calls the library. Add a
subcommand by writing both and listing the parser function in ``_SUBCOMMANDS``.

Example::

    lhf plan --preset criteo-1tb --world-size 128 --compression 10
"""

import argparse
import logging
import sys
import warnings
from typing import Callable, List, Optional

EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


def _quiet_torchrec() -> None:
    """TorchRec's planner logs warnings meant for training jobs (dry-run estimates, topology factory)."""
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# ------------------------------------------------------------------------------------------ plan


def _add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    from lhf_torchrec.distributed.planner import OPTIMIZERS
    from lhf_torchrec.distributed.presets import PRESETS

    parser = subparsers.add_parser(
        "plan",
        help="per-rank memory of a model before and after compression, from TorchRec's planner",
        description=(
            "Plans the model's embedding tables with TorchRec's sharding planner, before and after "
            "learned-hash compression, and prints per-rank memory (tables, optimizer state, buffers, "
            "mappings). Runs without a GPU for any topology. Exits with 1 if the compressed model does "
            "not fit, saying on which ranks and by how much."
        ),
        epilog=(
            'Table-size JSON (--tables): {"C1": 1460, "C2": 583} or [{"name": "C1", "num_embeddings": 1460, '
            '"embedding_dim": 64, "feature_names": ["C1"]}, ...] (embedding_dim and feature_names optional). '
            "Memory sizes are in GB of 2^30 bytes, as TorchRec's planner reports them."
        ),
    )
    tables = parser.add_mutually_exclusive_group(required=True)
    tables.add_argument("--preset", choices=sorted(PRESETS), help="26 Criteo tables with their cardinalities")
    tables.add_argument("--tables", metavar="FILE", help="table sizes as JSON (schema below)")
    after = parser.add_mutually_exclusive_group(required=True)
    after.add_argument(
        "--compression", type=float, metavar="RATIO",
        help="full table bytes / compressed bytes (mappings counted), with synthetic mappings",
    )
    after.add_argument("--mappings", metavar="FILE", help="fitted mappings (save_mappings file) for the tables")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks (tested up to 1024)")
    parser.add_argument("--local-world-size", type=int, default=None,
                        help="ranks per host (default min(8, world size))")
    parser.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: tables in HBM (no GPU needed to plan); cpu: tables in DDR")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="HBM per rank (default 80)")
    parser.add_argument("--ddr-gb", type=float, default=128.0, help="DDR per rank (default 128)")
    parser.add_argument("--embedding-dim", type=int, default=128, help="embedding dim of every table (default 128)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad",
                        help="fused optimizer whose state is counted (default rowwise_adagrad)")
    parser.add_argument("--batch-size", type=int, default=512, help="batch size per rank (default 512)")
    parser.add_argument("--entry-fraction", type=float, default=0.1,
                        help="synthetic mappings: share of each table's ids with a stored entry (default 0.1)")
    parser.add_argument("--reserve", type=float, default=0.15,
                        help="share of HBM kept free by TorchRec's heuristic reservation (default 0.15)")
    parser.add_argument("--rank-rows", type=int, default=16,
                        help="print one row per rank up to this world size, else a summary (default 16)")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from lhf_torchrec.distributed.planner import plan_report
    from lhf_torchrec.distributed.presets import load_tables, preset_tables
    from lhf_torchrec.mapping import load_mappings

    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    tables = (
        preset_tables(args.preset, args.embedding_dim) if args.preset else load_tables(args.tables, args.embedding_dim)
    )
    report = plan_report(
        tables,
        world_size=args.world_size,
        local_world_size=args.local_world_size,
        compression=args.compression,
        mappings=load_mappings(args.mappings) if args.mappings else None,
        compute_device=args.compute_device,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        entry_fraction=args.entry_fraction,
        reserve_fraction=args.reserve,
    )
    print(report.format(max_rank_rows=args.rank_rows))
    if not report.fits:
        print(f"lhf plan: error: after compression, {report.after.error}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


# ------------------------------------------------------------------------------------------ main

_SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [_add_plan_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lhf", description="Learned hash functions for TorchRec embedding tables.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_torchrec()
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lhf {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
