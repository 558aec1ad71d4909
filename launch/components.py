"""TorchX components for lhf-torchrec jobs.

``dlrm`` runs ``examples/dlrm/dlrm_main.py`` under torchrun on ``nnodes x nproc_per_node`` processes,
on any TorchX scheduler; arguments after ``--`` go to the script. Run from the repository root
(the script path is relative to the job's working directory: the current directory for
``local_cwd`` and Slurm, the image's WORKDIR on Kubernetes)::

    torchx run -s local_cwd launch/components.py:dlrm -j 1x2 -- --synthetic --embedding_dim 16 \\
        --dense_arch_layer_sizes 64,16 --over_arch_layer_sizes 64,32,1 --results runs/dlrm.json
    torchx run -s slurm -cfg partition=gpu,time=2:00:00 launch/components.py:dlrm -j 4x8 --gpu 8 \\
        --memMB 480000 --cpu 64 -- --in_memory_binary_criteo_path /shared/criteo_1tb ...

See docs/launching.md. TorchX loads this file by path and executes it on its own, so it imports
only torchx and must stay self-contained.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

DLRM_SCRIPT = "examples/dlrm/dlrm_main.py"


def dlrm(
    *script_args: str,
    j: str = "1x2",
    script: str = DLRM_SCRIPT,
    image: str = "lhf-torchrec:latest",
    name: str = "lhf-dlrm",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains TorchRec's DLRM with learned-hash tables (examples/dlrm/dlrm_main.py) under torchrun.

    One role of ``nnodes`` replicas (hosts), each running ``torchrun --nproc_per_node M``; ranks
    meet through a c10d rendezvous on the first host. Per-rank batch size is the script's
    ``--batch_size``: the global batch grows with ``-j``. On GPU hosts give ``--gpu`` (GPUs per
    host): ``nproc_per_node`` must not exceed it, and each rank takes ``cuda:LOCAL_RANK`` with NCCL.

    Args:
        script_args: arguments of dlrm_main.py (after ``--``), e.g. ``--synthetic --batch_size 512``
        j: ``{nnodes}x{nproc_per_node}``: hosts x processes per host (``1x2``: 2 processes on one host)
        script: the training script, relative to the job's working directory
        image: container image (Kubernetes, Docker); ignored by local_cwd, and by Slurm without ``job_dir``
        name: job name
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        env: extra environment variables, e.g. ``NCCL_SOCKET_IFNAME=eth0,NCCL_DEBUG=INFO``
        rdzv_port: port of the rendezvous store on the first host (multi-host jobs only)
        max_retries: scheduler-level retries of the whole job (pair with ``--checkpoint_dir --resume``)
        mounts: volumes, e.g. ``type=volume,src=criteo-pvc,dst=/data`` (Kubernetes, Docker)
    """
    _min_nodes, _max_nodes, nproc_per_node, _nnodes = parse_nnodes(j)
    if gpu > 0 and nproc_per_node > gpu:
        raise ValueError(f"-j {j} asks for {nproc_per_node} processes per host but --gpu is {gpu}: "
                         "one process per GPU at most")
    job_env = {"PYTHONUNBUFFERED": "1"}
    job_env.update(env or {})
    return ddp(
        *script_args,
        script=script,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
