"""Process-group setup for the trainer: a plain process is a world of one; launchers set their own."""

from __future__ import annotations

import logging
import os
import socket

def default_dist_env() -> None:
    """Make a plain ``plw-train`` a world of one (deepspeed/torchrun set these themselves)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size) after initialising DeepSpeed comm: gloo on CPU, the accelerator's backend else."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # The shared-memory comm op is JIT-compiled for 50-110 s at init; gloo needs no extension.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_reduce_sum(tensor):
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.barrier()
