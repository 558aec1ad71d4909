"""End-to-end launches of examples/dlrm/dlrm_main.py on CPU/gloo: torchrun, torchx local_cwd, and a
2-node job simulated on one machine. World size 2 everywhere, per-rank batch 128: the global batch is
the same in every launch."""

import math

import pytest

from launch_helpers import free_port, read_results, run_together, torchrun_command, torchx_command

pytestmark = pytest.mark.distributed

TIMEOUT_S = 180
ROWS, BATCH_SIZE, WORLD_SIZE = 6000, 128, 2
# Tiny data and model; the mapping is fitted on every rank before training (learned + frequency).
SCRIPT_ARGS = [
    "--synthetic_rows", str(ROWS), "--synthetic_scale", "0.0005",
    "--embedding_dim", "8", "--dense_arch_layer_sizes", "32,8", "--over_arch_layer_sizes", "32,1",
    "--batch_size", str(BATCH_SIZE), "--dense_learning_rate", "0.01", "--seed", "0",
    "--method", "combination", "--compression", "4",
]
# Train rows (80 %) in full global batches.
EXPECTED_STEPS = int(ROWS * 0.8) // (BATCH_SIZE * WORLD_SIZE)
METRICS = ("logloss", "auc", "ne")


def _job(tmp_path_factory, name, commands_for):
    out = tmp_path_factory.mktemp(name)
    results = out / "results.json"
    finished = run_together(commands_for(out, [*SCRIPT_ARGS, "--results", str(results)]), out / "logs", TIMEOUT_S)
    return finished, read_results(results)


@pytest.fixture(scope="module")
def torchrun_1x2(tmp_path_factory):
    return _job(tmp_path_factory, "torchrun_1x2", lambda out, args: [torchrun_command(args, nproc_per_node=2)])


@pytest.fixture(scope="module")
def torchrun_2x1(tmp_path_factory):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous as two hosts would."""
    endpoint = f"localhost:{free_port()}"
    return _job(tmp_path_factory, "torchrun_2x1", lambda out, args: [
        torchrun_command(args, nproc_per_node=1, nnodes=2, node_rank=node, rdzv_endpoint=endpoint) for node in (0, 1)
    ])


def _assert_same_run(got, expected):
    assert got["world_size"] == expected["world_size"] == WORLD_SIZE
    assert got["steps"] == expected["steps"] == EXPECTED_STEPS
    assert got["test"]["examples"] == expected["test"]["examples"]
    for metric in METRICS:
        assert got["test"][metric] == pytest.approx(expected["test"][metric], abs=1e-6), metric
    assert got["mean_train_loss"] == pytest.approx(expected["mean_train_loss"], abs=1e-6)
    assert [v["step"] for v in got["validation"]] == [v["step"] for v in expected["validation"]]
    for v_got, v_expected in zip(got["validation"], expected["validation"]):
        assert v_got["logloss"] == pytest.approx(v_expected["logloss"], abs=1e-6)


def _assert_learned(results):
    test = results["test"]
    assert all(math.isfinite(test[m]) for m in METRICS)
    assert results["mean_train_loss"] < math.log(2)
    assert test["ne"] < 0.97  # better than predicting the base rate
    assert test["auc"] > 0.65
    assert results["mapping_bytes"] > 0  # the tables were compressed


def test_torchx_local_1x2_equals_torchrun(torchrun_1x2, tmp_path_factory):
    _, expected = torchrun_1x2
    (torchx,), got = _job(tmp_path_factory, "torchx_1x2", lambda out, args: [
        torchx_command(args, j="1x2", log_dir=out / "torchx")
    ])
    _assert_learned(expected)
    _assert_same_run(got, expected)
    # torchx streams every replica's output, prefixed by role/replica [local rank]; rank 0 prints the metrics.
    assert f"dlrm_main/0 [0]:world size 2, {EXPECTED_STEPS} steps" in torchx.stderr


def test_two_node_job_trains_like_one_node(torchrun_2x1, torchrun_1x2):
    nodes, got = torchrun_2x1
    _, one_node = torchrun_1x2
    _assert_learned(got)
    assert [("world size 2" in node.stdout) for node in nodes].count(True) == 1  # one rank 0 across the two hosts
    assert got["world_size"] == WORLD_SIZE and got["steps"] == one_node["steps"] == EXPECTED_STEPS
    assert got["test"]["examples"] == one_node["test"]["examples"]
    assert got["table_rows"] == one_node["table_rows"] and got["mapping_bytes"] == one_node["mapping_bytes"]
    # Not equal to 1e-6: with one process per host the planner picks table_row_wise where it picks
    # row_wise on one host, and each rank initializes the table shards it owns, so the two jobs start
    # from different table weights. Same data, same global batch: the same quality.
    assert got["test"]["logloss"] == pytest.approx(one_node["test"]["logloss"], abs=0.02)
    assert got["test"]["auc"] == pytest.approx(one_node["test"]["auc"], abs=0.05)


def test_torchx_two_node_equals_torchrun_two_node(torchrun_2x1, tmp_path_factory):
    """torchx's multi-host path (rendezvous at $TORCHX_RANK0_HOST:rdzv_port) on one machine."""
    _, expected = torchrun_2x1
    _, got = _job(tmp_path_factory, "torchx_2x1", lambda out, args: [
        torchx_command(args, j="2x1", log_dir=out / "torchx", component_args=["--rdzv_port", str(free_port())])
    ])
    _assert_same_run(got, expected)
