"""The torchx component and dlrm_main's flags, without launching training."""

import importlib.util

import pytest
from torchx.runner import get_runner
from torchx.specs.finder import get_component

from launch_helpers import COMPONENT, DLRM_SCRIPT


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def components():
    return _load(COMPONENT, "lhf_launch_components")


@pytest.fixture(scope="module")
def dlrm_main():
    return _load(DLRM_SCRIPT, "dlrm_main")


def test_torchx_loads_the_component_without_lint_errors():
    component = get_component(f"{COMPONENT}:dlrm")
    assert component.validation_errors == []


def test_multi_host_gpu_job(components):
    app = components.dlrm("--synthetic", "--batch_size", "512", j="4x8", gpu=8, cpu=64, memMB=400_000,
                          env={"NCCL_DEBUG": "INFO"})
    (role,) = app.roles
    assert role.num_replicas == 4
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (8, 64, 400_000)
    assert role.env["NCCL_DEBUG"] == "INFO"
    command = role.args[-1]
    assert "torchrun --rdzv_backend c10d" in command
    assert "--nnodes 4 --nproc_per_node 8" in command
    assert command.endswith("examples/dlrm/dlrm_main.py --synthetic --batch_size 512")


def test_more_processes_than_gpus_is_an_error(components):
    with pytest.raises(ValueError, match="4 processes per host but --gpu is 2"):
        components.dlrm("--synthetic", j="1x4", gpu=2)


def test_slurm_request_runs_one_torchrun_per_node():
    with get_runner() as runner:
        info = runner.dryrun_component(f"{COMPONENT}:dlrm", ["-j", "2x8", "--gpu", "8", "--", "--synthetic"],
                                       "slurm", cfg={"partition": "gpu", "time": "1:00:00"}, workspace=None)
    script = info.request.materialize()
    assert script.count("--gpus-per-task=8") == 2 and "#SBATCH hetjob" in script
    assert "--partition=gpu" in script
    # Every node meets the first node of the job (the first heterogeneous group).
    assert script.count("--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500") == 2
    assert script.count("--nnodes 2 --nproc_per_node 8") == 2
    assert "examples/dlrm/dlrm_main.py --synthetic" in script


def test_torchrec_style_flags(dlrm_main):
    args = dlrm_main.build_parser().parse_args([
        "--in_memory_binary_criteo_path", "/data/criteo", "--embedding_dim", "16",
        "--dense_arch_layer_sizes", "128,64,16", "--over_arch_layer_sizes", "256,1",
        "--interaction_type", "dcn", "--dcn_num_layers", "2", "--dcn_low_rank_dim", "32",
        "--num_embeddings_per_feature", "10,20", "--learning_rate", "0.1", "--dense_learning_rate", "0.002",
        "--validation_freq_within_epoch", "50", "--batch_size", "256",
    ])
    data = dlrm_main.dataset_spec(args)
    assert (data.kind, data.paths, data.num_embeddings_per_feature) == ("criteo-npy", ["/data/criteo"], [10, 20])
    model = dlrm_main.model_config(args)
    assert model.dense_arch_layer_sizes == [128, 64]  # the embedding dim is appended when the model is built
    assert (model.interaction, model.dcn_num_layers, model.dcn_low_rank_dim) == ("dcn", 2, 32)
    train = dlrm_main.train_config(args)
    assert (train.sparse_lr, train.dense_lr, train.eval_every_steps, train.batch_size) == (0.1, 0.002, 50, 256)
    tsv = dlrm_main.build_parser().parse_args(["--criteo_tsv_path", "a", "b"])
    assert (dlrm_main.dataset_spec(tsv).kind, dlrm_main.dataset_spec(tsv).paths) == ("criteo-tsv", ["a", "b"])
    default = dlrm_main.build_parser().parse_args([])
    assert dlrm_main.dataset_spec(default).kind == "synthetic"
    assert dlrm_main.model_config(default).interaction == "dot"


def test_dense_arch_must_end_at_the_embedding_dim(dlrm_main, capsys):
    assert dlrm_main.main(["--embedding_dim", "8", "--dense_arch_layer_sizes", "32,16"]) == 2
    assert "--dense_arch_layer_sizes must end with --embedding_dim (8), got 32,16" in capsys.readouterr().err


def test_one_data_source_at_a_time(dlrm_main):
    with pytest.raises(SystemExit):
        dlrm_main.build_parser().parse_args(["--synthetic", "--criteo_tsv_path", "day_0.tsv"])
