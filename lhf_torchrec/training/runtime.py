"""Process-group set-up for training: torchrun/torchx ranks, or a single process, CPU or CUDA."""

import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank, the world, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(num_threads: int = 0) -> Runtime:
    """Joins (or creates) the default process group and picks this rank's device.

    Under torchrun/torchx (``RANK``/``WORLD_SIZE`` set) it joins their rendezvous; otherwise it
    starts a one-process group, which DistributedModelParallel needs even alone. NCCL and
    ``cuda:LOCAL_RANK`` when CUDA is available, gloo and CPU otherwise. ``num_threads=0`` splits the
    CPU cores evenly among the ranks of a host (oversubscribed intra-op threads slow every rank).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            store = tempfile.NamedTemporaryFile(prefix="lhf-pg-", delete=False).name
            dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, local_world_size, device, backend)
