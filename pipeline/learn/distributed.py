"""Data-parallel training on torch.distributed (DDP), with torchrun's semantics.

A training process is one of WORLD_SIZE processes when the environment says so, as torchrun
(and `launch` here) sets it: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT. Every process reads the same recordings, makes the same windows and split,
starts from rank 0's weights (DDP broadcasts them), takes its share of every batch and of
the validation windows, and DDP averages the gradients; rank 0 writes the model.

    iotfuse train --nproc 2 ...                      # `launch`: 2 processes on this machine
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 .venv/bin/iotfuse train ...   # several machines

Backend: gloo on CPU, NCCL on CUDA (process LOCAL_RANK uses cuda:LOCAL_RANK).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> Process | None:
    """This process's place among WORLD_SIZE > 1 processes, or None when it is alone."""
    e = os.environ if env is None else env
    try:
        world = int(e.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return Process(
            rank=int(e["RANK"]),
            world=world,
            local_rank=int(e.get("LOCAL_RANK", "0")),
            local_world=int(e.get("LOCAL_WORLD_SIZE", str(world))),
        )
    except (KeyError, ValueError) as exc:
        raise UserError(
            f"WORLD_SIZE is set but the other torchrun variables are missing or wrong ({exc}); "
            "start the processes with torchrun or `iotfuse train --nproc N`"
        ) from exc


class DDPGroup:
    """The process group of a training run (fusion.train.Parallel)."""

    def __init__(self, process: Process, device: Any):
        import torch
        import torch.distributed as dist

        self.rank, self.world = process.rank, process.world
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # share this machine's cores among its processes
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // process.local_world))
        dist.init_process_group(backend=backend, init_method="env://")

    def wrap(self, module: Any) -> Any:
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # the camera trunk's gradients come channels-last; DDP copies them into its buckets
        # (correct, a little slower) and would warn about it at every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")

        # a batch share may lack a modality, or modality dropout may remove it: its trunk then
        # has no gradient on this process, which DDP must be told to expect
        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out: np.ndarray = t.cpu().numpy()
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in `nproc` fresh processes on this machine, as torchrun does (torch's
    elastic launcher, one node, c10d rendezvous on a loopback port, no restarts); returns
    rank 0's result. fn must be importable by name (the processes are spawned)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"iotfuse-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        first = next(iter(exc.failures.values()))
        raise UserError(
            f"training process {first.local_rank} of {nproc} failed ({first.message or 'exit '}"
            f"{first.exitcode}); its error is above"
        ) from None
    return results[0]
