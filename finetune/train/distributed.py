"""Multi-process training with DistributedDataParallel, launched by ``torchrun``.

``train.<variant>.nproc_per_node > 1`` makes the train command run itself again under
``torchrun --standalone --nproc_per_node N`` (one node); for several nodes run ``torchrun`` on
each node yourself with ``--nnodes`` and a rendezvous endpoint. Every process trains on its own
share of each epoch (DistributedSampler) with ``batch_size / N`` images per step, so that the
global batch and the learning rates mean what they meant in one process; metrics are summed
across processes, and rank 0 alone talks to MLflow and writes files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank among ``world`` processes, GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that logs to MLflow and writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over every process (as float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: object) -> list[object]:
        """``value`` of every process, by rank (any picklable object)."""
        if not self.active:
            return [value]
        values: list[object] = [None] * self.world
        torch_dist.all_gather_object(values, value)
        return values


SINGLE = Dist()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(device_type: str) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, else gloo); SINGLE outside torchrun."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def stop(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` on this node with ``nproc`` processes of ``-m module_args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", *module_args]


def interleave(parts: list[torch.Tensor], total: int) -> torch.Tensor:
    """Undo a strided split: rank r held items r, r + world, r + 2 world, ... of ``total``."""
    whole = torch.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        whole[rank::len(parts)] = part
    return whole
