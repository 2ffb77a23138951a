"""Several processes (torchrun): which rank does what, sharding, averaging, the device."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch


class Ranks:
    """This process's place among torchrun's processes. Without torchrun every method is a no-op
    and train() is exactly the single-process loop, on the GPU when there is one (else the CPU).

    Under `torchrun --nproc-per-node N -m malaria_detect.cli train ...` (DDP; gloo on CPU, nccl
    with one GPU per process): rank 0 makes the patient split and fills the image cache while the
    others wait, then they read both; every rank takes its shard of each batch of the shared
    per-epoch permutation (the global batch stays --batch-size, so the schedule is the
    single-process one) and DistributedDataParallel averages the gradients; rank 0 alone
    validates, writes the run folder and decides early stopping, which it sends to the others.
    Several nodes: --out must be a folder that every node sees (split.json, resume state)."""

    def __init__(self):
        self.active = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
        self.rank = int(os.environ["RANK"]) if self.active else 0
        self.world = int(os.environ["WORLD_SIZE"]) if self.active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.active else 0
        self.is_main = self.rank == 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.started = False
        if self.active:
            import torch.distributed as dist

            if torch.cuda.is_available():
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.started = True

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextmanager
    def in_turn(self):
        """Rank 0 runs the block first, then the first process of every other node, then the rest:
        what the block writes (split.json, a node's image cache) is written by one process and
        read by those after it."""
        turn = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for _ in range(turn):
            self.barrier()
        yield
        for _ in range(2 - turn):
            self.barrier()

    def batch(self, batch_size: int) -> int:
        return -(-batch_size // self.world)

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's part of a permutation, as DistributedSampler does it (padded by wrapping
        around, so every rank takes the same number of steps)."""
        if self.world == 1:
            return order
        order = np.concatenate([order, order[:(-len(order)) % self.world]])
        return order[self.rank::self.world]

    def wrap(self, model):
        """DDP over the parameters that train now (built again when the stage changes them)."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, *xs: float) -> tuple:
        if not self.active:
            return xs
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(t.tolist())

    def share(self, obj):
        """Rank 0's object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self) -> None:
        self.barrier()
        if self.started:
            torch.distributed.destroy_process_group()
