"""Data-parallel runs under `torchrun` / `accelerate launch`: which prompts this process owns, barriers.

The launchers set RANK, WORLD_SIZE and LOCAL_RANK; lbridge reads them and nothing else (no scheduler
of its own). Prompt i belongs to rank `i % world_size`. Each rank writes its own images (named by
prompt index, so ranks never write the same file) and its records to a per-rank jsonl shard; after a
barrier rank 0 merges the shards into the run's single samples.jsonl, ordered by index. Without those
variables (or with WORLD_SIZE=1) every function here is a no-op and a run is one process, as before.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the launch, from the launcher's environment (one process when unset)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> World:
    """Join the process group (NCCL on CUDA, gloo on CPU); the launcher supplies MASTER_ADDR/PORT."""
    here = world()
    if here.parallel and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives run on the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return here


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mine(items: list[T], index_of=lambda item: item.index) -> list[T]:
    """The items this rank owns: index % world_size == rank (all of them in a single process)."""
    here = world()
    return [item for item in items if index_of(item) % here.size == here.rank]


def shared_token() -> str:
    """A random tag equal on every rank (rank 0's, broadcast as a tensor: no object pickling)."""
    token = torch.tensor([secrets.randbits(48)], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        token = token.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(token, src=0)
    return f"{int(token.item()):012x}"
