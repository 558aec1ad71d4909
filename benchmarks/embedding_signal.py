"""Do the learned embeddings know which ids are alike? Checked against the synthetic data's truth.

    .venv/bin/python benchmarks/embedding_signal.py            # 500k rows, scale 0.01 (~2 minutes)
    .venv/bin/python benchmarks/embedding_signal.py --quick    # 50k rows, scale 0.001

The synthetic data plants groups of alike ids (:mod:`lhf_torchrec.data.synthetic`), so two things
can be measured on the four largest tables, with the embeddings the quality benchmark clusters on
(8-d, one epoch of the learn step's DLRM on the training split; ids seen fewer than 10 times have
none and are left out of the bands):

1. Embedding signal: over pairs of ids in a popularity band, the correlation between the cosine
   similarity of their learned embeddings and that of their true latent vectors (1: the embedding
   geometry is the truth's, 0: unrelated).
2. Row-mates' groups: for every profiled id sharing a row with other profiled ids, the share of its
   row-mates in its own group, as a multiple of chance (1 / groups). Hashing gives 1x by
   construction; a mapping that makes alike ids share rows scores above it.
3. Row-mates' effects: the access-weighted mean squared difference between an id's true
   first-order logit effect and its row's access-weighted mean effect (what a shared row must
   average away), relative to the hashing trick's at the same budget.

Results are printed and written to docs/embedding_signal.md.
"""

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, markdown_table  # noqa: E402

from lhf_torchrec.data import SyntheticCriteoConfig, make_synthetic_criteo  # noqa: E402
from lhf_torchrec.files import atomic_write  # noqa: E402
from lhf_torchrec.mapping.embeddings import embeddings_of  # noqa: E402
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split  # noqa: E402
from lhf_torchrec.pipeline.steps import fit_mappings, learn_model, profile_tables  # noqa: E402
from lhf_torchrec.training.runtime import init_runtime  # noqa: E402
from lhf_torchrec.training.trainer import TrainConfig  # noqa: E402

METHODS = ("hash", "frequency", "learned", "combination")
BANDS = ((0, 500), (500, 3000), (3000, 8000))  # popularity ranks


def signal_correlation(vectors: torch.Tensor, latent: torch.Tensor) -> float:
    """Correlation over id pairs between learned and true cosine similarity."""
    learned = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=1)
    true = torch.nn.functional.normalize(latent, dim=1)
    upper = torch.triu_indices(len(learned), len(learned), 1)
    pairs = torch.stack([(learned @ learned.T)[upper[0], upper[1]], (true @ true.T)[upper[0], upper[1]]])
    return float(torch.corrcoef(pairs)[0, 1])


def same_group_rate(rows: np.ndarray, groups: np.ndarray) -> float:
    """Mean share of an id's row-mates that are in its group, over ids that have row-mates."""
    row_size = np.bincount(rows)
    _, pair_of_id, pair_size = np.unique(rows.astype(np.int64) * (groups.max() + 1) + groups,
                                         return_inverse=True, return_counts=True)
    shared = row_size[rows] > 1
    return float(((pair_size[pair_of_id] - 1)[shared] / (row_size[rows] - 1)[shared]).mean())


def effect_spread(rows: np.ndarray, effects: np.ndarray, counts: np.ndarray) -> float:
    """Access-weighted mean of (effect - its row's access-weighted mean effect)^2."""
    weights = counts.astype(np.float64)
    mass = np.bincount(rows, weights)
    row_mean = np.bincount(rows, weights * effects) / np.maximum(mass, 1e-12)
    return float((weights * (effects - row_mean[rows]) ** 2).sum() / weights.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50k rows at scale 0.001")
    parser.add_argument("--compressions", type=float, nargs="+", default=[4, 10, 50])
    parser.add_argument("--out", default="docs/embedding_signal.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, scale = (50_000, 0.001) if args.quick else (500_000, 0.01)
    started = time.perf_counter()
    runtime = init_runtime()
    spec = DatasetSpec("synthetic", rows=rows, scale=scale)
    data = load_split(spec, embedding_dim=16, progress=False)
    truth = make_synthetic_criteo(1, SyntheticCriteoConfig(scale=scale, seed=spec.seed), progress=False).truth
    profiles = profile_tables(data.train, data.tables)
    train_config = TrainConfig(batch_size=1024, progress=False)
    embeddings = learn_model(data.train, data.tables, profiles, dim=8, train_config=train_config,
                             runtime=runtime).embeddings
    feature_index = {f"t_{name}": i for i, name in enumerate(data.train.feature_names)}
    largest = sorted(data.tables, key=lambda t: -profiles[t.name].num_ids)[:4]

    signal = []
    for table in largest:
        profile, f = profiles[table.name], feature_index[table.name]
        ranked = profile.ids[np.argsort(-profile.counts, kind="stable")]
        row = {"table": table.name, "ids seen": profile.num_ids}
        for low, high in BANDS:
            has, vectors = embeddings_of(embeddings[table.name], ranked[low:high], table.name)
            latent = torch.from_numpy(truth.latent[f][ranked[low:high][has]])
            row[f"ranks {low}-{high}"] = signal_correlation(vectors.float(), latent) if has.sum() > 2 else float("nan")
        signal.append(row)

    mates, spread = [], []
    for compression in args.compressions:
        hashed = {}
        for method in METHODS:
            fitted = fit_mappings(data.tables, profiles, method, compression=compression,
                                  optimizer=train_config.optimizer, embeddings=embeddings)
            groups_row = {"budget": f"{compression:g}x", "method": method}
            spread_row = dict(groups_row)
            for table in largest:
                profile, f = profiles[table.name], feature_index[table.name]
                mapped = fitted.compression.mappings[table.name](torch.from_numpy(profile.ids)).numpy()
                groups_row[table.name] = same_group_rate(mapped, truth.groups[f][profile.ids]) * truth.num_groups[f]
                value = effect_spread(mapped, truth.id_effects[f][profile.ids], profile.counts)
                hashed.setdefault(table.name, value)  # "hash" comes first in METHODS
                spread_row[table.name] = value / hashed[table.name]
            mates.append(groups_row)
            spread.append(spread_row)

    names = [t.name for t in largest]
    text = f"""# Do the learned embeddings know which ids are alike?

Command: `python benchmarks/embedding_signal.py{' --quick' if args.quick else ''}` ({time.perf_counter() - started:.0f} s;
{machine_description()}). Synthetic data, {rows:,} rows at scale {scale:g} (the quality benchmark's
default), embeddings as the quality benchmark learns them (8-d, one epoch of the learn step's DLRM).
The four tables with the most profiled ids.

## Embedding signal

Correlation, over pairs of ids in a popularity band (ranks by access count), between the cosine
similarity of their learned embeddings and of their true latent vectors.

{markdown_table(signal, ["table", "ids seen"] + [f"ranks {lo}-{hi}" for lo, hi in BANDS])}

## Row-mates in the same group

For ids sharing a row, the share of their row-mates in their own true group, as a multiple of
chance (1 / groups): 1x is what random collisions give.

{markdown_table(mates, ["budget", "method"] + names)}

## Row-mates' effects

Access-weighted mean squared difference between an id's true first-order effect on the logit and
its row's access-weighted mean effect, relative to the hashing trick at the same budget (lower:
the ids that share a row affect clicks more alike; ids with a row of their own count 0).

{markdown_table(spread, ["budget", "method"] + names)}
"""
    if runtime.is_main:
        with atomic_write(args.out) as f:
            f.write(text.encode())
        print(text)


if __name__ == "__main__":
    main()
